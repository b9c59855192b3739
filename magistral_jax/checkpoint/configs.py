"""Checkpoint configs: the Hugging Face, Mistral and magistral-jax config files, read and written,
and which format a checkpoint directory holds.

Readers (checkpoint configs are untrusted input: a wrong type, a zero head count or a FIFO in place
of the file is a `ConfigError` naming the file and the field, never a traceback or a hang):
- `from_hf_config(dict)` reads a Hugging Face `config.json` of `MistralForCausalLM` (flat) or
  `Mistral3ForConditionalGeneration` (`text_config` / `vision_config` nesting), with the field
  names of transformers 4.x (`rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`).
- `from_mistral_params(dict)` reads a Mistral `params.json` (`dim`, `n_layers`, ...,
  optional `vision_encoder`).
- `from_architecture_dict(dict)` reads this project's `magistral_config.json`.
- `read_config(path)` reads any of them from a file or a checkpoint directory, and the project's
  YAML model configs (`config.read_yaml_config`).

Writers: `to_hf_config`, `to_mistral_params`, `architecture_dict`.

A checkpoint's format is told by its config file, in one place (`checkpoint_format`, used by
`read_config` and `reader.open_checkpoint`): `magistral_config.json` (orbax), else `config.json`
(hf), else `params.json` (mistral).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from magistral_jax.config import ModelConfig, TextConfig, VisionConfig, canonical_dtype, read_yaml_config
from magistral_jax.overrides import ConfigError, load_json, short_repr, typed_fields

# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is expected, got {short_repr(value)}")
    return value


def _get(d: dict[str, Any], key: str, where: str, default: Any = ..., kind: type | None = None) -> Any:
    """`d[key]` (or `default` when absent or null); `kind` int or float checks the type: JSON
    integers, or integral floats (`128.0`), for int; any finite number for float."""
    if key in d and d[key] is not None:
        value = d[key]
    elif default is ...:
        raise ConfigError(f"{where}{key}: required field is missing")
    else:
        return default
    if kind is None:
        return value
    ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        if ok_type and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if not ok_type or isinstance(value, float):
            raise ConfigError(f"{where}{key}: an integer is expected, got {short_repr(value)}")
        return value
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}{key}: a finite number is expected, got {short_repr(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{where}{key}: a finite number is expected, got {short_repr(value)}") from None


def _get_positive(d: dict[str, Any], key: str, where: str) -> int:
    # For the fields other defaults divide by (head_dim = dim // heads).
    value = _get(d, key, where, kind=int)
    if value <= 0:
        raise ConfigError(f"{where}{key}: a positive integer is expected, got {value}")
    return value


def _rope_theta(d: dict[str, Any], where: str, plain_type: str, default: float | None = None) -> float:
    # transformers 5.x: rope_parameters = {"rope_theta": ..., "rope_type": ...}; 4.x: rope_theta.
    key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(key)
    if params is not None:
        params = _mapping(params, f"{where}{key}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", plain_type):
            raise ConfigError(
                f"{where}rope_parameters.rope_type: {short_repr(rope_type)} is not supported; "
                f"expected {plain_type!r} (no scaling)"
            )
        if "rope_theta" in params:
            return _get(params, "rope_theta", f"{where}{key}.", kind=float)
    if d.get("rope_theta") is not None:
        return _get(d, "rope_theta", where, kind=float)
    if default is None:
        raise ConfigError(f"{where}rope_theta: required field is missing (nor rope_parameters.rope_theta)")
    return default


def _hf_text(d: dict[str, Any], where: str) -> TextConfig:
    if d.get("sliding_window") is not None:
        raise ConfigError(
            f"{where}sliding_window: {short_repr(d['sliding_window'])} is not supported; Mistral Small and Magistral "
            "use full attention on every layer (null)"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}hidden_act: {short_repr(act)}; the decoder's SwiGLU uses 'silu'")
    if d.get("tie_word_embeddings", False):
        raise ConfigError(f"{where}tie_word_embeddings: true; Mistral Small and Magistral have an untied output head")
    dim = _get_positive(d, "hidden_size", where)
    n_heads = _get_positive(d, "num_attention_heads", where)
    return TextConfig(
        vocab_size=_get(d, "vocab_size", where, kind=int),
        dim=dim,
        n_layers=_get(d, "num_hidden_layers", where, kind=int),
        n_heads=n_heads,
        n_kv_heads=_get(d, "num_key_value_heads", where, n_heads, kind=int),
        head_dim=_get(d, "head_dim", where, dim // n_heads, kind=int),
        hidden_dim=_get(d, "intermediate_size", where, kind=int),
        norm_eps=_get(d, "rms_norm_eps", where, kind=float),
        rope_theta=_rope_theta(d, where, "default"),
        max_position_embeddings=_get(d, "max_position_embeddings", where, 131072, kind=int),
    )


def _tower(d: dict[str, Any], where: str, image_key: str) -> dict[str, Any]:
    """The vision tower's sizes, named alike in HF's `vision_config` and Mistral's `vision_encoder`."""
    hidden = _get_positive(d, "hidden_size", where)
    heads = _get_positive(d, "num_attention_heads", where)
    return {
        "hidden_size": hidden,
        "n_layers": _get(d, "num_hidden_layers", where, kind=int),
        "n_heads": heads,
        "head_dim": _get(d, "head_dim", where, hidden // heads, kind=int),
        "intermediate_size": _get(d, "intermediate_size", where, kind=int),
        "patch_size": _get(d, "patch_size", where, kind=int),
        "image_size": _get(d, image_key, where, kind=int),
        "num_channels": _get(d, "num_channels", where, 3, kind=int),
    }


def _hf_vision(top: dict[str, Any], d: dict[str, Any], text_eps: float) -> VisionConfig:
    where = "vision_config."
    act = d.get("hidden_act", "gelu")
    if act != "silu":
        raise ConfigError(
            f"{where}hidden_act: {short_repr(act)}; the Pixtral encoder of Mistral Small uses a SiLU-gated FFN ('silu')"
        )
    proj_act = top.get("projector_hidden_act", "gelu")
    if proj_act != "gelu":
        raise ConfigError(f"projector_hidden_act: {short_repr(proj_act)}; the patch-merger projector uses exact 'gelu'")
    if top.get("multimodal_projector_bias", False):
        raise ConfigError("multimodal_projector_bias: true; the projector of Mistral Small has no biases")
    layer = top.get("vision_feature_layer", -1)
    if layer != -1:
        raise ConfigError(f"vision_feature_layer: {short_repr(layer)}; only -1 (the last layer) is supported")
    return VisionConfig(
        **_tower(d, where, "image_size"),
        rope_theta=_rope_theta(d, where, "axial", default=1e4),
        # HF's projector norm uses the text eps; the tower's own norms hard-code 1e-5.
        norm_eps=text_eps,
        spatial_merge_size=_get(top, "spatial_merge_size", "", 2, kind=int),
        image_token_id=_get(top, "image_token_index", "", 10, kind=int),
    )


def _checkpoint_dtype(d: dict[str, Any]) -> str:
    # transformers 5.x writes `dtype`, 4.x `torch_dtype`.
    name = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
    return canonical_dtype(name, "dtype")


def from_hf_config(d: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Reads a Hugging Face `config.json` dict (Mistral or Mistral3, transformers 4.x or 5.x).

    For `mistral3` the decoder comes from `text_config`; its `tie_word_embeddings` decides, never
    the top-level one, which `Mistral3Config` defaults to true although the checkpoints are untied.
    """
    model_type = d.get("model_type")
    if model_type == "mistral3" or "text_config" in d:
        text_d = d.get("text_config")
        if not isinstance(text_d, dict):
            raise ConfigError("text_config: required for a mistral3 config")
        text = _hf_text(text_d, "text_config.")
        vision_d = d.get("vision_config")
        vision = _hf_vision(d, _mapping(vision_d, "vision_config"), text.norm_eps) if vision_d else None
        dtype = _checkpoint_dtype(text_d) if ("dtype" in text_d or "torch_dtype" in text_d) else _checkpoint_dtype(d)
    elif model_type in ("mistral", None):
        text = _hf_text(d, "")
        vision = None
        dtype = _checkpoint_dtype(d)
    else:
        raise ConfigError(f"model_type: {short_repr(model_type)} is not supported; expected 'mistral' or 'mistral3'")
    return ModelConfig(name=name, text=text, vision=vision, param_dtype=dtype)


def from_mistral_params(d: dict[str, Any], name: str = "mistral") -> ModelConfig:
    """Reads a Mistral `params.json` dict (mistral-inference `TransformerArgs`)."""
    if d.get("moe"):
        raise ConfigError("moe: mixture-of-experts checkpoints are not supported")
    if d.get("sliding_window") is not None:
        raise ConfigError(f"sliding_window: {short_repr(d['sliding_window'])} is not supported (full attention only)")
    if d.get("tied_embeddings", False):
        raise ConfigError("tied_embeddings: true; Mistral Small and Magistral have an untied output head")
    act = d.get("activation", "silu")
    if act != "silu":
        raise ConfigError(f"activation: {short_repr(act)}; the decoder's SwiGLU uses 'silu'")
    dim = _get_positive(d, "dim", "")
    n_heads = _get_positive(d, "n_heads", "")
    max_len_key = "max_seq_len" if d.get("max_seq_len") else "max_position_embeddings"
    text = TextConfig(
        vocab_size=_get(d, "vocab_size", "", kind=int),
        dim=dim,
        n_layers=_get(d, "n_layers", "", kind=int),
        n_heads=n_heads,
        n_kv_heads=_get(d, "n_kv_heads", "", n_heads, kind=int),
        head_dim=_get(d, "head_dim", "", dim // n_heads, kind=int),
        hidden_dim=_get(d, "hidden_dim", "", kind=int),
        norm_eps=_get(d, "norm_eps", "", kind=float),
        # mistral-inference silently falls back to 1e6; a missing theta is an error here.
        rope_theta=_get(d, "rope_theta", "", kind=float),
        max_position_embeddings=_get(d, max_len_key, "", 131072, kind=int),
    )
    vision = None
    v = d.get("vision_encoder")
    if v:
        where = "vision_encoder."
        v = _mapping(v, "vision_encoder")
        if v.get("mm_projector_id", "patch_merge") != "patch_merge":
            raise ConfigError(f"{where}mm_projector_id: {short_repr(v['mm_projector_id'])}; expected 'patch_merge'")
        if not v.get("add_pre_mm_projector_layer_norm", True):
            raise ConfigError(f"{where}add_pre_mm_projector_layer_norm: false is not supported")
        if v.get("adapter_bias", False):
            raise ConfigError(f"{where}adapter_bias: true; the projector of Mistral Small has no biases")
        image_key = "max_image_size" if v.get("max_image_size") else "image_size"
        vision = VisionConfig(
            **_tower(v, where, image_key),
            rope_theta=_get(v, "rope_theta", where, 1e4, kind=float),
            spatial_merge_size=_get(v, "spatial_merge_size", where, 2, kind=int),
            image_token_id=_get(v, "image_token_id", where, 10, kind=int),
            image_break_token_id=_get(v, "image_break_token_id", where, 12, kind=int),
            image_end_token_id=_get(v, "image_end_token_id", where, 13, kind=int),
        )
    return ModelConfig(name=name, text=text, vision=vision)


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

MAGISTRAL_CONFIG = "magistral_config.json"


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `config.json` that transformers loads: `MistralForCausalLM` for a text-only model,
    `Mistral3ForConditionalGeneration` with vision. Both the 4.x (`rope_theta`, `torch_dtype`)
    and the 5.x (`dtype`) spellings are written; the top-level `tie_word_embeddings` is false."""
    t = cfg.text
    text = {
        "model_type": "mistral",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.hidden_dim,
        "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "sliding_window": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    dtypes = {"torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype}
    if cfg.vision is None:
        return {"architectures": ["MistralForCausalLM"], **text, **dtypes}
    v = cfg.vision
    vision = {
        "model_type": "pixtral",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads,
        "head_dim": v.head_dim,
        "intermediate_size": v.intermediate_size,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_channels": v.num_channels,
        "rope_theta": v.rope_theta,
        "hidden_act": "silu",
    }
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": v.image_token_id,
        "spatial_merge_size": v.spatial_merge_size,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        **dtypes,
    }


def to_mistral_params(cfg: ModelConfig) -> dict[str, Any]:
    """A `params.json` in mistral-inference's format."""
    t = cfg.text
    d: dict[str, Any] = {
        "dim": t.dim,
        "n_layers": t.n_layers,
        "head_dim": t.head_dim,
        "hidden_dim": t.hidden_dim,
        "n_heads": t.n_heads,
        "n_kv_heads": t.n_kv_heads,
        "rope_theta": t.rope_theta,
        "norm_eps": t.norm_eps,
        "vocab_size": t.vocab_size,
        "max_seq_len": t.max_position_embeddings,
    }
    if cfg.vision is not None:
        v = cfg.vision
        d["vision_encoder"] = {
            "hidden_size": v.hidden_size,
            "num_channels": v.num_channels,
            "max_image_size": v.image_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.n_layers,
            "num_attention_heads": v.n_heads,
            "head_dim": v.head_dim,
            "adapter_bias": False,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": v.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": True,
            "image_token_id": v.image_token_id,
            "image_break_token_id": v.image_break_token_id,
            "image_end_token_id": v.image_end_token_id,
        }
    return d


def architecture_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture part of a config (what a checkpoint needs), as plain JSON data."""
    return {
        "format": "magistral-jax",
        "version": 1,
        "name": cfg.name,
        "reasoning": cfg.reasoning,
        "param_dtype": cfg.param_dtype,
        "text": dataclasses.asdict(cfg.text),
        "vision": None if cfg.vision is None else dataclasses.asdict(cfg.vision),
    }


def from_architecture_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of `architecture_dict`."""
    if d.get("format") != "magistral-jax":
        raise ConfigError(f"format: {short_repr(d.get('format'))}; a magistral-jax model config is expected")
    for part in ("text", "vision"):
        if part not in d:
            raise ConfigError(f"{part}: required field is missing")
    known = {"format", "version", "name", "reasoning", "param_dtype", "text", "vision"}
    fields_ = typed_fields({k: v for k, v in d.items() if k not in ("format", "version") and k in known}, ModelConfig)
    try:
        text = TextConfig(**fields_["text"])
        vision = VisionConfig(**fields_["vision"]) if fields_["vision"] else None
    except TypeError as e:
        raise ConfigError(f"{MAGISTRAL_CONFIG}: {e}") from None
    return ModelConfig(
        name=fields_.get("name", "orbax"),
        text=text,
        vision=vision,
        reasoning=fields_.get("reasoning"),
        param_dtype=fields_.get("param_dtype", "bfloat16"),
    )


# --------------------------------------------------------------------------------------------
# Which format a checkpoint holds
# --------------------------------------------------------------------------------------------

# The config file of each checkpoint format, in order of precedence where a directory holds several.
CONFIG_FILES: dict[str, str] = {"orbax": MAGISTRAL_CONFIG, "hf": "config.json", "mistral": "params.json"}


def checkpoint_format(path: str | os.PathLike[str]) -> str | None:
    """The checkpoint format (`orbax`, `hf` or `mistral`) that `path` holds, told by its config file:
    a directory by the first of `CONFIG_FILES` it holds, a file by its name; None where neither tells."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return next((fmt for fmt, fname in CONFIG_FILES.items() if os.path.exists(os.path.join(path, fname))), None)
    return next((fmt for fmt, fname in CONFIG_FILES.items() if os.path.basename(path) == fname), None)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Reads a model config: `config.json` (HF), `params.json` (Mistral), `magistral_config.json`
    (this project's checkpoints) or a YAML model config, from a file or a checkpoint directory."""
    path = os.fspath(path)
    if path.endswith((".yaml", ".yml")):
        return read_yaml_config(path)
    fmt = checkpoint_format(path)
    if os.path.isdir(path):
        if fmt is None:
            raise ConfigError(
                f"{path}: none of {MAGISTRAL_CONFIG} (magistral-jax), config.json (Hugging Face) or "
                "params.json (Mistral) found"
            )
        path = os.path.join(path, CONFIG_FILES[fmt])
    d = load_json(path)
    if fmt is None:  # a config file under another name: its fields tell
        fmt = "orbax" if d.get("format") == "magistral-jax" else "mistral" if "n_layers" in d else "hf"
    label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    try:
        if fmt == "orbax":
            return from_architecture_dict(d)
        if fmt == "mistral":
            return from_mistral_params(d, name=label)
        return from_hf_config(d, name=label)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
