"""Model configurations: typed dataclasses, named presets, and this project's YAML model configs.

A `ModelConfig` holds the architecture (`TextConfig`, optional `VisionConfig`) and how to run it
(parameter and compute dtypes, remat policy, attention implementation, sharding rules). Configs
are frozen and hashable, so they can be passed to `jax.jit` as static arguments.

`read_yaml_config(path)` reads the project's own YAML model configs (`configs/*.yaml`):
`preset: NAME` plus field overrides, flat (`remat: full`) or nested (`text: {n_layers: 2}`).
The checkpoint configs (Hugging Face `config.json`, Mistral `params.json`, `magistral_config.json`)
are read and written by `checkpoint.configs`, whose `read_config(path)` reads any of them and
these YAML files.

`apply_overrides(cfg, ["text.n_layers=2", "remat=full"])` applies command-line `key=value` pairs.
Overrides and YAML values are typed by one parser (`overrides.typed_fields`, also used by the run
configs of `train.config`): each value becomes the type of the dataclass field it sets (`1e-3` a
float, `true` a bool, `abc` for an integer field an error naming the key and the type expected).
Every inconsistency raises `ConfigError` (defined with that parser) naming the offending field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from magistral_jax.overrides import ConfigError, nest_overrides, read_yaml_file, short_repr, typed_fields, typed_value
from magistral_jax.sharding import DEFAULT_RULES, Rules, validate_rules

RematPolicy = Literal["none", "full", "save_matmuls", "save_qkv"]
AttentionImpl = Literal["auto", "xla", "cudnn", "chunked", "splash"]
ReasoningFormat = Literal["think_tokens", "think_tags"]

REMAT_POLICIES: tuple[str, ...] = ("none", "full", "save_matmuls", "save_qkv")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "chunked", "splash")
DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}


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
        raise ConfigError(f"{prefix}.{name}: {short_repr(value)} is too large (at most {limit})")


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
# YAML model configs and command-line overrides
# --------------------------------------------------------------------------------------------


def flatten_model_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{text: {n_layers: 2}, remat: full}` -> `{"text.n_layers": 2, "remat": "full"}`."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("text", "vision"):
            flat.update(flatten_model_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_changes(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`ModelConfig.replace` keyword arguments from a (nested or dotted) mapping of model fields,
    typed (`typed_fields`)."""
    return flatten_model_fields(typed_fields(d, ModelConfig, prefix))


def read_yaml_config(path: str) -> ModelConfig:
    """A YAML model config: `preset: NAME` plus field overrides (see the module docstring)."""
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
