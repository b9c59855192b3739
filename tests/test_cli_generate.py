"""`magistral-jax generate` end to end on a tiny model with the Tekken v13 stand-in tokenizer."""

import itertools
import json
import shutil

import hf_reference as R
import numpy as np
import pytest
from helpers import run_cli

import magistral_jax as mj
from magistral_jax.cli import main
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
    assert "loading" in out.stderr  # the checkpoint load's progress bar


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", str(2**64)], f"--seed: an integer from 0 to {2**32 - 1} is expected, got {2**64}"),
        (["--seed", str(2**32)], f"--seed: an integer from 0 to {2**32 - 1} is expected"),
        (["--seed", "-1"], "--seed: an integer from 0 to"),
        (["--temperature", "inf"], "--temperature: a finite number >= 0 is expected, got inf"),
        (["--temperature", "nan"], "--temperature: a finite number >= 0 is expected, got nan"),
        (["--temperature", "-0.5"], "--temperature: a finite number >= 0 is expected, got -0.5"),
        (["--top-p", "nan"], "--top-p: a finite number >= 0 is expected, got nan"),
    ],
)
def test_sampling_options_are_checked_before_loading(tmp_path, capsys, args, message):
    # The checkpoint does not exist: the options are refused before anything is read.
    from magistral_jax.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", *args]) == 1
    err = capsys.readouterr().err
    assert err == f"magistral-jax generate: error: {message}\n" or message in err, err


class _Digits:
    """A tokenizer stand-in (the Tekken one takes seconds to load): token k is the text `<k>`."""

    def decode(self, ids, keep_special=False):
        return "".join(f"<{i}>" for i in ids)

    def split(self, ids):
        from magistral_jax.tokenizer import Reasoning

        return Reasoning(thinking=None, answer=self.decode(ids), closed=True)


def test_json_records_are_strict_json_when_logprobs_are_not_finite():
    # NaN or Inf weights give NaN logprobs; `json.dumps` would print NaN, which strict parsers refuse.
    from magistral_jax.cli.generate import json_record
    from magistral_jax.sampling.sampler import SampleOutput

    logprobs = np.array([[np.nan, -np.inf, -0.25, np.inf, 0.0]], np.float32)
    tokens = np.array([[1044, 1045, 1046, 1047, 0]], np.int32)
    out = SampleOutput(tokens, logprobs, logprobs, np.array([4]), ["length"])

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    record = json.loads(json_record(_Digits(), out, 0), parse_constant=refuse)
    assert record["logprobs"] == [None, None, -0.25, None] and record["tokens"] == [1044, 1045, 1046, 1047]
    assert record["answer"] == "<1044><1045><1046><1047>" and record["finish_reason"] == "length"


def _generate_here(capsys, *args):
    """`magistral-jax generate ARGS` in this process (compiled programs are shared between calls);
    returns its standard output."""
    capsys.readouterr()
    assert main(["generate", *map(str, args)]) == 0, capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


def _teacher_forced(model, prompt, tokens, temperature):
    logits = np.asarray(model.logits(np.array([prompt + tokens])), np.float64)[0] / temperature
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    return logp[np.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1), tokens]


def test_json_logprobs_are_tempered_under_the_default_system_prompt(tekken_checkpoint, tmp_path, capsys):
    """At temperature 0.7 each JSON log-probability is log softmax(logits / 0.7) of a teacher-forced
    forward over the prompt `generate` should have encoded: the Magistral chat format with the
    checkpoint's SYSTEM_PROMPT.txt when it ships one, else the family's published prompt."""
    tokenizer = load_tokenizer(tekken_checkpoint)
    model = mj.load_model(tekken_checkpoint, dtype="float32")
    shipped = tmp_path / "with-prompt"
    shutil.copytree(tekken_checkpoint, shipped)
    own = "You answer in one short sentence, in the user's language."
    (shipped / "SYSTEM_PROMPT.txt").write_text(own)
    # The second run samples over the paged cache (pages of 16 tokens, shared by the two samples).
    runs = (
        (tekken_checkpoint, tokenizer.default_system_prompt(), ()),
        (shipped, own, ("--cache", "paged", "--page-size", 16)),
    )
    for checkpoint, system, cache in runs:
        out = _generate_here(capsys, "--checkpoint", checkpoint, "--prompt", "Hello", "--max-new-tokens", 6, "--n", 2,
                             "--temperature", 0.7, "--seed", 3, "--dtype", "float32", "--json", *cache)  # fmt: skip
        prompt = tokenizer.encode_chat("Hello", system)
        for record in map(json.loads, out.splitlines()):
            want = _teacher_forced(model, prompt, record["tokens"], 0.7)
            np.testing.assert_allclose(record["logprobs"], want, atol=2e-5)


@pytest.fixture(scope="module")
def scripted_checkpoint(tmp_path_factory):
    """A checkpoint that, after any prompt, writes `[THINK]Three plus four[/THINK]It is 7.</s>`:
    attention and FFN outputs are zeroed, so the logits depend on the current token only, and the
    output head maps each token of that script to the next one."""
    import torch

    directory = tmp_path_factory.mktemp("scripted")
    write_standin_tekken(directory / "tekken.json")
    tokenizer = load_tokenizer(directory)
    script = [
        tokenizer.encode_chat("x", None)[-1],  # [/INST], the last token of every prompt
        34,  # [THINK]
        *tokenizer.encode_completion("Three plus four", eos=False),
        35,  # [/THINK]
        *tokenizer.encode_completion("It is 7.", eos=False),
        tokenizer.eos_id,
    ]
    assert len(set(script)) == len(script)
    model = R.causal_lm(seed=6, vocab=131072, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, hidden=48)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for current, following in itertools.pairwise(script):
            head[following] = 12.0 * embed[current] / embed[current].norm()
    model.save_pretrained(directory)
    return directory


def test_json_splits_thinking_and_answer(scripted_checkpoint, capsys):
    out = _generate_here(capsys, "--checkpoint", scripted_checkpoint, "--prompt", "What is 3 + 4?",
                         "--temperature", 0, "--max-new-tokens", 20, "--dtype", "float32", "--json")  # fmt: skip
    (record,) = map(json.loads, out.splitlines())
    assert (record["thinking"], record["answer"], record["finish_reason"]) == ("Three plus four", "It is 7.", "stop")
    assert record["text"].startswith("[THINK]Three plus four[/THINK]It is 7.")


@pytest.mark.parametrize("chunk, cache", [(1, "contiguous"), (3, "paged")])
def test_streamed_text_is_the_final_text_written_once(scripted_checkpoint, capsys, chunk, cache):
    """Whatever the chunk size and the cache, the stream is each section's heading and its text,
    each byte written once (nothing rewritten), ending with a newline."""
    args = ["--temperature", 0.7, "--max-new-tokens", 20, "--dtype", "float32", "--chunk", chunk, "--cache", cache]
    out = _generate_here(capsys, "--checkpoint", scripted_checkpoint, "--prompt", "What is 3 + 4?", *args)
    assert out == "--- thinking ---\nThree plus four\n--- answer ---\nIt is 7.\n"
