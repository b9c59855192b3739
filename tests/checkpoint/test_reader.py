"""Opening checkpoints: the errors a bad checkpoint gives, and loading into a mesh."""

import json
import os
import re
import shutil

import hf_reference as R
import jax
import numpy as np
import pytest
from helpers import no_hang
from safetensors.numpy import load_file, save_file

import magistral_jax as mj
from magistral_jax.checkpoint import CheckpointError, convert

KW = dict(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=48)


@pytest.fixture()
def checkpoint(tmp_path):
    R.causal_lm(seed=0, **KW).save_pretrained(tmp_path)
    return tmp_path


def _edit(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_dtype_none_keeps_the_checkpoints_parameter_dtype_and_computes_in_bf16(checkpoint):
    """An fp32 checkpoint loaded with dtype=None: fp32 parameters, bf16 compute, hence exactly the
    logits of the same checkpoint loaded as bf16 (bf16 parameters and compute), and not fp32's."""
    kept = mj.load_model(checkpoint, dtype=None)
    assert {x.dtype for x in jax.tree.leaves(kept.params)} == {np.dtype("float32")}
    assert (kept.cfg.param_dtype, kept.cfg.dtype) == ("float32", "bfloat16")
    tokens = np.random.default_rng(1).integers(0, KW["vocab"], (2, 9))
    bf16 = mj.load_model(checkpoint, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype("bfloat16")}
    np.testing.assert_array_equal(np.asarray(kept.logits(tokens)), np.asarray(bf16.logits(tokens)))
    fp32 = np.asarray(mj.load_model(checkpoint, dtype="float32").logits(tokens))
    assert np.abs(np.asarray(kept.logits(tokens)) - fp32).max() > 1e-3 * np.abs(fp32).max()


def test_missing_tensor_is_named(checkpoint):
    _edit(checkpoint, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: missing"):
        mj.load_model(checkpoint)


def test_wrong_shape_names_tensor_expected_got_and_file(checkpoint):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
        return t

    _edit(checkpoint, shrink)
    message = "model.layers.0.self_attn.k_proj.weight: shape (16, 32) expected, (8, 32) in model.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        mj.load_model(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    def add(t):
        t["model.layers.2.input_layernorm.weight"] = np.ones(32, np.float32)
        return t

    _edit(checkpoint, add)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.input_layernorm\.weight: unexpected tensor"):
        mj.load_model(checkpoint)


def test_config_that_contradicts_the_weights(checkpoint):
    cfg_path = checkpoint / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 50
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight: shape \(50, 32\) expected, \(48, 32\)"):
        mj.load_model(checkpoint)


def test_corrupted_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the safetensors header"):
        mj.load_model(checkpoint)


def test_index_listing_a_missing_shard(checkpoint):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002\.safetensors: listed in model\.safetensors\.index\.json"
    ):
        mj.load_model(checkpoint)


def test_a_vision_config_over_text_only_weights_names_the_directory(checkpoint):
    # Found by the fuzz test: the layout's error named neither the directory nor the config.
    cfg = json.loads((checkpoint / "config.json").read_text())
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    mistral3 = {"model_type": "mistral3", "text_config": cfg, "projector_hidden_act": "gelu"}
    mistral3["vision_config"] = {**vision, "patch_size": 14, "image_size": 112, "hidden_act": "silu"}
    (checkpoint / "config.json").write_text(json.dumps(mistral3))
    message = f"{re.escape(str(checkpoint))}: the hf-text layout .* has no vision weights, but its config describes"
    with pytest.raises(CheckpointError, match=message):
        mj.load_model(checkpoint)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        mj.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="absent: not a directory"):
        mj.load_model(tmp_path / "absent")


def test_loads_onto_a_mesh_in_the_declared_shardings(checkpoint):
    mesh = mj.make_mesh(data=1, fsdp=2, tensor=2)
    model = mj.load_model(checkpoint, mesh=mesh, dtype="float32")
    wq = model.params["layers"]["wq"]  # [L, D, N, K]: embed over fsdp, heads over tensor
    assert tuple(wq.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    # The odd vocabulary (97) cannot be split over tensor=2 and stays replicated on that axis.
    assert model.params["embed"].addressable_shards[0].data.shape == (97, 16)


def test_index_whose_weight_map_is_not_a_mapping(checkpoint):
    index = checkpoint / "model.safetensors.index.json"
    for weight_map, message in (
        (["model.safetensors"], "weight_map is not a mapping of tensor names to file names"),
        ({"model.norm.weight": ["model.safetensors"]}, "weight_map is not a mapping of tensor names to file names"),
        ({"model.norm.weight": "../model.safetensors"}, "'../model.safetensors' is not a safetensors file name"),
    ):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: {re.escape(message)}"):
            mj.load_model(checkpoint)


@pytest.fixture(scope="module")
def orbax_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("orbax")
    R.causal_lm(seed=0, **KW).save_pretrained(directory / "hf")
    convert(directory / "hf", directory / "orbax", "orbax", progress=False)
    return directory / "orbax"


def test_relative_paths_to_an_orbax_checkpoint_work(orbax_checkpoint, tmp_path, monkeypatch):
    # Orbax's own API refuses relative paths ("Checkpoint path should be absolute").
    from magistral_jax.train.build import build_model
    from magistral_jax.train.config import load_run_config

    def weights(model):
        return [np.asarray(model.params["embed"]), np.asarray(model.params["layers"]["wq"])]

    expected = weights(mj.load_model(orbax_checkpoint, dtype="float32"))
    monkeypatch.chdir(orbax_checkpoint.parent)
    for got, want in zip(weights(mj.load_model("orbax", dtype="float32")), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.chdir(tmp_path)
    relative = os.path.join(os.pardir, orbax_checkpoint.parent.name, "orbax")
    convert(relative, "hf-back", "hf", progress=False)
    for got, want in zip(weights(mj.load_model("hf-back", dtype="float32")), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    model = build_model(load_run_config(None, ["kind=sft", f"init_from={relative}"]), None)
    for got, want in zip(weights(model), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_truncated_orbax_data_file_names_the_tensor(orbax_checkpoint, tmp_path):
    damaged = tmp_path / "orbax"
    shutil.copytree(orbax_checkpoint, damaged)
    data = max((p for p in damaged.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 3)
    with pytest.raises(CheckpointError, match=r": cannot be restored from the Orbax checkpoint in .*orbax/params"):
        mj.load_model(damaged)


def test_a_fifo_among_the_orbax_files_is_refused_not_waited_on(orbax_checkpoint, tmp_path):
    damaged = tmp_path / "orbax"
    shutil.copytree(orbax_checkpoint, damaged)
    data = max((p for p in damaged.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.unlink()
    os.mkfifo(data)
    with no_hang(10), pytest.raises(CheckpointError, match=f"{re.escape(str(data))}: not a regular file"):
        mj.load_model(damaged)


def _poison(directory, name, index):
    def edit(t):
        t[name] = t[name].copy()
        t[name][index] = np.nan
        return t

    _edit(directory, edit)


def test_nan_weights_are_refused_for_training_naming_the_tensor(checkpoint):
    from magistral_jax.train.build import build_model
    from magistral_jax.train.config import load_run_config

    _poison(checkpoint, "model.layers.1.mlp.up_proj.weight", (3, 5))
    model = mj.load_model(checkpoint, dtype="float32")  # inference: loaded as it is
    assert np.isnan(np.asarray(model.params["layers"]["w3"])).sum() == 1
    message = r"model\.layers\.1\.mlp\.up_proj\.weight: NaN or Inf values in model\.safetensors"
    with pytest.raises(CheckpointError, match=message):
        mj.load_model(checkpoint, check_finite=True)
    with pytest.raises(CheckpointError, match=message):
        build_model(load_run_config(None, ["kind=sft", f"init_from={checkpoint}"]), None)
