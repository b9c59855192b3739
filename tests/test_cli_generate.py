"""`magistral-jax generate` end to end on a tiny model with the Tekken v13 stand-in tokenizer."""

import json

import hf_reference as R
import numpy as np
import pytest
from helpers import run_cli

from magistral_jax.tokenizer import load_tokenizer, write_standin_tekken


def _generate(*args, timeout=300):
    return run_cli("generate", *args, timeout=timeout)


def test_json_samples(tekken_checkpoint):
    out = _generate(
        "--checkpoint",
        str(tekken_checkpoint),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--n",
        "2",
        "--temperature",
        "1.0",
        "--dtype",
        "float32",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 2
    tokenizer = load_tokenizer(tekken_checkpoint)
    for r in records:
        assert set(r) == {"tokens", "text", "thinking", "answer", "logprobs", "finish_reason"}
        assert len(r["tokens"]) == len(r["logprobs"]) <= 5
        assert r["text"] == tokenizer.decode(r["tokens"], keep_special=True)
        assert r["finish_reason"] in ("stop", "length")
        assert all(lp <= 0 for lp in r["logprobs"])


def test_streaming_text_and_speed_line(tekken_checkpoint):
    out = _generate(
        "--checkpoint",
        str(tekken_checkpoint),
        "--prompt",
        "Hi there",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--system-prompt",
        "none",
        "--dtype",
        "float32",
        "--chunk",
        "2",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--- answer ---" in out.stdout or "--- thinking ---" in out.stdout
    assert "tokens/s" in out.stderr and "prompt 5 tokens" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--top-p", "2"], "top_p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--system-prompt", "nosuchfile.txt"], "neither default, none nor an existing file"),
        (["--prompt", "x " * 200, "--max-new-tokens", "131000"], "exceeds the model's context"),
    ],
)
def test_bad_input(tekken_checkpoint, args, message):
    out = _generate("--checkpoint", str(tekken_checkpoint), "--dtype", "float32", *args)
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]


def test_missing_checkpoint_or_tokenizer(tekken_checkpoint, tmp_path):
    out = _generate("--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 1 and "not a directory" in out.stderr
    out = _generate("--checkpoint", str(tekken_checkpoint), "--prompt", "x", "--tokenizer", str(tmp_path / "t.json"))
    assert out.returncode == 1 and "no such tokenizer file" in out.stderr


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vision")
    R.mistral3(seed=5, vocab=131072, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, hidden=48).save_pretrained(
        directory
    )
    write_standin_tekken(directory / "tekken.json")
    return directory


def test_images(vision_checkpoint, tekken_checkpoint, tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray((np.arange(50 * 100 * 3) % 251).astype(np.uint8).reshape(50, 100, 3)).save(image)
    args = [
        "--prompt",
        "What is this?",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--system-prompt",
        "none",
    ]
    out = _generate("--checkpoint", str(vision_checkpoint), "--image", str(image), "--image", str(image), *args)
    assert out.returncode == 0, out.stderr[-2000:]
    # Two 100 x 50 images: 2 x (4 + 1) x 2 = 20 image tokens, then <s>[INST] ... [/INST].
    assert "prompt 27 tokens" in out.stderr
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = _generate("--checkpoint", str(vision_checkpoint), "--image", str(corrupt), *args)
    assert out.returncode == 1 and "broken.png: not a readable image" in out.stderr
    out = _generate("--checkpoint", str(tekken_checkpoint), "--image", str(image), *args)
    assert out.returncode == 1 and "has no vision encoder" in out.stderr
