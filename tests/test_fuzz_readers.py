"""Fuzzing the readers of untrusted files: seeded random mutations of a valid safetensors file and
of valid configs (HF `config.json`, Mistral `params.json`, a YAML run config, a YAML model config).

Structural mutations change the parsed JSON / YAML (a value swapped for one of another type, huge
numbers, deep nesting, unicode, keys dropped or added), byte mutations change the file itself
(flipped bytes, truncation, inserted bytes). A reader must either load the file correctly or raise
the project's error type with a message naming the file; anything else (a `TypeError`, a
`RecursionError`, a `ZeroDivisionError`, ...) fails the test, showing the mutated input.
"""

import json
import os
import random

import hf_reference as R
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import magistral_jax as mj
from magistral_jax.checkpoint import CheckpointError, open_checkpoint
from magistral_jax.checkpoint.safetensors_io import SafetensorsFile
from magistral_jax.config import ConfigError
from magistral_jax.train.config import load_run_config

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
SEED = 1729


def _odd_values(rng: random.Random) -> list:
    return [
        None,
        True,
        False,
        0,
        -1,
        rng.randint(-(10**6), 10**6),
        2**31,
        2**64 + 1,
        10 ** rng.randint(20, 4000),
        -(10**40),
        1e308,
        -1e-308,
        0.5,
        float("nan"),
        float("inf"),
        -float("inf"),
        "",
        "abc",
        "1e-3",
        "ünïcödé \u202e \u0000 \U0001f600",
        "\ud800",  # a lone surrogate
        "x" * rng.randint(1000, 100_000),
        [],
        [1, "two", None],
        {},
        {"a": {"b": [1]}},
    ]


DEEP = "<deeply nested>"


def deepen(text: str) -> str:
    """`text` (JSON or YAML) with the `DEEP` marker replaced by 5000 nested lists."""
    return text.replace(json.dumps(DEEP), "[" * 5000 + "1" + "]" * 5000).replace(DEEP, "[" * 5000 + "]" * 5000)


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _set(value, path, new):
    if not path:
        return new
    node = value
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return value


def mutate_structure(value, rng: random.Random):
    """One or two structural mutations of a JSON-like value (of a copy)."""
    value = json.loads(json.dumps(value))
    kinds = [
        rng.choice(["swap", "swap", "swap", "deep", "drop", "add", "stringify"]) for _ in range(rng.choice([1, 2]))
    ]
    for kind in kinds[:1] + [k for k in kinds[1:] if k != "deep"]:  # one deep nesting at most
        value = _mutate_once(value, rng, kind)
    return value


def _mutate_once(value, rng: random.Random, kind: str):
    paths = [p for p in _paths(value) if len(p) < 20]  # not inside a nesting made before
    path = rng.choice(paths)
    if kind == "swap":
        return _set(value, path, rng.choice(_odd_values(rng)))
    if kind == "deep":
        # Deep enough for a RecursionError in a recursive reader, or just below Python's limit
        # (`deepen` writes the deepest ones as text: `json.dumps` itself would overflow).
        return _set(value, path, _nested(rng.choice([50, 400])) if rng.random() < 0.5 else DEEP)
    node = value
    for part in path[:-1]:
        node = node[part]
    target = node[path[-1]] if path else value
    if kind == "drop" and isinstance(target, dict) and target:
        del target[rng.choice(list(target))]
    elif kind == "add" and isinstance(target, dict):
        target[rng.choice(["extra", "\u00e9t\u00e9", "__metadata__", ""])] = rng.choice(_odd_values(rng))
    elif kind == "stringify" and path:
        _set(value, path, str(target))
    return value


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flipped, inserted or cut bytes."""
    data = bytearray(data)
    kind = rng.choice(["flip", "insert", "truncate"])
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        data[at:at] = rng.choice([b"\xff\xfe", b"\t", b"\x00", b"{", b"]", b":", "é".encode(), b"\n- ", b"&a *a"])
    else:
        del data[at:]
    return bytes(data)


def _check(read, describe, names):
    """Runs `read()`: a correct load or an error of the project naming one of `names`."""
    try:
        read()
    except (ConfigError, CheckpointError) as e:
        assert any(n in str(e) for n in names), f"the error names no file: {e}\n{describe()}"
    except Exception as e:  # everything else is a bug of the reader
        pytest.fail(f"{type(e).__name__}: {str(e)[:300]}\n{describe()}")


def _show(data) -> str:
    text = data if isinstance(data, str) else repr(data)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} characters)"


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("st")
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(2, 2, 3)).astype(np.float16),
        "c": rng.normal(size=(5,)).astype(np.float32),
    }
    save_file(tensors, directory / "good.safetensors", metadata={"format": "pt"})
    return (directory / "good.safetensors").read_bytes()


def test_safetensors_headers(safetensors_file, tmp_path):
    rng = random.Random(SEED)
    n = int.from_bytes(safetensors_file[:8], "little")
    header, data = json.loads(safetensors_file[8 : 8 + n]), safetensors_file[8 + n :]
    path = tmp_path / "fuzzed.safetensors"
    for case in range(300):
        if case % 3:
            raw = deepen(json.dumps(mutate_structure(header, rng))).encode()
            blob = len(raw).to_bytes(8, "little") + raw + data
        else:
            blob = mutate_bytes(safetensors_file, rng)
        path.write_bytes(blob)

        def read():
            f = SafetensorsFile(str(path))
            try:
                for name, (dtype, shape, _) in f.entries.items():
                    value = f.read(name)
                    assert value.shape == shape and value.dtype == dtype, name
                    if value.ndim:
                        index = tuple(slice(0, max(d // 2, 1)) for d in shape)
                        np.testing.assert_array_equal(f.read(name, index), value[index])
            finally:
                f.close()

        _check(read, lambda blob=blob, case=case: f"case {case}: {_show(blob[:2000])}", ["fuzzed.safetensors"])


HF_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 1e9, "rope_type": "default"},
    "max_position_embeddings": 4096,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "dtype": "float32",
}


def _mistral3_config():
    d = {k: v for k, v in HF_CONFIG.items() if k not in ("architectures", "dtype")}
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": d,
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,
            "patch_size": 14,
            "image_size": 112,
            "hidden_act": "silu",
            "rope_parameters": {"rope_theta": 1e4, "rope_type": "axial"},
        },
        "image_token_index": 10,
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "dtype": "bfloat16",
    }


MISTRAL_PARAMS = {
    "dim": 32,
    "n_layers": 2,
    "head_dim": 8,
    "hidden_dim": 48,
    "n_heads": 4,
    "n_kv_heads": 2,
    "rope_theta": 1e9,
    "norm_eps": 1e-5,
    "vocab_size": 97,
    "vision_encoder": {
        "hidden_size": 32,
        "num_channels": 3,
        "image_size": 112,
        "patch_size": 14,
        "rope_theta": 1e4,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    R.causal_lm(seed=0, vocab=97, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=48).save_pretrained(
        directory
    )
    return directory


def _text(value, rng: random.Random, as_yaml: bool) -> bytes:
    # JSON text is YAML too (flow style); block-style YAML for the YAML files most of the time.
    text = json.dumps(value) if not as_yaml or rng.random() < 0.3 else None
    if text is None:
        try:
            text = yaml.safe_dump(value, allow_unicode=True, sort_keys=False)
        except RecursionError:
            text = json.dumps(value)
    raw = deepen(text).encode("utf-8", "surrogatepass")
    return mutate_bytes(raw, rng) if rng.random() < 0.3 else raw


def test_configs(tmp_path, hf_checkpoint):
    rng = random.Random(SEED + 1)
    with open(os.path.join(CONFIGS, "grpo-tiny.yaml")) as f:
        run_config = yaml.safe_load(f)
    with open(os.path.join(CONFIGS, "tiny.yaml")) as f:
        model_config = yaml.safe_load(f)
    cases = [
        ("config.json", HF_CONFIG, mj.read_config),
        ("config.json", _mistral3_config(), mj.read_config),
        ("params.json", MISTRAL_PARAMS, mj.read_config),
        ("run.yaml", run_config, load_run_config),
        ("model.yaml", model_config, mj.read_config),
    ]
    for case in range(600):
        fname, base, reader = cases[case % len(cases)]
        raw = _text(mutate_structure(base, rng), rng, fname.endswith(".yaml"))
        path = tmp_path / fname
        path.write_bytes(raw)

        def describe(raw=raw, fname=fname, case=case):
            return f"case {case} ({fname}): {_show(raw.decode('utf-8', 'replace'))}"

        _check(lambda path=path, reader=reader: reader(str(path)), describe, [str(path)])
        if fname == "config.json" and case % 2 == 0:
            # The same config.json beside real weights: validation against the tensors.
            (hf_checkpoint / "config.json").write_bytes(raw)
            names = [str(hf_checkpoint), "config.json", "model.safetensors"]
            _check(lambda: open_checkpoint(hf_checkpoint), describe, names)
