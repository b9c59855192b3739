"""Which format a checkpoint directory holds: one decision for `read_config` and `open_checkpoint`."""

import json

import pytest

import magistral_jax as mj
from magistral_jax.checkpoint import CheckpointError
from magistral_jax.checkpoint.configs import (
    MAGISTRAL_CONFIG,
    architecture_dict,
    checkpoint_format,
    to_hf_config,
    to_mistral_params,
)
from magistral_jax.checkpoint.reader import open_checkpoint


def _tiny(n_layers: int):
    return mj.get_preset("tiny").replace(**{"text.n_layers": n_layers})


def test_the_config_file_tells_the_format_with_one_precedence_for_both_readers(tmp_path):
    # Each config file describes a different depth, so the config read tells which file was read;
    # the weights are missing, so the error of `open_checkpoint` tells which format it opened.
    (tmp_path / "params.json").write_text(json.dumps(to_mistral_params(_tiny(3))))
    assert checkpoint_format(tmp_path) == "mistral"
    assert mj.read_config(tmp_path).text.n_layers == 3
    with pytest.raises(CheckpointError, match=r"params\.json but no consolidated\*\.safetensors"):
        open_checkpoint(tmp_path)

    # A Hugging Face config.json beside it wins: HF directories often carry Mistral's files too.
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(_tiny(5))))
    assert checkpoint_format(tmp_path) == "hf"
    assert mj.read_config(tmp_path).text.n_layers == 5
    with pytest.raises(CheckpointError, match=r"config\.json but no model\*\.safetensors"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"params\.json but no consolidated"):
        open_checkpoint(tmp_path, layout="mistral")  # a forced format is not detected

    # This project's own conversion wins over both.
    (tmp_path / MAGISTRAL_CONFIG).write_text(json.dumps(architecture_dict(_tiny(7))))
    assert checkpoint_format(tmp_path) == "orbax"
    assert mj.read_config(tmp_path).text.n_layers == 7
    with pytest.raises(CheckpointError, match=rf"{MAGISTRAL_CONFIG} but no Orbax checkpoint in params/"):
        open_checkpoint(tmp_path)

    # A single file: its name tells, whatever the directory beside it holds.
    assert checkpoint_format(tmp_path / "params.json") == "mistral"
    assert mj.read_config(tmp_path / "params.json").text.n_layers == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint_format(empty) is None and checkpoint_format(tmp_path / "other.json") is None
