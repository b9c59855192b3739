"""Conversion between the published layouts and Orbax: exactness, oracles and bad input.

Tiny checkpoints come from transformers (`save_pretrained`) and, for Mistral's layout, from
`hf_reference.save_mistral_consolidated`, which renames and permutes with the reference's own
formulas (independently of magistral_jax).
"""

import json
import os
import re
import signal
import stat
import subprocess
import sys

import hf_reference as R
import numpy as np
import pytest
import torch
from helpers import no_hang
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, Mistral3ForConditionalGeneration

import magistral_jax as mj
from magistral_jax.checkpoint import CheckpointError, NonFiniteWarning, convert, save_model

TEXT = dict(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=48)


def _tensors(directory):
    """name -> raw bytes of every tensor of every safetensors file in `directory`."""
    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            for name, value in load_file(os.path.join(directory, fname)).items():
                out[name] = (value.dtype, value.shape, value.tobytes())
    return out


def _inputs(vocab, seed=0):
    tokens, mask, positions = R.padded_batch(np.random.default_rng(seed), vocab)
    tokens[tokens == 10] = 11  # no image tokens: the text path only
    return tokens, mask, positions


def _assert_logits(ours, ref, mask):
    sel = mask.astype(bool)
    assert np.abs(np.asarray(ours)[sel] - ref[sel]).max() <= 1e-4 * np.abs(ref[sel]).max()


@pytest.fixture(scope="module")
def text_model():
    return R.causal_lm(seed=1, **TEXT)


@pytest.fixture(scope="module")
def vision_model():
    return R.mistral3(seed=2, **TEXT)


def test_mistral_layout_matches_transformers(tmp_path, text_model, vision_model):
    """A consolidated checkpoint written with the reference's permutation gives the reference's
    logits: the q/k RoPE permutation is undone in the right direction, for GQA too."""
    for name, model in (("text", text_model), ("vision", vision_model)):
        directory = tmp_path / name
        directory.mkdir()
        R.save_mistral_consolidated(model, directory)
        tokens, mask, positions = _inputs(TEXT["vocab"])
        ref = R.reference_logits(model, tokens, mask, positions)
        ours = mj.load_model(directory, dtype="float32").logits(tokens, mask=mask)
        _assert_logits(ours, ref, mask)


@pytest.mark.parametrize("kind", ["text-bf16", "vision-fp32"])
def test_hf_orbax_hf_round_trip_is_bit_exact(tmp_path, kind, text_model, vision_model):
    model = text_model if kind.startswith("text") else vision_model
    dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    model.to(dtype).save_pretrained(tmp_path / "hf")
    model.to(torch.float32)
    convert(tmp_path / "hf", tmp_path / "orbax", "orbax", progress=False)
    convert(tmp_path / "orbax", tmp_path / "back", "hf", progress=False)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name in original:
        assert original[name] == back[name], name


@pytest.mark.parametrize("kind", ["text-fp32", "vision-bf16"])
def test_mistral_hf_mistral_round_trip_is_bit_exact(tmp_path, kind, text_model, vision_model):
    model = vision_model if kind.startswith("vision") else text_model
    dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    (tmp_path / "mistral").mkdir()
    R.save_mistral_consolidated(model, tmp_path / "mistral", dtype=dtype)
    convert(tmp_path / "mistral", tmp_path / "hf", "hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "back", "mistral", progress=False)
    original, back = _tensors(tmp_path / "mistral"), _tensors(tmp_path / "back")
    n_vision = 2 + 9 + 4 if kind.startswith("vision") else 0
    assert original.keys() == back.keys() and len(original) == 3 + 2 * 9 + n_vision
    for name in original:
        assert original[name] == back[name], name
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert ("vision_encoder" in params) == kind.startswith("vision")


def test_hf_export_of_a_converted_model_loads_in_transformers(tmp_path, vision_model):
    """Mistral -> HF (sharded at a small size limit, with an index) -> transformers
    `from_pretrained`: the same logits as the original, vision weights included."""
    (tmp_path / "mistral").mkdir()
    R.save_mistral_consolidated(vision_model, tmp_path / "mistral")
    convert(tmp_path / "mistral", tmp_path / "hf", "hf", max_shard_bytes=30_000, progress=False)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    reloaded = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    for (name, a), (_, b) in zip(vision_model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokens, mask, positions = _inputs(TEXT["vocab"])
    _assert_logits(
        R.reference_logits(reloaded, tokens, mask, positions),
        R.reference_logits(vision_model, tokens, mask, positions),
        mask,
    )


def test_export_of_an_in_memory_model_loads_in_transformers(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    model = mj.load_model(tmp_path / "hf", dtype="float32")
    save_model(model, tmp_path / "export", "hf", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    tokens, mask, positions = _inputs(TEXT["vocab"], seed=3)
    _assert_logits(
        R.reference_logits(reloaded, tokens, mask, positions),
        R.reference_logits(text_model, tokens, mask, positions),
        mask,
    )


def test_orbax_restores_into_a_different_mesh(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "orbax", "orbax", mesh=mj.make_mesh(fsdp=8), progress=False)
    mesh = mj.make_mesh(data=2, fsdp=1, tensor=4)
    model = mj.load_model(tmp_path / "orbax", mesh=mesh, dtype="float32")
    wq = model.params["layers"]["wq"]  # [L, D, N, K]: heads over tensor=4, embed over fsdp=1
    assert wq.addressable_shards[0].data.shape == (2, 32, 1, 8)
    tokens, mask, positions = _inputs(TEXT["vocab"], seed=4)
    _assert_logits(model.logits(tokens, mask=mask), R.reference_logits(text_model, tokens, mask, positions), mask)


def test_dtype_cast_on_conversion(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "bf16", "mistral", dtype="bf16", progress=False)
    tensors = load_file(tmp_path / "bf16" / "consolidated.safetensors")
    assert tensors["tok_embeddings.weight"].dtype == np.dtype("bfloat16")
    expected = text_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(tensors["tok_embeddings.weight"].astype(np.float32), expected)


def test_side_files_travel_with_the_weights(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tekken.json").write_text("{}")
    (tmp_path / "hf" / "SYSTEM_PROMPT.txt").write_text("think")
    convert(tmp_path / "hf", tmp_path / "orbax", "orbax", progress=False)
    assert (tmp_path / "orbax" / "tekken.json").read_text() == "{}"
    assert (tmp_path / "orbax" / "SYSTEM_PROMPT.txt").read_text() == "think"


# --- bad input: a clear error naming file and tensor, and nothing at the destination -------------


def _edit(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def _add_extra(t):
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    return t


def _drop(t):
    del t["model.layers.1.self_attn.v_proj.weight"]
    return t


def _reshape(t):
    t["model.layers.1.mlp.down_proj.weight"] = np.zeros((32, 40), np.float32)
    return t


def _retype(t):
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
    return t


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:8] + b"\xff" * 16 + data[24:])


def _config_without(field):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        del cfg[field]
        (path / "config.json").write_text(json.dumps(cfg))

    return edit


BAD_INPUTS = {
    "extra tensor": (
        lambda p: _edit(p, _add_extra),
        r"model\.layers\.0\.self_attn\.q_norm\.weight: unexpected tensor in model\.safetensors",
    ),
    "missing tensor": (lambda p: _edit(p, _drop), r"model\.layers\.1\.self_attn\.v_proj\.weight: missing"),
    "shape": (
        lambda p: _edit(p, _reshape),
        r"model\.layers\.1\.mlp\.down_proj\.weight: shape \(32, 48\) expected, \(32, 40\) in model\.safetensors",
    ),
    "dtype": (
        lambda p: _edit(p, _retype),
        r"model\.norm\.weight: dtype float16 in model\.safetensors contradicts float32 of config\.json",
    ),
    "truncated": (_truncate, r"model\.safetensors: truncated: model\.\S+ ends at byte \d+, the file has \d+"),
    "corrupted header": (_corrupt, r"model\.safetensors: cannot read the safetensors header"),
    "config field": (
        _config_without("num_hidden_layers"),
        r"config\.json: num_hidden_layers: required field is missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_and_tensor_and_writes_nothing(tmp_path, text_model, case):
    text_model.save_pretrained(tmp_path / "hf")
    edit, message = BAD_INPUTS[case]
    edit(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=message):
        convert(tmp_path / "hf", tmp_path / "out", "orbax", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_destination_is_refused_and_untouched(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="destination exists"):
        convert(tmp_path / "hf", tmp_path / "out", "mistral", progress=False)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_a_failure_midway_leaves_nothing(tmp_path, text_model, monkeypatch):
    from magistral_jax.checkpoint import reader

    text_model.save_pretrained(tmp_path / "hf")
    calls = []

    def failing_read(self, key, index):
        calls.append(key)
        if len(calls) > 5:
            raise OSError("disk went away")
        return original(self, key, index)

    original = reader.SafetensorsSource.read
    monkeypatch.setattr(reader.SafetensorsSource, "read", failing_read)
    for to in ("hf", "orbax"):
        calls.clear()
        with pytest.raises(OSError, match="disk went away"):
            convert(tmp_path / "hf", tmp_path / "out", to, progress=False)
        assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_convert_command(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "magistral_jax", "convert", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    out = run(str(tmp_path / "hf"), str(tmp_path / "m"), "--to", "mistral")
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"consolidated.safetensors", "params.json"} <= set(os.listdir(tmp_path / "m"))
    assert "21/21 tensors" in out.stderr and "B/s" in out.stderr  # the progress bar: bytes and tensors
    again = run(str(tmp_path / "hf"), str(tmp_path / "m"), "--to", "mistral")
    assert again.returncode != 0 and "destination exists" in again.stderr
    bad = run(str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "hf")
    assert bad.returncode != 0 and "not a directory" in bad.stderr
    forced = run(str(tmp_path / "hf"), str(tmp_path / "y"), "--to", "hf", "--from", "mistral")
    assert forced.returncode != 0 and "params.json is missing" in forced.stderr


# --- destinations: permissions, partial directories of killed conversions, symbolic links ---------


def _modes(directory):
    """{relative path: permission bits} of a directory tree, the directory itself as "."."""
    out = {".": stat.S_IMODE(os.stat(directory).st_mode)}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_the_umask(tmp_path, text_model, umask):
    text_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tekken.json").write_text("{}")
    os.chmod(tmp_path / "hf" / "tekken.json", 0o600)  # the source's own mode must not travel
    previous = os.umask(umask)
    try:
        convert(tmp_path / "hf", tmp_path / "orbax", "orbax", progress=False)
        save_model(mj.load_model(tmp_path / "hf", dtype="float32"), tmp_path / "export", "mistral", progress=False)
    finally:
        os.umask(previous)
    for out in ("orbax", "export"):
        for name, mode in _modes(tmp_path / out).items():
            is_dir = os.path.isdir(tmp_path / out / name)
            assert mode == (0o777 if is_dir else 0o666) & ~umask, (out, name, oct(mode))


_KILLED_CONVERT = """
import sys, time
from magistral_jax.checkpoint import convert, reader

def stall(self, key, index):
    print("writing", flush=True)
    time.sleep(300)

reader.SafetensorsSource.read = stall
convert(sys.argv[1], sys.argv[2], "mistral", progress=False)
"""


def test_a_killed_conversion_leaves_a_named_partial_that_the_next_one_removes(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONVERT, str(tmp_path / "hf"), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert killed.stdout.readline() == b"writing\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (partial,) = [name for name in os.listdir(tmp_path) if name.startswith(".out.partial-")]
    assert partial.split("-")[-2] == str(killed.pid)
    # A live conversion's directory (here: of a process that sleeps) must survive the clean-up.
    live = subprocess.Popen(["sleep", "60"])
    try:
        alive = f".other.partial-{partial.split('.partial-')[1].rsplit('-', 2)[0]}-{live.pid}-0123abcd"
        (tmp_path / alive).mkdir()
        convert(tmp_path / "hf", tmp_path / "out", "mistral", progress=False)
        assert sorted(os.listdir(tmp_path)) == sorted(["hf", "out", alive])
    finally:
        live.kill()
        live.wait()


def test_dangling_or_looping_symbolic_link_destinations_are_refused_before_any_work(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "parent")
    cases = {
        "dangling": "destination is a dangling symbolic link",
        "loop": "destination is a symbolic link loop",
        "parent/out": "is a dangling symbolic link",
        "loop/out": "Too many levels of symbolic links",
    }
    for dst, message in cases.items():
        # The source does not even exist: the destination is checked first.
        with pytest.raises(CheckpointError, match=re.escape(message)):
            convert(tmp_path / "no-source", tmp_path / dst, "hf", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "loop", "parent"]


def test_a_fifo_among_the_side_files_is_refused_not_waited_on(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")
    os.mkfifo(tmp_path / "hf" / "tekken.json")
    with no_hang(30), pytest.raises(CheckpointError, match=r"tekken\.json: not a regular file"):
        convert(tmp_path / "hf", tmp_path / "out", "mistral", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_nan_and_inf_weights_convert_with_a_warning_naming_the_tensors(tmp_path, text_model):
    text_model.save_pretrained(tmp_path / "hf")

    def poison(t):
        t["model.norm.weight"] = t["model.norm.weight"].copy()
        t["model.norm.weight"][:3] = [np.nan, np.inf, -np.inf]
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"].copy()
        t["model.layers.1.self_attn.k_proj.weight"][2, 2] = np.nan
        return t

    _edit(tmp_path / "hf", poison)
    for to in ("mistral", "orbax"):
        with pytest.warns(NonFiniteWarning) as caught:
            convert(tmp_path / "hf", tmp_path / to, to, progress=False)
        (warning,) = caught
        assert "NaN or Inf in 2 tensors" in str(warning.message)
        assert "model.layers.1.self_attn.k_proj.weight (1 values)" in str(warning.message)
        assert "model.norm.weight (3 values)" in str(warning.message)
    back = load_file(tmp_path / "mistral" / "consolidated.safetensors")["norm.weight"]
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf  # copied as they are


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_nonfinite_values_are_counted_in_every_float_type(dtype):
    from magistral_jax.checkpoint.convert import count_nonfinite

    dtype = np.dtype(dtype)
    block = np.linspace(-3, 3, 60).astype(dtype).reshape(6, 10)
    assert count_nonfinite(block) == 0
    # The largest finite values (whose sum overflows) and a zero-size block are finite.
    assert count_nonfinite(np.full(9, np.finfo(dtype).max, dtype)) == 0 and count_nonfinite(block[:0]) == 0
    for value in (np.nan, np.inf, -np.inf):  # each alone: the fast pass must see every one
        alone = block.copy()
        alone[4, 7] = value
        assert count_nonfinite(alone) == 1, value
    block[0, 1], block[2, 2], block[5, 9] = np.nan, np.inf, -np.inf
    assert count_nonfinite(block) == 3
