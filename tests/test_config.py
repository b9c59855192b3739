"""Presets and config readers against the published numbers (reference/architecture-and-checkpoints.md)."""

import json
import os
import re

import pytest
from helpers import no_hang

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
        (lambda t: t.update(hidden_size=0), "text_config.hidden_size: a positive integer is expected"),
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
    with pytest.raises(ConfigError, match=r"text\.n_layer: unknown key"):
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
    with pytest.raises(ConfigError, match=r"run\.yaml: text\.n_layer: unknown key"):
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


# --- typed overrides and YAML values (one parser for run and model configs) ----------------------

GRPO_TINY = os.path.join(CONFIGS, "grpo-tiny.yaml")


def test_run_config_overrides_take_their_fields_types():
    from magistral_jax.train.config import load_run_config

    cfg = load_run_config(
        GRPO_TINY,
        [
            "optimizer.lr=1e-3",
            "grpo.eps_low=0.15",
            "async_rl.slots=12",
            "async_rl.enabled=false",
            "model_overrides.text.n_layers=3",
            "model_overrides.text.norm_eps=2e-6",
            "model_overrides.remat=full",
            "data.path=problems.jsonl",
            "data.budget=[8, 32]",
            "reward.l_max=1e4",
            "tokenizer=null",
            "run_dir=2024",
        ],
    )
    assert cfg.optimizer.lr == 0.001 and type(cfg.optimizer.lr) is float
    assert cfg.grpo.eps_low == 0.15 and cfg.async_rl.slots == 12 and cfg.async_rl.enabled is False
    assert cfg.model_overrides == {"text": {"n_layers": 3, "norm_eps": 2e-6}, "remat": "full"}
    # Free-form sections keep what the YAML and the command line say, numbers as numbers.
    assert cfg.data["path"] == "problems.jsonl" and cfg.data["budget"] == [8, 32] and cfg.data["low"] == 3
    assert cfg.reward == {"name": "token_frequency", "token": 7, "l_max": 10000.0}
    assert cfg.tokenizer is None and cfg.run_dir == "2024"
    model = mj.get_preset("tiny").replace(**mj.config.flatten_model_fields(cfg.model_overrides))
    assert (model.text.n_layers, model.text.norm_eps) == (3, 2e-6)


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as a string; every other YAML reader and every user, a float.
    from magistral_jax.train.config import load_run_config

    run = tmp_path / "run.yaml"
    run.write_text(
        "kind: sft\noptimizer: {lr: 1e-3, eps: 1E-8}\ngrpo: {eps_high: .3}\nsteps: 1e3\n"
        "reward: {name: magistral, l_max: 4e3, tag: '1e3'}\n"
    )
    cfg = load_run_config(str(run))
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.grpo.eps_high, cfg.steps) == (1e-3, 1e-8, 0.3, 1000)
    # Free-form sections have no field types to convert to: the YAML reading itself must be right.
    assert cfg.reward == {"name": "magistral", "l_max": 4000.0, "tag": "1e3"}
    model = tmp_path / "model.yaml"
    model.write_text("preset: tiny\ntext: {norm_eps: 1e-6, rope_theta: 1e6}\n")
    assert (mj.read_config(model).text.norm_eps, mj.read_config(model).text.rope_theta) == (1e-6, 1e6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grpo.group_size=abc", r"grpo\.group_size: an integer is expected, got 'abc'"),
        ("grpo.eps_low=abc", r"grpo\.eps_low: a finite number is expected, got 'abc'"),
        ("sft.batch_size=abc", r"sft\.batch_size: an integer is expected, got 'abc'"),
        ("sft.batch_size=0", r"sft\.batch_size: a positive integer is expected, got 0"),
        ("steps=true", r"steps: an integer is expected, got 'true'"),
        ("steps=2.5", r"steps: an integer is expected, got '2\.5'"),
        ("optimizer.lr=nan", r"optimizer\.lr: a finite number is expected, got 'nan'"),
        ("grpo.temperature=inf", r"grpo\.temperature: a finite number is expected, got 'inf'"),
        ("async_rl.enabled=maybe", r"async_rl\.enabled: true or false is expected, got 'maybe'"),
        ("model_overrides.text.n_layers=two", r"model_overrides\.text\.n_layers: an integer is expected"),
        ("model_overrides.remat=most", r"model_overrides\.remat: one of none, full, save_matmuls, save_qkv"),
        ("model_overrides.text.n_layer=2", r"model_overrides\.text\.n_layer: unknown key"),
        ("grpo=4", r"grpo: a mapping is expected, got '4'"),
        ("steps.every=4", r"override 'steps\.every=4': steps is not a section"),
        # Found by the fuzz test: integers beyond 64 bits overflowed float arithmetic in validation.
        ("grpo.prompts_per_step=1e308", r"grpo\.prompts_per_step: '1e308' is out of range \(64-bit integers\)"),
        (f"grpo.group_size={10**400}", r"grpo\.group_size: '1000+\.\.\. is out of range"),
    ],
)
def test_bad_overrides_name_the_key_and_the_type(override, message):
    from magistral_jax.train.config import load_run_config

    with pytest.raises(ConfigError, match=message):
        load_run_config(GRPO_TINY, [override])


def test_async_slots_are_bounded_only_where_generation_is_asynchronous():
    from magistral_jax.train.config import load_run_config

    # grpo-tiny: 8 prompts x 8 samples a step, max_async_ratio 2: at most 128 sequences in flight.
    with pytest.raises(ConfigError, match=r"async_rl\.slots: 129 sequences in flight exceed .* 2\.0 x 64"):
        load_run_config(GRPO_TINY, ["async_rl.enabled=true", "async_rl.slots=129"])
    assert load_run_config(GRPO_TINY, ["async_rl.enabled=true", "async_rl.slots=128"]).async_rl.slots == 128
    # A synchronous run of an asynchronous recipe leaves its generator settings unused.
    assert load_run_config(GRPO_TINY, ["async_rl.enabled=false", "async_rl.slots=129"]).async_rl.slots == 129


def test_model_overrides_are_typed_the_same_way():
    cfg = apply_overrides(
        mj.get_preset("tiny"), ["text.rope_theta=1e6", "rules=[[vocab, tensor], [embed, [fsdp, data]]]"]
    )
    assert cfg.text.rope_theta == 1e6 and type(cfg.text.rope_theta) is float
    assert cfg.rules == (("vocab", "tensor"), ("embed", ("fsdp", "data")))
    with pytest.raises(ConfigError, match=r"text\.n_heads: an integer is expected, got 'four'"):
        apply_overrides(cfg, ["text.n_heads=four"])
    with pytest.raises(ConfigError, match="rules: logical axis 'vocab' appears twice"):
        apply_overrides(cfg, ["rules=[[vocab, tensor], [vocab, fsdp]]"])


def test_a_bad_override_fails_before_anything_is_built(monkeypatch, capsys):
    # `train sft sft.batch_size=0` used to fail only after the model was built.
    from magistral_jax.cli import main
    from magistral_jax.train import loop

    def build(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(loop, "run", build)
    assert main(["train", "sft", "--config", os.path.join(CONFIGS, "sft-tiny.yaml"), "sft.batch_size=0"]) == 1
    assert "sft.batch_size: a positive integer is expected, got 0" in capsys.readouterr().err


def _readme_override_examples() -> list[tuple[str, str | None, list[str]]]:
    """(kind, config file, overrides) of every override example of the README: the `KEY=VALUE`
    arguments of its `magistral-jax train` commands (continued lines joined, shell quoting
    undone), and `("model", None, ...)` for the strings given to `apply_overrides`."""
    import re
    import shlex

    from helpers import ROOT, readme_blocks

    root = ROOT
    readme = open(os.path.join(root, "README.md")).read()
    examples = []
    for block in readme_blocks("bash"):
        for command in block.text.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words[:2] != ["magistral-jax", "train"]:
                continue
            config = words[words.index("--config") + 1] if "--config" in words else None
            config = config if config and os.path.exists(os.path.join(root, config)) else None
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            examples.append((words[2], config and os.path.join(root, config), overrides))
    for call in re.findall(r"apply_overrides\(cfg, \[(.*?)\]\)", readme):
        examples.append(("model", None, re.findall(r"\"([^\"]+)\"", call)))
    return examples


def _help_override_examples() -> list[str]:
    """The `KEY=VALUE` examples in the `--help` texts of the commands that take overrides (their
    descriptions and the overrides' own help; an option's value, `--mesh data=1,fsdp=2` or
    `--field problem=question`, is no override)."""
    import re

    from magistral_jax.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    texts = []
    for command in sub.choices.values():
        positionals = [a for a in command._actions if a.dest == "overrides"]
        if positionals:
            texts += [command.description or "", *(a.help or "" for a in positionals)]
    return [m for t in texts for m in re.findall(r"(?<![\w.=,-])[a-z_]+(?:\.[a-z_]+)*=[^\s,;)]+", t)]


def test_every_documented_override_example_parses():
    from magistral_jax.train.config import load_run_config

    readme = _readme_override_examples()
    run_examples = [e for e in readme if e[0] != "model"]
    # The README's quick examples and its recipe chain (over continued lines) are among them.
    assert ["steps=50", "optimizer.lr=1e-3"] in [o for _, _, o in run_examples]
    assert sum(len(o) for _, _, o in run_examples) >= 30 and any(e[0] == "model" for e in readme)
    for kind, config, overrides in readme:
        if kind == "model":
            apply_overrides(mj.get_preset("tiny"), overrides)
            continue
        cfg = load_run_config(config, overrides, kind=kind)
        for item in overrides:  # each value arrived with its field's type
            key, _, text = item.partition("=")
            node = cfg
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            if isinstance(node, float):
                assert node == float(text), item
    in_help = _help_override_examples()
    assert {"optimizer.lr=1e-5", "grpo.group_size=16", "steps=20"} <= set(in_help), in_help
    cfg = load_run_config(None, in_help, kind="grpo")
    assert (cfg.optimizer.lr, cfg.grpo.group_size, cfg.steps) == (1e-5, 16, 20)


# --- hostile checkpoint configs: one-line errors naming the file and the field --------------------


@pytest.mark.parametrize(
    ("fname", "edit", "message"),
    [
        ("config.json", lambda d: d["text_config"].update(num_attention_heads=0), "num_attention_heads: a positive"),
        ("config.json", lambda d: d["text_config"].update(hidden_size="5120"), "hidden_size: an integer is expected"),
        ("config.json", lambda d: d["text_config"].update(num_hidden_layers=[40]), "num_hidden_layers: an integer"),
        ("config.json", lambda d: d["text_config"].update(vocab_size=True), "vocab_size: an integer is expected"),
        ("config.json", lambda d: d["text_config"].update(rms_norm_eps=float("nan")), "rms_norm_eps: a finite"),
        ("config.json", lambda d: d["text_config"].update(rope_theta=1e400), "rope_theta: a finite number"),
        ("config.json", lambda d: d["text_config"].update(head_dim=2**40), r"text\.head_dim: \d+ is too large"),
        ("config.json", lambda d: d["text_config"].update(rope_parameters=[1]), "rope_parameters: a mapping"),
        ("config.json", lambda d: d.update(vision_config=[1, 2]), "vision_config: a mapping is expected"),
        ("params.json", lambda d: d.update(n_heads=0), "n_heads: a positive integer is expected"),
        ("params.json", lambda d: d.update(vision_encoder="yes"), "vision_encoder: a mapping is expected"),
        ("params.json", lambda d: d["vision_encoder"].update(num_attention_heads=0), "num_attention_heads: a pos"),
    ],
)
def test_hostile_checkpoint_configs_name_file_and_field(tmp_path, fname, edit, message):
    d = json.loads(json.dumps(HF_4X_MISTRAL3 if fname == "config.json" else MISTRAL_PARAMS_2509))
    edit(d)
    path = tmp_path / fname
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: .*{message}"):
        mj.read_config(path)


def test_json_nested_too_deeply_or_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not valid JSON"):
        mj.read_config(path)
    path.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not valid UTF-8"):
        mj.read_config(path)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("kind: sft\nsft: " + "[" * 50_000 + "]" * 50_000 + "\n")
    from magistral_jax.train.config import load_run_config

    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML"):
        load_run_config(str(yaml_path))


def test_a_fifo_in_place_of_a_config_is_refused_not_waited_on(tmp_path):
    for fname in ("config.json", "run.yaml"):
        path = tmp_path / fname
        os.mkfifo(path)
        with no_hang(5):
            with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not a regular file"):
                mj.read_config(path)
