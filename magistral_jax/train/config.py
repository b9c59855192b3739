"""Training run configs: YAML files with `key=value` overrides.

A run config names the model (a preset, a YAML model config, or a checkpoint to start from), the
run directory, the schedule of steps and checkpoints, the optimizer, the data and, for GRPO, the
objective, the sampling and the reward. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from magistral_jax.config import ConfigError, ModelConfig
from magistral_jax.overrides import nest_overrides, read_yaml_file, typed_fields
from magistral_jax.sampling.continuous import CACHES
from magistral_jax.sampling.sampler import BUCKET
from magistral_jax.train.step import OptimizerConfig


@dataclass(frozen=True)
class GRPOConfig:
    """The RL part of a run (see `rl.losses` for the variants)."""

    loss: str = "magistral"  # a named variant of `rl.losses`; the next four replace its parts
    advantage: str | None = None  # `rl.losses.ADVANTAGES`
    aggregation: str | None = None  # `rl.losses.AGGREGATIONS`
    filter_groups: bool | None = None  # drop groups without signal when forming batches
    kl: bool | None = None  # a k3 KL term to the initial policy (needs kl_coef > 0)
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    minibatches: int = 1  # optimizer updates per batch (each on whole groups)
    reward_workers: int = 2
    # What must vary within a group for it to be kept: the total reward, or one of its components
    # (e.g. `correct`: shaped rewards such as length or language then do not keep all-wrong or
    # all-right groups alive, as DAPO's filtering on accuracy).
    filter_metric: str = "reward"
    # Variants that drop groups without signal form each batch from `prompts_per_step` groups that
    # have some, drawing more as needed: at most `max_draws` x prompts_per_step groups per step
    # (DAPO's max_num_gen_batches); a step that still lacks some trains on those it found.
    max_draws: int = 4

    def variant(self):
        """The objective (`rl.losses.Variant`): the named variant `loss` with the parts this
        config replaces."""
        from magistral_jax.rl.losses import get_variant

        parts = ("advantage", "aggregation", "filter_groups", "kl")
        return get_variant(self.loss, **{part: getattr(self, part) for part in parts})


@dataclass(frozen=True)
class AsyncConfig:
    """Magistral's asynchronous RL (see `train.async_grpo`); `enabled: false` trains synchronously,
    sampling and training in turn on all devices."""

    enabled: bool = False
    generator_devices: int = 1  # the first devices: generation
    trainer_devices: int = 0  # the next ones: training (0: all the rest)
    generator_mesh: str = ""  # the generator devices' mesh (`data=..,fsdp=..,tensor=..`)
    slots: int = 0  # n_async: sequences decoded at once (0: n_batch = prompts_per_step * group_size)
    chunk: int = 16  # decode steps between refills of finished slots and weight swaps
    max_async_ratio: float = 2.0  # completions generating + queued <= ratio * n_batch
    max_prompt_len: int = 512  # the longest prompt (fixes the generator's cache)
    verifiers: int = 2  # threads that score finished groups (each may use the reward pool)
    # The generator's KV cache: `contiguous` (each slot reserves max_prompt_len + max_new_tokens)
    # or `paged` (pages of page_size tokens, a divisor of 128, from a pool of pool_tokens, 0: what the contiguous
    # cache of `slots` rows holds; a group's samples share their prompt's pages; a request is
    # admitted with pages for its prompt plus reserve_tokens, 0: one chunk). See
    # `sampling.continuous.ContinuousBatcher`.
    cache: str = "contiguous"
    page_size: int = 64
    pool_tokens: int = 0
    reserve_tokens: int = 0

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise ValueError(f"async_rl.cache: {self.cache!r}; expected one of {CACHES}")
        if self.page_size < 1 or BUCKET % self.page_size:
            raise ValueError(f"async_rl.page_size: a divisor of {BUCKET} is expected, got {self.page_size}")
        if self.pool_tokens < 0 or self.reserve_tokens < 0:
            raise ValueError("async_rl.pool_tokens and async_rl.reserve_tokens: >= 0 expected (0: the default)")
        for name in ("generator_devices", "chunk", "max_prompt_len", "verifiers"):
            if getattr(self, name) < 1:
                raise ValueError(f"async_rl.{name}: a positive integer is expected, got {getattr(self, name)!r}")
        if self.trainer_devices < 0 or self.slots < 0:
            raise ValueError("async_rl.trainer_devices and async_rl.slots: >= 0 expected (0: the default)")
        if not self.max_async_ratio >= 1:
            raise ValueError(
                f"async_rl.max_async_ratio: at least 1 (the queue must hold a batch), got {self.max_async_ratio}"
            )


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 32


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during a run: every `every` steps (and at the last), pass@1 of `k`
    samples on the first `problems` problems of `data` (a problem file, as the `problems` data
    source reads it), scored by the Magistral reward; `eval/pass@1` and the rest go to
    metrics.jsonl, and a checkpoint is written at that step. The best evaluated checkpoint is kept
    and is what `init_from: RUN_DIR` starts from by default (the paper starts RL from the cold
    start's best checkpoint)."""

    every: int = 0  # 0: no evaluation
    data: dict[str, Any] = field(default_factory=dict)  # {path: FILE | bundled:NAME, system_prompt, levels, languages}
    problems: int = 64
    k: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.7  # the model cards' sampling settings
    top_p: float = 0.95
    reward: dict[str, Any] = field(default_factory=dict)  # Magistral reward settings (style, l_max, l_cache)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every: >= 0 expected, got {self.every!r}")
        for name in ("problems", "k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}: a positive integer is expected, got {getattr(self, name)!r}")
        if self.every and "path" not in self.data:
            raise ValueError("eval.data.path: the problem file to evaluate on is required when eval.every > 0")


@dataclass(frozen=True)
class RunConfig:
    """A training run.

    Attributes:
      kind: `grpo` or `sft`.
      model: preset name or YAML model config (ignored when `init_from` is set, except overrides).
      model_overrides: `ModelConfig` fields to change (`remat`, `dtype`, `text.n_layers`, ...).
      init_from: checkpoint directory to start from (any format `load_model` reads, or a training
        run directory), or None for random parameters drawn with `seed`.
      init_checkpoint: which checkpoint of an `init_from` run directory: `best` (the best
        evaluated one, or the latest where the run has no evaluation), `latest`, or a step.
      param_dtype: master weights and optimizer state dtype (compute follows the model config).
      run_dir: where checkpoints, metrics.jsonl and TensorBoard events go.
      steps: optimizer steps of the whole run (a resumed run continues up to it).
      checkpoint_every / keep_checkpoints: Orbax train-state checkpoints.
      mesh: `data=..,fsdp=..,tensor=..` (empty: every device on fsdp).
      microbatch_tokens: tokens per microbatch (rows x row_len).
      row_len: slots per packed row (0: the longest sequence a step can produce, rounded up to 64).
      logprob_chunk: sequence chunk of the chunked log-probabilities.
      max_nonfinite: stop after this many non-finite updates in a row.
      tokenizer: tokenizer file for decoding completions for text rewards (None: token ids).
      async_rl: asynchronous generation and training on disjoint devices (`AsyncConfig`).
      eval: held-out evaluation every few steps (`EvalConfig`).
      resume_overrides: fields that may differ from the run directory's own config when resuming
        (e.g. `[steps]` to extend a run); any other difference is refused.
    """

    kind: str
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_checkpoint: str = "best"
    param_dtype: str = "float32"
    run_dir: str = "runs/run"
    steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    mesh: str = ""
    microbatch_tokens: int = 4096
    row_len: int = 0
    logprob_chunk: int = 256
    max_nonfinite: int = 3
    tokenizer: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    async_rl: AsyncConfig = field(default_factory=AsyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume_overrides: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=lambda: {"name": "random_prompts"})
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "token_frequency"})

    def __post_init__(self) -> None:
        if self.kind not in ("grpo", "sft"):
            raise ConfigError(f"kind: {self.kind!r}; expected grpo or sft")
        for name in (
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "microbatch_tokens",
            "logprob_chunk",
            "max_nonfinite",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: a positive integer is expected, got {value!r}")
        if self.sft.batch_size < 1:
            raise ConfigError(f"sft.batch_size: a positive integer is expected, got {self.sft.batch_size!r}")
        g = self.grpo
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "minibatches", "max_draws"):
            if getattr(g, name) < 1:
                raise ConfigError(f"grpo.{name}: a positive integer is expected, got {getattr(g, name)!r}")
        if g.group_size < 2 and self.kind == "grpo":
            raise ConfigError("grpo.group_size: at least 2 completions per prompt are needed for an advantage")
        if g.minibatches > g.prompts_per_step:
            raise ConfigError(f"grpo.minibatches: {g.minibatches} minibatches of {g.prompts_per_step} prompts")
        n_batch = g.prompts_per_step * g.group_size
        if self.async_rl.enabled and self.async_rl.slots > self.async_rl.max_async_ratio * n_batch:
            raise ConfigError(
                f"async_rl.slots: {self.async_rl.slots} sequences in flight exceed max_async_ratio x n_batch = "
                f"{self.async_rl.max_async_ratio} x {n_batch}"
            )
        if self.kind == "grpo":
            try:
                variant = g.variant()
            except ValueError as e:
                raise ConfigError(f"grpo.{e}") from None
            if variant.kl and not g.kl_coef > 0:
                raise ConfigError(f"grpo.kl_coef: the {g.loss} objective has a KL term and needs kl_coef > 0")
            if g.kl_coef and not variant.kl:
                raise ConfigError(
                    f"grpo.kl_coef: {g.kl_coef}, but the {g.loss} objective has no KL term (no reference model is "
                    "kept); set kl_coef to 0, or add the term with grpo.kl=true"
                )
        if self.init_checkpoint not in ("best", "latest") and not str(self.init_checkpoint).isdigit():
            raise ConfigError(f"init_checkpoint: best, latest or a step number expected, got {self.init_checkpoint!r}")
        if not 0 <= g.eps_low < 1 or g.eps_high < 0:
            raise ConfigError(
                f"grpo.eps_low / eps_high: 0 <= eps_low < 1 and eps_high >= 0, got {g.eps_low}, {g.eps_high}"
            )


_SECTIONS = {
    "optimizer": OptimizerConfig,
    "grpo": GRPOConfig,
    "sft": SFTConfig,
    "async_rl": AsyncConfig,
    "eval": EvalConfig,
}


def _build(d: dict[str, Any]) -> RunConfig:
    # Every value typed as its field (`typed_fields`); `model_overrides` as the model config's
    # fields, which it changes.
    typed = typed_fields(d, RunConfig)
    if "model_overrides" in d:
        typed["model_overrides"] = typed_fields(d["model_overrides"], ModelConfig, "model_overrides.")
    for key, cls in _SECTIONS.items():
        if key in typed:
            try:
                typed[key] = cls(**typed[key])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    if "kind" not in typed:
        raise ConfigError("kind: required (grpo or sft)")
    return RunConfig(**typed)


def load_run_config(path: str | None, overrides: Sequence[str] = (), kind: str | None = None) -> RunConfig:
    """A run config from a YAML file (or none) with `a.b=value` overrides; `kind` must agree.

    YAML values and overrides are converted to the types of the fields they set (see
    `overrides.typed_value`): `optimizer.lr=1e-3` is a float, `grpo.group_size=abc` an error naming
    the key and the type, before anything is built."""
    d: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        d = read_yaml_file(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a mapping is expected at the top level")
    d = nest_overrides(d, overrides)
    if kind is not None:
        if d.get("kind", kind) != kind:
            raise ConfigError(f"kind: the config is for {d['kind']!r}, the command trains {kind!r}")
        d["kind"] = kind
    try:
        return _build(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
