"""Model configurations: typed dataclasses, named presets, and readers for checkpoint configs.

A `ModelConfig` holds the architecture (`TextConfig`, optional `VisionConfig`) and how to run it
(parameter and compute dtypes, remat policy, attention implementation, sharding rules). Configs
are frozen and hashable, so they can be passed to `jax.jit` as static arguments.

Readers:
- `from_hf_config(dict)` reads a Hugging Face `config.json` of `MistralForCausalLM` (flat) or
  `Mistral3ForConditionalGeneration` (`text_config` / `vision_config` nesting), with the field
  names of transformers 4.x (`rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`).
- `from_mistral_params(dict)` reads a Mistral `params.json` (`dim`, `n_layers`, ...,
  optional `vision_encoder`).

- `read_config(path)` also reads the project's own YAML model configs (`configs/*.yaml`):
  `preset: NAME` plus field overrides, flat (`remat: full`) or nested (`text: {n_layers: 2}`).

`apply_overrides(cfg, ["text.n_layers=2", "remat=full"])` applies command-line `key=value` pairs.
Overrides and YAML values are typed by one parser (`typed_fields`, also used by the run configs
of `train.config`): each value becomes the type of the dataclass field it sets (`1e-3` a float,
`true` a bool, `abc` for an integer field an error naming the key and the type expected).
Every inconsistency raises `ConfigError` naming the offending field. Checkpoint configs are
untrusted input: a wrong type, a zero head count or a FIFO in place of the file is a
`ConfigError` naming the file and the field, never a traceback or a hang.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import functools
import json
import math
import os
import re
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from magistral_jax.sharding import DEFAULT_RULES, Rules, validate_rules

RematPolicy = Literal["none", "full", "save_matmuls", "save_qkv"]
AttentionImpl = Literal["auto", "xla", "cudnn", "chunked", "splash"]
ReasoningFormat = Literal["think_tokens", "think_tags"]

REMAT_POLICIES: tuple[str, ...] = ("none", "full", "save_matmuls", "save_qkv")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "chunked", "splash")
DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


def canonical_dtype(name: str, field_name: str = "dtype") -> str:
    """Returns the canonical dtype name for `name` (accepts bf16/fp32/... aliases)."""
    value = _DTYPE_ALIASES.get(str(name), str(name))
    if value not in DTYPES:
        raise ConfigError(f"{field_name}: {name!r} is not a supported dtype; expected one of {DTYPES}")
    return value


# Sizes beyond int32 indexing are no model this code can build, and a layer count in the
# thousands is none either (published models have at most a few hundred); refusing them early
# keeps a hostile config from shape arithmetic and from loops over its layers.
MAX_DIM = 2**31 - 1
MAX_LAYERS = 4096


def _require_positive(obj: Any, prefix: str, names: tuple[str, ...], kind: type = int) -> None:
    for name in names:
        value = getattr(obj, name)
        if (
            not isinstance(value, kind | int)
            or isinstance(value, bool)
            or (isinstance(value, float) and not math.isfinite(value))
            or not value > 0
        ):
            what = "integer" if kind is int else "number"
            raise ConfigError(f"{prefix}.{name}: a positive {what} is expected, got {value!r}")
        _require_at_most(obj, prefix, name, MAX_DIM if kind is int else math.inf)


def _require_at_most(obj: Any, prefix: str, name: str, limit: float) -> None:
    value = getattr(obj, name)
    if value > limit:
        raise ConfigError(f"{prefix}.{name}: {_show(value)} is too large (at most {limit})")


@dataclass(frozen=True)
class TextConfig:
    """The decoder: a Mistral dense transformer with GQA, RoPE and SwiGLU, untied output head."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e9
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        _require_positive(
            self,
            "text",
            (
                "vocab_size",
                "dim",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "hidden_dim",
                "max_position_embeddings",
            ),
        )
        _require_at_most(self, "text", "n_layers", MAX_LAYERS)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"text.n_kv_heads: {self.n_kv_heads} must divide text.n_heads ({self.n_heads})")
        _require_positive(self, "text", ("norm_eps", "rope_theta"), float)
        if self.head_dim % 2:
            raise ConfigError(f"text.head_dim: RoPE needs an even head dimension, got {self.head_dim}")


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision encoder and the patch-merger projector into the decoder."""

    hidden_size: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 1540
    num_channels: int = 3
    rope_theta: float = 1e4
    norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13

    def __post_init__(self) -> None:
        _require_positive(
            self,
            "vision",
            (
                "hidden_size",
                "n_layers",
                "n_heads",
                "head_dim",
                "intermediate_size",
                "patch_size",
                "image_size",
                "num_channels",
                "spatial_merge_size",
            ),
        )
        _require_positive(self, "vision", ("rope_theta", "norm_eps"), float)
        _require_at_most(self, "vision", "n_layers", MAX_LAYERS)
        if self.head_dim % 4:
            raise ConfigError(f"vision.head_dim: 2D RoPE needs a multiple of 4, got {self.head_dim}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture plus how to run it.

    Attributes:
      name: preset name or where the config was read from.
      text: the decoder architecture.
      vision: the vision encoder and projector, or None for text-only checkpoints.
      reasoning: how the model writes its reasoning: `think_tokens` ([THINK]/[/THINK] control
        tokens, 2507/2509), `think_tags` (plain-text <think> tags, 2506) or None.
      param_dtype: dtype parameters are stored in.
      dtype: dtype of activations and matmul inputs; norms' statistics, softmax and logits are
        always float32.
      remat: rematerialisation policy of each layer: `none`, `full` (save nothing inside a
        layer), `save_matmuls` (keep every projection's output), `save_qkv` (keep q, k, v).
      attention: attention implementation (`auto`, `xla`, `cudnn`, `chunked`, `splash`; see
        `model.attention`). With a KV cache, every one but `xla` reads only the cache's filled part.
      attention_block: query/key block size of the chunked attention.
      rules: logical axis -> mesh axes table (see `magistral_jax.sharding`).
    """

    text: TextConfig
    vision: VisionConfig | None = None
    name: str = "custom"
    reasoning: ReasoningFormat | None = None
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    remat: RematPolicy = "full"
    attention: AttentionImpl = "auto"
    attention_block: int = 512
    rules: Rules = field(default=DEFAULT_RULES)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"name: a string is expected, got {self.name!r}")
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "dtype"))
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat: {self.remat!r} is not a policy; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention: {self.attention!r} is not an implementation; expected one of {ATTENTION_IMPLS}"
            )
        if self.reasoning not in (None, "think_tokens", "think_tags"):
            raise ConfigError(f"reasoning: {self.reasoning!r}; expected 'think_tokens', 'think_tags' or None")
        if not isinstance(self.attention_block, int) or self.attention_block <= 0:
            raise ConfigError(f"attention_block: a positive integer is expected, got {self.attention_block!r}")
        try:
            validate_rules(self.rules)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; `text.x` / `vision.x` keys change nested fields."""
        nested: dict[str, dict[str, Any]] = {"text": {}, "vision": {}}
        top: dict[str, Any] = {}
        for key, value in changes.items():
            head, _, rest = key.partition(".")
            if rest:
                if head not in nested:
                    raise ConfigError(f"{key}: unknown key")
                nested[head][rest] = value
            else:
                top[key] = value
        known = {f.name for f in dataclasses.fields(self)}
        for key in top:
            if key not in known:
                raise ConfigError(f"{key}: unknown key; expected one of {sorted(known)}")
        cfg = dataclasses.replace(self, **top)
        for part, fields_ in nested.items():
            if not fields_:
                continue
            sub = getattr(cfg, part)
            if sub is None:
                raise ConfigError(f"{part}: this config has no {part} part to change")
            sub_known = {f.name for f in dataclasses.fields(sub)}
            for key in fields_:
                if key not in sub_known:
                    raise ConfigError(f"{part}.{key}: unknown key; expected one of {sorted(sub_known)}")
            cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(sub, **fields_)})
        return cfg


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

# Mistral Small 3.1 / 3.2 and all Magistral Small releases share this decoder
# (reference/architecture-and-checkpoints.md, section 1).
_TEXT_24B = TextConfig(
    vocab_size=131072,
    dim=5120,
    n_layers=40,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    hidden_dim=32768,
    norm_eps=1e-5,
    rope_theta=1e9,
    max_position_embeddings=131072,
)
_PIXTRAL_24B = VisionConfig()

PRESETS: dict[str, ModelConfig] = {
    "mistral-small-3.1-24b": ModelConfig(name="mistral-small-3.1-24b", text=_TEXT_24B, vision=_PIXTRAL_24B),
    "mistral-small-3.2-24b": ModelConfig(name="mistral-small-3.2-24b", text=_TEXT_24B, vision=_PIXTRAL_24B),
    "magistral-small-2506": ModelConfig(name="magistral-small-2506", text=_TEXT_24B, reasoning="think_tags"),
    "magistral-small-2507": ModelConfig(name="magistral-small-2507", text=_TEXT_24B, reasoning="think_tokens"),
    "magistral-small-2509": ModelConfig(
        name="magistral-small-2509", text=_TEXT_24B, vision=_PIXTRAL_24B, reasoning="think_tokens"
    ),
    # Tiny shapes for tests and the demo. head_dim differs from dim / n_heads on purpose, as in 24B.
    "tiny": ModelConfig(
        name="tiny",
        text=TextConfig(
            vocab_size=256,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            hidden_dim=192,
            max_position_embeddings=4096,
        ),
        reasoning="think_tokens",
        param_dtype="float32",
        dtype="float32",
        remat="none",
    ),
    "tiny-vision": ModelConfig(
        name="tiny-vision",
        text=TextConfig(
            vocab_size=256,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            hidden_dim=192,
            max_position_embeddings=4096,
        ),
        vision=VisionConfig(hidden_size=32, n_layers=2, n_heads=2, head_dim=16, intermediate_size=64, image_size=112),
        reasoning="think_tokens",
        param_dtype="float32",
        dtype="float32",
        remat="none",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; an unknown name raises `ConfigError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"preset: unknown preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short: a hostile file may hold a megabyte where a number belongs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is expected, got {_show(value)}")
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
            raise ConfigError(f"{where}{key}: an integer is expected, got {_show(value)}")
        return value
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}{key}: a finite number is expected, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{where}{key}: a finite number is expected, got {_show(value)}") from None


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
                f"{where}rope_parameters.rope_type: {_show(rope_type)} is not supported; "
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
            f"{where}sliding_window: {_show(d['sliding_window'])} is not supported; Mistral Small and Magistral "
            "use full attention on every layer (null)"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}hidden_act: {_show(act)}; the decoder's SwiGLU uses 'silu'")
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


def _hf_vision(top: dict[str, Any], d: dict[str, Any], text_eps: float) -> VisionConfig:
    where = "vision_config."
    act = d.get("hidden_act", "gelu")
    if act != "silu":
        raise ConfigError(
            f"{where}hidden_act: {_show(act)}; the Pixtral encoder of Mistral Small uses a SiLU-gated FFN ('silu')"
        )
    proj_act = top.get("projector_hidden_act", "gelu")
    if proj_act != "gelu":
        raise ConfigError(f"projector_hidden_act: {_show(proj_act)}; the patch-merger projector uses exact 'gelu'")
    if top.get("multimodal_projector_bias", False):
        raise ConfigError("multimodal_projector_bias: true; the projector of Mistral Small has no biases")
    layer = top.get("vision_feature_layer", -1)
    if layer != -1:
        raise ConfigError(f"vision_feature_layer: {_show(layer)}; only -1 (the last layer) is supported")
    hidden = _get_positive(d, "hidden_size", where)
    heads = _get_positive(d, "num_attention_heads", where)
    return VisionConfig(
        hidden_size=hidden,
        n_layers=_get(d, "num_hidden_layers", where, kind=int),
        n_heads=heads,
        head_dim=_get(d, "head_dim", where, hidden // heads, kind=int),
        intermediate_size=_get(d, "intermediate_size", where, kind=int),
        patch_size=_get(d, "patch_size", where, kind=int),
        image_size=_get(d, "image_size", where, kind=int),
        num_channels=_get(d, "num_channels", where, 3, kind=int),
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
        raise ConfigError(f"model_type: {_show(model_type)} is not supported; expected 'mistral' or 'mistral3'")
    return ModelConfig(name=name, text=text, vision=vision, param_dtype=dtype)


def from_mistral_params(d: dict[str, Any], name: str = "mistral") -> ModelConfig:
    """Reads a Mistral `params.json` dict (mistral-inference `TransformerArgs`)."""
    if d.get("moe"):
        raise ConfigError("moe: mixture-of-experts checkpoints are not supported")
    if d.get("sliding_window") is not None:
        raise ConfigError(f"sliding_window: {_show(d['sliding_window'])} is not supported (full attention only)")
    if d.get("tied_embeddings", False):
        raise ConfigError("tied_embeddings: true; Mistral Small and Magistral have an untied output head")
    act = d.get("activation", "silu")
    if act != "silu":
        raise ConfigError(f"activation: {_show(act)}; the decoder's SwiGLU uses 'silu'")
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
            raise ConfigError(f"{where}mm_projector_id: {_show(v['mm_projector_id'])}; expected 'patch_merge'")
        if not v.get("add_pre_mm_projector_layer_norm", True):
            raise ConfigError(f"{where}add_pre_mm_projector_layer_norm: false is not supported")
        if v.get("adapter_bias", False):
            raise ConfigError(f"{where}adapter_bias: true; the projector of Mistral Small has no biases")
        hidden = _get_positive(v, "hidden_size", where)
        heads = _get_positive(v, "num_attention_heads", where)
        image_key = "max_image_size" if v.get("max_image_size") else "image_size"
        vision = VisionConfig(
            hidden_size=hidden,
            n_layers=_get(v, "num_hidden_layers", where, kind=int),
            n_heads=heads,
            head_dim=_get(v, "head_dim", where, hidden // heads, kind=int),
            intermediate_size=_get(v, "intermediate_size", where, kind=int),
            patch_size=_get(v, "patch_size", where, kind=int),
            image_size=_get(v, image_key, where, kind=int),
            num_channels=_get(v, "num_channels", where, 3, kind=int),
            rope_theta=_get(v, "rope_theta", where, 1e4, kind=float),
            spatial_merge_size=_get(v, "spatial_merge_size", where, 2, kind=int),
            image_token_id=_get(v, "image_token_id", where, 10, kind=int),
            image_break_token_id=_get(v, "image_break_token_id", where, 12, kind=int),
            image_end_token_id=_get(v, "image_end_token_id", where, 13, kind=int),
        )
    return ModelConfig(name=name, text=text, vision=vision)


def flatten_model_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{text: {n_layers: 2}, remat: full}` -> `{"text.n_layers": 2, "remat": "full"}`."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("text", "vision"):
            flat.update(flatten_model_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------
# Files and typed values (shared with the run configs of `train.config`)
# --------------------------------------------------------------------------------------------


def open_regular_file(path: str, error: type[ValueError] = ConfigError) -> int:
    """A read-only descriptor of `path`, which must be a regular file: a FIFO or a device would
    block `open` or `read` forever (opened non-blocking, checked, then made blocking again)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_text_file(path: str) -> str:
    """The UTF-8 text of the regular file `path`; a `ConfigError` naming the file otherwise."""
    with os.fdopen(open_regular_file(path), "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def _yaml_loader() -> type:
    import yaml

    # libyaml's parser is fast and bounds the nesting depth; PyYAML's own takes time quadratic in
    # the depth of nested `[`, seconds for a few thousand.
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):
        """PyYAML reads YAML 1.1, where `1e-3` (no dot) is a string; YAML 1.2 and every user
        mean a float. The float forms YAML 1.1 lacks resolve to floats here."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


_YAML_LOADER = functools.cache(_yaml_loader)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text, with YAML 1.2 floats (`1e-3`); a `ConfigError` naming `where` otherwise."""
    import yaml

    try:
        # str(): libyaml takes exact strings, not subclasses such as `OverrideText`.
        return yaml.load(str(text), Loader=_YAML_LOADER())  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


def read_yaml_file(path: str) -> Any:
    """The YAML document in `path` (see `parse_yaml`)."""
    return parse_yaml(read_text_file(path), path)


class OverrideText(str):
    """A value as typed on the command line: converted to the type of the field it sets, or, in a
    free-form mapping (`data`, `reward`), read as a YAML scalar or list."""


def split_override(item: str) -> tuple[list[str], OverrideText]:
    """`"a.b=value"` -> (`["a", "b"]`, `OverrideText("value")`)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {item!r}: KEY=VALUE expected (e.g. optimizer.lr=1e-5 or text.n_layers=2)")
    return [part.strip() for part in parts], OverrideText(value.strip())


def nest_overrides(d: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`d` with each `a.b=value` set at `d["a"]["b"]` (as `OverrideText`, typed later)."""
    for item in overrides:
        parts, value = split_override(item)
        node = d
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
    return d


_NULLS = ("", "null", "none", "None", "~")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    if origin in (tuple, list):
        return "a list"
    return "a mapping"


def _free_form(value: Any, key: str) -> Any:
    # Command-line text in a free-form mapping: a YAML value (numbers, lists, true/false, text).
    if isinstance(value, OverrideText):
        return parse_yaml(value, key)
    if isinstance(value, dict):
        return {k: _free_form(v, f"{key}.{k}") for k, v in value.items()}
    return value


def typed_value(value: Any, tp: Any, key: str) -> Any:
    """`value` (command-line text, or a value read from YAML or JSON) as type `tp`: bool, int,
    float, str, `X | None`, `Literal[...]`, tuples, lists, free-form `dict[str, Any]` or a config
    dataclass (a mapping typed field by field, returned as a dict). A `ConfigError` naming `key`
    and the type expected otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = value.strip() if isinstance(value, str) else None

    def wrong() -> ConfigError:
        return ConfigError(f"{key}: {_describe(tp)} is expected, got {_show(value)}")

    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or text in _NULLS):
            return None
        # Text fits any str member: try the others first (`[fsdp, data]` is a list).
        for member in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return typed_value(value, member, key)
            except ConfigError:
                pass
        raise wrong()
    if origin is Literal:
        got = text if text is not None else value
        if got in args:
            return got
        raise wrong()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise wrong()
    if tp is int or tp is float:
        number = value
        if text is not None:
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise wrong() from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise wrong()
        if isinstance(number, float) and not math.isfinite(number):
            raise wrong()
        if tp is float:
            try:
                return float(number)
            except OverflowError:
                raise wrong() from None
        if isinstance(number, float):
            if not number.is_integer():
                raise wrong()
            number = int(number)
        if not -(2**63) <= number < 2**63:
            raise ConfigError(f"{key}: {_show(value)} is out of range (64-bit integers)")
        return number
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # YAML read `run_dir: 2024` as a number
        raise wrong()
    if origin is list:
        items = parse_yaml(value, key) if isinstance(value, OverrideText) else value
        if not isinstance(items, list | tuple):
            raise wrong()
        return [typed_value(x, args[0] if args else Any, f"{key}[{i}]") for i, x in enumerate(items)]
    if origin is tuple:
        items = parse_yaml(value, key) if isinstance(value, OverrideText) else value
        if not isinstance(items, list | tuple):
            raise wrong()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed_value(x, args[0], f"{key}[{i}]") for i, x in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{key}: a list of {len(args)} items is expected, got {_show(value)}")
        return tuple(typed_value(x, a, f"{key}[{i}]") for i, (x, a) in enumerate(zip(items, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise wrong()
        return _free_form(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return typed_fields(value, tp, f"{key}.")
    if tp is Any:
        return _free_form(value, key)
    raise TypeError(f"{key}: no conversion to {tp!r}")  # a field type this parser does not know yet


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def typed_fields(d: Mapping[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """The mapping `d` with each value converted to the type of `cls`'s field of that name
    (`typed_value`); dotted keys (`text.n_layers`) address nested fields; an unknown key is an
    error listing the known ones. Nested dataclasses stay dicts: the caller builds them."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: a mapping is expected, got {_show(d)}")
    nested: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{_show(key)}: keys are names, got {type(key).__name__}")
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
            if isinstance(nested.get(head), dict):
                value = {**nested[head], **value}
        nested[head] = value
    types_ = _field_types(cls)
    out = {}
    for key, value in nested.items():
        if key not in types_:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {sorted(types_)}")
        out[key] = typed_value(value, types_[key], f"{prefix}{key}")
    return out


def model_changes(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`ModelConfig.replace` keyword arguments from a (nested or dotted) mapping of model fields,
    typed (`typed_fields`)."""
    return flatten_model_fields(typed_fields(d, ModelConfig, prefix))


def _read_yaml_config(path: str) -> ModelConfig:
    d = read_yaml_file(path)
    if not isinstance(d, dict) or "preset" not in d:
        raise ConfigError(f"{path}: preset: required field is missing (a YAML model config names its preset)")
    try:
        preset = typed_value(d["preset"], str, "preset")
        return get_preset(preset).replace(**model_changes({k: v for k, v in d.items() if k != "preset"}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """Applies `key=value` strings, each value converted to its field's type (`typed_value`)."""
    return cfg.replace(**model_changes(nest_overrides({}, overrides)))


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
        raise ConfigError(f"format: {_show(d.get('format'))}; a magistral-jax model config is expected")
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


def load_json(path: str) -> dict[str, Any]:
    """The JSON object in the regular file `path`; a `ConfigError` naming the file otherwise."""
    try:
        d = json.loads(read_text_file(path))
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a JSON object is expected")
    return d


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Reads a model config: `config.json` (HF), `params.json` (Mistral), `magistral_config.json`
    (this project's checkpoints) or a YAML model config, from a file or a checkpoint directory."""
    path = os.fspath(path)
    if path.endswith((".yaml", ".yml")):
        return _read_yaml_config(path)
    if os.path.isdir(path):
        for fname in (MAGISTRAL_CONFIG, "config.json", "params.json"):
            if os.path.exists(os.path.join(path, fname)):
                return read_config(os.path.join(path, fname))
        raise ConfigError(
            f"{path}: none of {MAGISTRAL_CONFIG} (magistral-jax), config.json (Hugging Face) or "
            "params.json (Mistral) found"
        )
    d = load_json(path)
    label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    try:
        if d.get("format") == "magistral-jax":
            return from_architecture_dict(d)
        if os.path.basename(path) == "params.json" or "n_layers" in d:
            return from_mistral_params(d, name=label)
        return from_hf_config(d, name=label)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
