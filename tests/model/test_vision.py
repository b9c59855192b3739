"""The Pixtral encoder, projector and multimodal merge against transformers' Mistral3, and the
image preprocessing against the documented algorithm."""

import io
import json
import os

import cv2
import hf_reference as R
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

import magistral_jax as mj
from magistral_jax.images import ImageError, encode_image, image_tokens, to_pil
from magistral_jax.sampling import GREEDY, Sampler

TEXT = dict(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=48)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def reference():
    return R.mistral3(seed=7, **TEXT)


@pytest.fixture(scope="module")
def model(reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mistral3")
    reference.save_pretrained(directory)
    return mj.load_model(directory, dtype="float32")


def _pixels(rng, h, w):
    return rng.normal(size=(3, h, w)).astype(np.float32)


def _reference_logits(reference, tokens, images, mask=None):
    """transformers' logits; `images` is the flat list of every sequence's pixels, in order."""
    kwargs = {}
    if images:
        h = max(p.shape[1] for p in images)
        w = max(p.shape[2] for p in images)
        pixel_values = torch.zeros(len(images), 3, h, w)
        for i, p in enumerate(images):
            pixel_values[i, :, : p.shape[1], : p.shape[2]] = torch.tensor(p)
        kwargs = dict(pixel_values=pixel_values, image_sizes=torch.tensor([p.shape[1:] for p in images]))
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        return reference(input_ids=torch.tensor(tokens), **kwargs).logits.numpy()


def _sequence(vcfg, images, text=(20, 21)):
    tokens = [1, 3]
    for p in images:
        tokens += image_tokens(p, vcfg) + list(text)
    return [*tokens, 4]


def _assert_close(ours, ref, mask=None):
    ours = np.asarray(ours)
    if mask is not None:
        sel = np.asarray(mask, bool)
        ours, ref = ours[sel], ref[sel]
    assert np.abs(ours - ref).max() <= 1e-4


def test_one_image(reference, model):
    px = _pixels(np.random.default_rng(0), 56, 84)
    tokens = np.array([_sequence(model.cfg.vision, [px])])
    _assert_close(model.logits(tokens, images=[[px]]), _reference_logits(reference, tokens, [px]))


def test_two_images_of_different_sizes_in_one_sequence(reference, model):
    rng = np.random.default_rng(1)
    images = [_pixels(rng, 56, 112), _pixels(rng, 84, 28)]
    tokens = np.array([_sequence(model.cfg.vision, images)])
    _assert_close(model.logits(tokens, images=[images]), _reference_logits(reference, tokens, images))


def test_batch_mixing_an_image_sequence_with_a_text_only_one(reference, model):
    rng = np.random.default_rng(2)
    px = _pixels(rng, 28, 56)
    with_image = _sequence(model.cfg.vision, [px])
    text_only = [1, 3, *rng.integers(14, 97, 9).tolist(), 4]
    width = max(len(with_image), len(text_only))
    tokens = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, seq in enumerate((with_image, text_only)):
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    ours = model.logits(tokens, images=[[px], []], mask=mask)
    _assert_close(ours, _reference_logits(reference, tokens, [px], mask), mask)


@pytest.mark.parametrize("layout", ["hf-new", "mistral"])
def test_vision_weights_from_every_layout(reference, tmp_path, layout):
    if layout == "mistral":
        R.save_mistral_consolidated(reference, tmp_path)  # vision q/k in Mistral's interleaved order
    else:
        reference.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
        renames = {
            "language_model.model.": "model.language_model.",
            "language_model.lm_head.": "lm_head.",
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        }

        def rename(name):
            return next(new + name[len(old) :] for old, new in renames.items() if name.startswith(old))

        save_file({rename(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    model = mj.load_model(tmp_path, dtype="float32")
    rng = np.random.default_rng(3)
    images = [_pixels(rng, 56, 56), _pixels(rng, 28, 84)]
    tokens = np.array([_sequence(model.cfg.vision, images)])
    _assert_close(model.logits(tokens, images=[images]), _reference_logits(reference, tokens, images))


def test_greedy_generation_with_an_image_equals_transformers(reference, model):
    px = _pixels(np.random.default_rng(4), 56, 56)
    prompt = _sequence(model.cfg.vision, [px])
    out = Sampler(model, stop_ids=(2,)).sample([prompt], images=[[px]], max_new_tokens=10, sampling=GREEDY)
    with torch.no_grad():
        ref = reference.generate(
            torch.tensor([prompt]),
            pixel_values=torch.tensor(px)[None],
            image_sizes=torch.tensor([[56, 56]]),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert out.completion(0) == ref


def test_image_sizes_in_one_bucket_share_compiled_code(model):
    from magistral_jax.api import _logits

    rng = np.random.default_rng(5)
    for h, w in ((28, 28), (56, 56), (28, 112)):  # 4 to 16 patches: one bucket of 256
        px = _pixels(rng, h, w)
        tokens = np.zeros((1, 40), np.int64)
        seq = _sequence(model.cfg.vision, [px])
        tokens[0, : len(seq)] = seq
        model.logits(tokens, images=[[px]])
        if (h, w) == (28, 28):
            compiled = _logits._cache_size()
    assert _logits._cache_size() == compiled


def test_tokens_and_images_that_do_not_match(model):
    vcfg = model.cfg.vision
    rng = np.random.default_rng(6)
    px = _pixels(rng, 28, 56)
    tokens = np.array([_sequence(vcfg, [px, px])])
    with pytest.raises(ImageError, match=r"\[IMG\] token at \d+ belongs to no image \(1 images given\)"):
        model.logits(tokens, images=[[px]])
    tokens = np.array([_sequence(vcfg, [px])])
    with pytest.raises(ImageError, match=r"image 1 has no \[IMG\] tokens left \(2 images given\)"):
        model.logits(tokens, images=[[px, px]])
    with pytest.raises(ImageError, match=r"do not match the image's 56 x 28 layout"):
        model.logits(tokens, images=[[_pixels(rng, 56, 28)]])
    with pytest.raises(ImageError, match="one list per sequence"):
        model.logits(tokens, images=[[px], [px]])
    text_model = mj.init_model(mj.get_preset("tiny"), 0)
    with pytest.raises(ImageError, match="has no vision encoder"):
        text_model.logits(np.array([[1, 2]]), images=[[px]])


# --- preprocessing --------------------------------------------------------------------------------

VISION_2509 = mj.get_preset("magistral-small-2509").vision


@pytest.mark.parametrize(
    ("size", "pixels", "grid"),
    [((1000, 700), (700, 1008), (25, 36)), ((3000, 2000), (1036, 1540), (37, 55)), ((100, 50), (56, 112), (2, 4))],
)
def test_documented_resize_examples(size, pixels, grid):
    # reference/architecture-and-checkpoints.md, section 2.4 (sizes are width x height).
    image = np.zeros((size[1], size[0], 3), np.uint8)
    tokens, px = encode_image(image, VISION_2509)
    assert px.shape == (3, *pixels)
    rows, cols = grid
    assert tokens.count(10) == rows * cols and len(tokens) == rows * (cols + 1)
    assert tokens == image_tokens(px, VISION_2509)


def test_preprocessing_follows_the_documented_algorithm():
    """RGB, bicubic resize (cv2, float32) to multiples of 28, /255, CLIP mean/std, CHW."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (61, 90, 3), dtype=np.uint8)
    _, px = encode_image(image, VISION_2509)
    expected = cv2.resize(image.astype(np.float32), (112, 84), interpolation=cv2.INTER_CUBIC) / 255.0
    expected = ((expected - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(px, expected, atol=1e-5)


def test_image_modes_are_converted():
    rgba = np.zeros((28, 28, 4), np.uint8)  # fully transparent: composited over white
    _, px = encode_image(rgba, VISION_2509)
    np.testing.assert_allclose(px[:, 0, 0], (1 - MEAN) / STD, atol=1e-5)
    gray = np.full((28, 28), 128, np.uint8)
    _, px = encode_image(gray, VISION_2509)
    np.testing.assert_allclose(px[:, 5, 5], (128 / 255 - MEAN) / STD, atol=1e-5)
    palette = Image.fromarray(np.full((28, 28), 3, np.uint8), mode="P")
    palette.putpalette([0, 0, 0] * 3 + [255, 0, 0] + [0, 0, 0] * 252)
    _, px = encode_image(palette, VISION_2509)
    np.testing.assert_allclose(px[:, 0, 0], (np.array([1.0, 0, 0]) - MEAN) / STD, atol=1e-5)


def test_bad_images():
    with pytest.raises(ImageError, match="not a readable image"):
        to_pil(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"the image is empty \(0 x 10 pixels\)"):
        encode_image(np.zeros((10, 0, 3), np.uint8), VISION_2509)
    with pytest.raises(ImageError, match="a uint8 array"):
        encode_image(np.zeros((4, 4, 3), np.float64), VISION_2509)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(buf, format="PNG")
    assert to_pil(buf.getvalue()).size == (7, 5)


def test_chat_with_images_through_the_tokenizer(tmp_path):
    from magistral_jax.tokenizer import load_tokenizer, write_standin_tekken

    tok = load_tokenizer(write_standin_tekken(tmp_path / "tekken.json"))
    image = np.random.default_rng(8).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    ids, pixels = tok.encode_chat_with_images("What is this?", [image, image])
    tokens, px = encode_image(image, VISION_2509)
    # [INST] then each image's block, then the text (mistral-common puts images first).
    assert ids[:2] == [1, 3] and ids[2 : 2 + 2 * len(tokens)] == tokens + tokens
    assert len(pixels) == 2 and all(np.array_equal(p, px) for p in pixels)
    config = json.loads((tmp_path / "tekken.json").read_text())["image"]
    assert config == {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    assert os.path.exists(tmp_path / "tekken.json")


def test_sharded_vision_equals_single_device(reference, model, tmp_path):
    reference.save_pretrained(tmp_path)
    sharded = mj.load_model(tmp_path, mesh=mj.make_mesh(data=2, fsdp=2, tensor=2), dtype="float32")
    # Vision weights follow the rules: hidden over fsdp, heads and FFN over tensor.
    assert sharded.params["vision"]["layers"]["w1"].addressable_shards[0].data.shape == (1, 16, 32)
    rng = np.random.default_rng(9)
    images = [_pixels(rng, 56, 28), _pixels(rng, 28, 28)]
    seq = _sequence(model.cfg.vision, images)
    tokens = np.array([seq, seq[::-1]])
    tokens[1][tokens[1] >= 10] = 20  # the second row is text only
    got = sharded.logits(tokens, images=[images, []])
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.logits(tokens, images=[images, []])), atol=1e-5)
