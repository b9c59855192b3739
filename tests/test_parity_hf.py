"""Parity with the reference implementation (transformers on CPU) on the same weights.

Tiny random `MistralForCausalLM` and `Mistral3ForConditionalGeneration` models are saved with
`save_pretrained`, loaded with `mj.load_model`, and their logits compared on random tokens with
left and right padding (both sides get the same positions and attention mask).
"""

import json
import os

import hf_reference as R
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import magistral_jax as mj

SHAPES = {
    # GQA ratio 1, head_dim (16) * heads (4) != hidden (32), odd vocab, one layer.
    "mha": dict(vocab=101, dim=32, layers=1, heads=4, kv_heads=4, head_dim=16, hidden=64),
    # GQA ratio 2, head_dim 8 != 48 / 4, two layers.
    "gqa2": dict(vocab=97, dim=48, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=80),
    # GQA ratio 4 as in the 24B model, three layers.
    "gqa4": dict(vocab=131, dim=48, layers=3, heads=8, kv_heads=2, head_dim=16, hidden=96),
}


def _relative_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    sel = mask.astype(bool)
    scale = np.abs(ref[sel]).max()
    err = np.abs(ours[sel] - ref[sel])
    return float(err.max() / scale), float(err.mean() / scale)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_causal_lm_fp32_matches_transformers(tmp_path, shape):
    kw = SHAPES[shape]
    ref_model = R.causal_lm(seed=1, **kw)
    ref_model.save_pretrained(tmp_path)
    tokens, mask, positions = R.padded_batch(np.random.default_rng(2), kw["vocab"])
    ref = R.reference_logits(ref_model, tokens, mask, positions)

    model = mj.load_model(tmp_path, dtype="float32")
    ours = np.asarray(model.logits(tokens, mask=mask))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    max_rel, _ = _relative_error(ours, ref, mask)
    assert max_rel <= 1e-4


def test_causal_lm_bf16_within_reference_bf16_error(tmp_path):
    """bf16 params and compute: max |diff| <= 5% and mean <= 1% of the logit scale against the fp32
    reference, and a mean error no larger than 1.5x transformers' own bf16 error."""
    kw = SHAPES["gqa4"]
    ref_model = R.causal_lm(seed=3, **kw)
    ref_model.save_pretrained(tmp_path)
    tokens, mask, positions = R.padded_batch(np.random.default_rng(4), kw["vocab"])
    ref32 = R.reference_logits(ref_model, tokens, mask, positions)
    ref16 = R.reference_logits(ref_model.to(torch.bfloat16), tokens, mask, positions)

    model = mj.load_model(tmp_path, dtype="bfloat16")
    assert model.params["layers"]["wq"].dtype == np.dtype("bfloat16")
    ours = np.asarray(model.logits(tokens, mask=mask))
    max_rel, mean_rel = _relative_error(ours, ref32, mask)
    _, ref_mean_rel = _relative_error(ref16, ref32, mask)
    assert max_rel <= 0.05
    assert mean_rel <= 0.01
    assert mean_rel <= 1.5 * ref_mean_rel


def _rename_tensors(directory, rename):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    save_file({rename(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_mistral3_text_part_matches_transformers(tmp_path, layout):
    """Both key layouts of Mistral3: `language_model.model.*` (what transformers writes) and
    `model.language_model.*` + `lm_head.weight` (its in-memory module tree)."""
    kw = SHAPES["gqa2"]
    ref_model = R.mistral3(seed=5, **kw)
    ref_model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["text_config"]["tie_word_embeddings"] is False
    if layout == "new":
        prefixes = [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ]

        def rename(name):
            for old, new in prefixes:
                if name.startswith(old):
                    return new + name[len(old) :]
            raise AssertionError(name)

        _rename_tensors(tmp_path, rename)
    tokens, mask, positions = R.padded_batch(np.random.default_rng(6), kw["vocab"])
    tokens[tokens == 10] = 11  # no [IMG] tokens: the text path only
    ref = R.reference_logits(ref_model, tokens, mask, positions)

    ours = np.asarray(mj.load_model(tmp_path, dtype="float32").logits(tokens, mask=mask))
    max_rel, _ = _relative_error(ours, ref, mask)
    assert max_rel <= 1e-4


def test_sharded_checkpoint_with_index(tmp_path):
    """Several safetensors shards with model.safetensors.index.json load like one file."""
    kw = SHAPES["gqa2"]
    ref_model = R.causal_lm(seed=7, **kw)
    ref_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    tokens, mask, positions = R.padded_batch(np.random.default_rng(8), kw["vocab"])
    ref = R.reference_logits(ref_model, tokens, mask, positions)
    ours = np.asarray(mj.load_model(tmp_path, dtype="float32").logits(tokens, mask=mask))
    max_rel, _ = _relative_error(ours, ref, mask)
    assert max_rel <= 1e-4


def test_packed_sequences_match_separate_reference_runs(tmp_path):
    """Two documents packed in one row (segment ids 1, 2) give each document's own reference logits."""
    kw = SHAPES["gqa4"]
    ref_model = R.causal_lm(seed=9, **kw)
    ref_model.save_pretrained(tmp_path)
    rng = np.random.default_rng(10)
    a, b = rng.integers(0, kw["vocab"], 7), rng.integers(0, kw["vocab"], 5)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 7 + [2] * 5])
    ours = np.asarray(mj.load_model(tmp_path, dtype="float32").logits(packed, segment_ids=segments))[0]
    for doc, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
        ones = np.ones((1, len(doc)), np.int64)
        ref = R.reference_logits(ref_model, doc[None], ones, np.arange(len(doc))[None])[0]
        assert np.abs(ours[sl] - ref).max() <= 1e-4 * np.abs(ref).max()
