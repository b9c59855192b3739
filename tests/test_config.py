"""Presets and config readers against the published numbers (reference/architecture-and-checkpoints.md)."""

import json
import os

import pytest

import magistral_jax as mj
from magistral_jax.config import ConfigError, apply_overrides

# Mistral-Small-3.1-24B-Instruct-2503 config.json as written by transformers 4.50 (values from the
# hub page cited in the reference; vision part as in transformers-5 re-saves).
HF_4X_MISTRAL3 = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "image_size": 1540,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "pixtral",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "rope_theta": 10000.0,
    },
    "vision_feature_layer": -1,
}


def _hf_5x():
    """The same model as transformers 5.x writes it: rope_parameters, dtype, and the top-level
    tie_word_embeddings default (true) that does not apply to the decoder."""
    d = json.loads(json.dumps(HF_4X_MISTRAL3))
    text = d["text_config"]
    text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), "rope_type": "default"}
    text["tie_word_embeddings"] = False
    vision = d["vision_config"]
    vision["rope_parameters"] = {"rope_theta": vision.pop("rope_theta"), "rope_type": "axial"}
    d["dtype"] = d.pop("torch_dtype")
    d["tie_word_embeddings"] = True
    d["transformers_version"] = "5.24.0"
    return d


MISTRAL_PARAMS_2509 = {
    "dim": 5120,
    "n_layers": 40,
    "head_dim": 128,
    "hidden_dim": 32768,
    "n_heads": 32,
    "n_kv_heads": 8,
    "rope_theta": 1000000000.0,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
    "vision_encoder": {
        "hidden_size": 1024,
        "num_channels": 3,
        "max_image_size": 1540,
        "patch_size": 14,
        "rope_theta": 10000.0,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "adapter_bias": False,
        "mm_projector_id": "patch_merge",
        "spatial_merge_size": 2,
        "add_pre_mm_projector_layer_norm": True,
        "image_token_id": 10,
        "image_break_token_id": 12,
        "image_end_token_id": 13,
        "image_size": 1540,
    },
}


def test_presets_carry_the_published_numbers():
    names = [
        "mistral-small-3.1-24b",
        "mistral-small-3.2-24b",
        "magistral-small-2506",
        "magistral-small-2507",
        "magistral-small-2509",
    ]
    for name in names:
        text = mj.get_preset(name).text
        assert (text.dim, text.n_layers, text.n_heads, text.n_kv_heads, text.head_dim) == (5120, 40, 32, 8, 128)
        assert (text.hidden_dim, text.vocab_size, text.rope_theta, text.norm_eps) == (32768, 131072, 1e9, 1e-5)
    with_vision = {n for n in names if mj.get_preset(n).vision is not None}
    assert with_vision == {"mistral-small-3.1-24b", "mistral-small-3.2-24b", "magistral-small-2509"}
    v = mj.get_preset("magistral-small-2509").vision
    assert (v.hidden_size, v.n_layers, v.n_heads, v.head_dim, v.intermediate_size) == (1024, 24, 16, 64, 4096)
    assert (v.patch_size, v.image_size, v.rope_theta, v.spatial_merge_size) == (14, 1540, 1e4, 2)
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)
    assert mj.get_preset("magistral-small-2506").reasoning == "think_tags"
    assert mj.get_preset("magistral-small-2507").reasoning == "think_tokens"
    assert mj.get_preset("mistral-small-3.1-24b").reasoning is None
    assert mj.get_preset("magistral-small-2509").param_dtype == "bfloat16"


def test_unknown_preset_names_the_close_match():
    with pytest.raises(ConfigError, match=r"unknown preset 'magistral-small-2590'.*'magistral-small-2509'"):
        mj.get_preset("magistral-small-2590")


@pytest.mark.parametrize("variant", ["4.x", "5.x"])
def test_hf_config_readers_give_the_preset(variant):
    d = HF_4X_MISTRAL3 if variant == "4.x" else _hf_5x()
    cfg = mj.from_hf_config(d)
    preset = mj.get_preset("mistral-small-3.1-24b")
    assert cfg.text == preset.text
    assert cfg.vision == preset.vision
    assert cfg.param_dtype == "bfloat16"


def test_text_only_hf_config():
    d = dict(HF_4X_MISTRAL3["text_config"], architectures=["MistralForCausalLM"], torch_dtype="float32")
    cfg = mj.from_hf_config(d)
    assert cfg.text == mj.get_preset("magistral-small-2507").text
    assert cfg.vision is None and cfg.param_dtype == "float32"


def test_head_dim_defaults_to_dim_over_heads():
    d = dict(HF_4X_MISTRAL3["text_config"])
    del d["head_dim"]
    assert mj.from_hf_config(d).text.head_dim == 160


def test_decoder_level_tied_embeddings_are_refused():
    d = _hf_5x()
    d["text_config"]["tie_word_embeddings"] = True
    with pytest.raises(ConfigError, match=r"text_config\.tie_word_embeddings"):
        mj.from_hf_config(d)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t.pop("num_hidden_layers"), "text_config.num_hidden_layers: required field is missing"),
        (lambda t: t.update(num_key_value_heads=3), r"text.n_kv_heads: 3 must divide text.n_heads \(32\)"),
        (lambda t: t.update(sliding_window=4096), "text_config.sliding_window: 4096 is not supported"),
        (lambda t: t.update(hidden_act="gelu"), "text_config.hidden_act"),
        (lambda t: t.update(hidden_size=0), "text.dim: a positive integer is expected"),
        (lambda t: t.pop("rope_theta"), "text_config.rope_theta: required field is missing"),
        (lambda t: t.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type: 'yarn'"),
    ],
)
def test_inconsistent_hf_config_names_the_field(edit, field):
    d = json.loads(json.dumps(HF_4X_MISTRAL3))
    edit(d["text_config"])
    with pytest.raises(ConfigError, match=field):
        mj.from_hf_config(d)


def test_vision_config_checks():
    d = json.loads(json.dumps(HF_4X_MISTRAL3))
    d["vision_config"]["hidden_act"] = "gelu"  # PixtralVisionConfig's default, not the checkpoint's
    with pytest.raises(ConfigError, match=r"vision_config\.hidden_act"):
        mj.from_hf_config(d)
    d = json.loads(json.dumps(HF_4X_MISTRAL3))
    d["model_type"] = "llava"
    del d["text_config"]
    with pytest.raises(ConfigError, match="model_type: 'llava'"):
        mj.from_hf_config(d)


def test_mistral_params_reader_gives_the_2509_preset():
    cfg = mj.from_mistral_params(MISTRAL_PARAMS_2509)
    preset = mj.get_preset("magistral-small-2509")
    assert cfg.text == preset.text
    assert cfg.vision == preset.vision


def test_mistral_params_without_rope_theta_is_an_error():
    # mistral-inference would silently use 1e6; the model needs 1e9.
    d = {k: v for k, v in MISTRAL_PARAMS_2509.items() if k != "rope_theta"}
    with pytest.raises(ConfigError, match="rope_theta: required field is missing"):
        mj.from_mistral_params(d)


def test_read_config_from_directory(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(MISTRAL_PARAMS_2509))
    assert mj.read_config(tmp_path).text == mj.get_preset("magistral-small-2509").text
    (tmp_path / "config.json").write_text(json.dumps(HF_4X_MISTRAL3))
    assert mj.read_config(tmp_path).vision == mj.get_preset("mistral-small-3.1-24b").vision
    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match=r"none of magistral_config\.json"):
        mj.read_config(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        mj.read_config(tmp_path / "bad")


def test_replace_with_nested_fields_and_validation():
    cfg = mj.get_preset("magistral-small-2509").replace(**{"text.n_layers": 2, "remat": "save_qkv", "dtype": "fp32"})
    assert cfg.text.n_layers == 2 and cfg.remat == "save_qkv" and cfg.dtype == "float32"
    with pytest.raises(ConfigError, match="remat: 'some'"):
        cfg.replace(remat="some")
    with pytest.raises(ConfigError, match=r"text\.n_layer: unknown config field"):
        cfg.replace(**{"text.n_layer": 3})
    with pytest.raises(ConfigError, match="vision: this config has no vision part"):
        mj.get_preset("magistral-small-2507").replace(**{"vision.n_layers": 3})
    with pytest.raises(ConfigError, match="param_dtype: 'int8'"):
        cfg.replace(param_dtype="int8")


CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def test_shipped_yaml_configs():
    cfg = mj.read_config(os.path.join(CONFIGS, "magistral-small-2509.yaml"))
    assert cfg.text == mj.get_preset("magistral-small-2509").text
    assert (cfg.param_dtype, cfg.dtype, cfg.remat, cfg.attention, cfg.attention_block) == (
        "float32",
        "bfloat16",
        "full",
        "chunked",
        1024,
    )
    tiny = mj.read_config(os.path.join(CONFIGS, "tiny.yaml"))
    assert (tiny.text.n_heads, tiny.text.n_kv_heads, tiny.text.head_dim, tiny.text.dim) == (8, 2, 16, 64)
    assert tiny.remat == "save_matmuls"


def test_yaml_config_errors_name_file_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntext:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: text\.n_layer: unknown config field"):
        mj.read_config(path)
    path.write_text("remat: full\n")
    with pytest.raises(ConfigError, match="preset: required field is missing"):
        mj.read_config(path)


def test_command_line_overrides():
    cfg = apply_overrides(mj.get_preset("tiny"), ["text.n_layers=3", "remat=save_qkv", "text.norm_eps=1e-6"])
    assert (cfg.text.n_layers, cfg.remat, cfg.text.norm_eps) == (3, "save_qkv", 1e-6)
    with pytest.raises(ConfigError, match="KEY=VALUE expected"):
        apply_overrides(cfg, ["remat"])
    with pytest.raises(ConfigError, match=r"text\.n_layers: a positive integer is expected"):
        apply_overrides(cfg, ["text.n_layers=0"])
