"""The train step: gradients accumulated over microbatches, one optimizer update, a non-finite guard.

A step runs three compiled programs, public here so that `Trainer` and `magistral-jax plan` compile
the same ones: `microbatch_gradients` (loss, metric sums and gradients of one packed microbatch),
`accumulate_gradients` (adds a microbatch's gradients into the running sum, in place) and the
program `update_program` builds (the guarded optimizer update, parameters and optimizer state
donated and kept in their shardings), and `optimizer_init_program` creates the optimizer state in
the parameters' shardings. A `Trainer` commits its parameters and optimizer state to their
devices when it is built, so the second step finds the first step's programs compiled.

Parameters keep `cfg.param_dtype` (float32 master weights by default in the training configs)
while the forward computes in `cfg.dtype` (bfloat16); the optimizer state follows the parameters'
dtype and sharding. The loss of a microbatch is a weighted sum over its tokens (weights computed
per minibatch beforehand, see `rl.losses`), so accumulating microbatch gradients gives exactly the
minibatch gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from magistral_jax.compile_clock import compile_seconds
from magistral_jax.config import ModelConfig
from magistral_jax.model import param_specs
from magistral_jax.model.decoder import token_logprobs
from magistral_jax.rl.losses import k3_kl, token_losses
from magistral_jax.sharding import constrain, local_batch_to_global
from magistral_jax.train.packing import FIELDS, Microbatch

if TYPE_CHECKING:
    from magistral_jax.train.config import RunConfig


class TrainingError(RuntimeError):
    """Training cannot continue (for example: too many non-finite updates in a row)."""


@dataclass(frozen=True)
class Objective:
    """What a microbatch's loss is: `sft` (weighted cross-entropy on the trained tokens) or `pg`
    (the clipped policy-gradient objective with optional k3 KL)."""

    kind: str = "pg"
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    temperature: float = 1.0


def objective_of(run: RunConfig) -> Objective:
    """The objective a run config trains with (`sft`, or the run's `grpo` clipping, KL and
    temperature)."""
    grpo = run.kind == "grpo"
    g = run.grpo
    return Objective(
        kind="pg" if grpo else "sft",
        eps_low=g.eps_low,
        eps_high=g.eps_high,
        kl_coef=g.kl_coef,
        temperature=g.temperature if grpo else 1.0,
    )


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with gradient clipping and a warmed-up schedule (`constant` or `cosine`)."""

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 0  # cosine: steps to decay over after warmup (0 = the run's length)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optimizer.schedule: {self.schedule!r}; expected constant or cosine")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optimizer.{name}: a positive number is expected, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps: >= 0 expected, got {self.warmup_steps}")


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    # Linear warmup that reaches lr after warmup_steps updates, the first update already non-zero.
    warmup = (
        optax.linear_schedule(cfg.lr / (cfg.warmup_steps + 1), cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None
    )
    if cfg.schedule == "cosine":
        decay = max(cfg.decay_steps or total_steps - cfg.warmup_steps, 1)
        main = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.min_lr_ratio)
    else:
        main = optax.constant_schedule(cfg.lr)
    schedule = optax.join_schedules([warmup, main], [cfg.warmup_steps]) if warmup else main
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    return tx, schedule


def microbatch_loss(params, mb: dict[str, jax.Array], cfg: ModelConfig, objective: Objective, chunk: int):
    """The weighted loss of one microbatch and the sums its metrics are made of."""
    logp, entropy = token_logprobs(
        params,
        mb["tokens"],
        mb["targets"],
        cfg,
        positions=mb["positions"],
        segment_ids=mb["segment_ids"],
        temperature=objective.temperature,
        chunk=chunk,
    )
    mask = (mb["weights"] > 0).astype(jnp.float32)
    stats = {"tokens": mask.sum(), "entropy_sum": (entropy * mask).sum()}
    if objective.kind == "sft":
        per_token = -logp
    else:
        per_token, low, high = token_losses(
            logp, mb["old_logprobs"], mb["advantages"], objective.eps_low, objective.eps_high
        )
        if objective.kl_coef:
            kl = k3_kl(logp, mb["ref_logprobs"])
            per_token = per_token + objective.kl_coef * kl
            stats["kl_sum"] = (kl * mask).sum()
        stats["clip_low"] = (low * mask).sum()
        stats["clip_high"] = (high * mask).sum()
        stats["drift_sum"] = (jnp.abs(logp - mb["old_logprobs"]) * mask).sum()
    return jnp.sum(per_token * mb["weights"]), stats


def guarded_update(tx, params, opt_state, grads, loss):
    """The optimizer update, skipped (state unchanged) when the loss or a gradient is not finite;
    returns (params, opt_state, finite, gradient norm)."""
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    def update(args):
        params, opt_state = args
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda a: a, (params, opt_state))
    return params, opt_state, finite, optax.tree.norm(grads)


# ------------------------------------------------------------------------------------------------
# The programs of a train step
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "objective", "chunk"))
def microbatch_gradients(params, mb: dict[str, jax.Array], *, cfg: ModelConfig, objective: Objective, chunk: int):
    """The per-microbatch program: ((loss, metric sums), gradients) of one packed microbatch
    (`microbatch_loss`), compiled once per (config, objective, chunk) and shapes. The gradients
    come out in their parameters' shardings (left to itself XLA keeps some whole on every device:
    the embedding table's, a scatter into zeros, 2.7 GB per chip for the 24B)."""
    out, grads = jax.value_and_grad(microbatch_loss, has_aux=True)(params, mb, cfg, objective, chunk)
    specs = param_specs(cfg)
    return out, jax.tree.map(lambda g, spec: constrain(g, spec.axes, cfg.rules), grads, specs)


@functools.partial(jax.jit, donate_argnums=0)
def accumulate_gradients(total, grads):
    """The accumulation program: `total + grads`, written into `total` (donated)."""
    return jax.tree.map(jnp.add, total, grads)


# One update program per optimizer (one object per configuration) and parameter layout; the last
# few are kept.
_UPDATES: dict[Any, Any] = {}
_UPDATES_KEPT = 16


def update_program(tx: optax.GradientTransformation, param_shardings, state_shardings):
    """The update program of optimizer `tx` for parameters and optimizer state laid out as
    `param_shardings` / `state_shardings` (pytrees of shardings): `(params, opt_state, grads,
    loss) -> (params, opt_state, finite, gradient norm)` (`guarded_update`), parameters and state
    donated and returned in the same shardings (so the next step's programs see the same inputs)."""
    key = (
        tx,
        jax.tree.structure((param_shardings, state_shardings)),
        *jax.tree.leaves((param_shardings, state_shardings)),
    )
    if key not in _UPDATES:
        if len(_UPDATES) >= _UPDATES_KEPT:
            del _UPDATES[next(iter(_UPDATES))]

        def update(params, opt_state, grads, loss):
            return guarded_update(tx, params, opt_state, grads, loss)

        _UPDATES[key] = jax.jit(
            update, donate_argnums=(0, 1), out_shardings=(param_shardings, state_shardings, None, None)
        )
    return _UPDATES[key]


# One optimizer object per configuration, so that trainers of one configuration share programs.
shared_optimizer = functools.lru_cache(maxsize=16)(make_optimizer)


def optimizer_state_shardings(tx: optax.GradientTransformation, params):
    """Where the optimizer state of `params` (arrays, or abstract arrays with shardings) lives: each
    moment in its parameter's sharding, the step counters whole on every device."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    whole = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    return optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings, transform_non_params=lambda _: whole
    )


def optimizer_init_program(tx: optax.GradientTransformation, params):
    """The program that creates the optimizer state of `params` in `optimizer_state_shardings`.
    (Left to itself XLA replicates every moment on every device, since zeros depend on no input:
    the 24B's Adam state would not fit a chip.)"""
    return jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params))


def _committed(tree):
    """`tree`'s arrays committed to the devices and shardings they are on (a jitted program's
    cache tells committed arrays from uncommitted ones: without this the first update's outputs,
    committed, would make the second step compile every program again)."""
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, x.sharding), tree)


class Trainer:
    """Holds the parameters and optimizer state of a `Model` and trains them on microbatches."""

    def __init__(
        self,
        model,
        optimizer: OptimizerConfig,
        objective: Objective,
        *,
        total_steps: int,
        chunk: int = 256,
        max_nonfinite: int = 3,
    ):
        self.model = model
        self.objective = objective
        self.chunk = chunk
        self.max_nonfinite = max_nonfinite
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.tx, self.schedule = shared_optimizer(optimizer, total_steps)
        compile_seconds()  # starts the compile clock before anything is compiled
        model.params = _committed(model.params)
        with model.mesh_context():
            self.opt_state = optimizer_init_program(self.tx, model.params)(model.params)
        self.step = 0
        self._grad = functools.partial(microbatch_gradients, cfg=model.cfg, objective=objective, chunk=chunk)
        self._update = None

    def _update_program(self):
        return update_program(
            self.tx,
            jax.tree.map(lambda x: x.sharding, self.model.params),
            jax.tree.map(lambda x: x.sharding, self.opt_state),
        )

    def place(self, x: np.ndarray) -> jax.Array:
        """This process's rows of a [rows, T] batch as a global array (one process: all rows,
        `Model.place_batch`; several: `sharding.local_batch_to_global`)."""
        if jax.process_count() == 1:
            return self.model.place_batch(x)
        if self.model.mesh is None:
            raise ValueError("a multi-process trainer needs a model on a mesh")
        return local_batch_to_global(x, self.model.mesh, self.model.cfg.rules)

    def _place(self, mb: Microbatch) -> dict[str, jax.Array]:
        names = ("tokens", "targets", "segment_ids", "positions", *FIELDS)
        return {n: self.place(getattr(mb, n)) for n in names}

    def gradients(self, microbatches: list[Microbatch]) -> tuple[Any, jax.Array, dict[str, float]]:
        """Loss, gradients and metric sums of a minibatch, accumulated over its microbatches."""
        if not microbatches:
            raise ValueError("gradients: no microbatches")
        grads = loss = None
        sums: dict[str, jax.Array] = {}
        with self.model.mesh_context():
            for mb in microbatches:
                (mb_loss, stats), mb_grads = self._grad(self.model.params, self._place(mb))
                grads = mb_grads if grads is None else accumulate_gradients(grads, mb_grads)
                loss = mb_loss if loss is None else loss + mb_loss
                for k, v in stats.items():
                    sums[k] = v if k not in sums else sums[k] + v
        return grads, loss, {k: float(v) for k, v in sums.items()}

    def train_step(self, microbatches: list[Microbatch]) -> dict[str, float]:
        """One optimizer update from the minibatch in `microbatches`; returns its metrics.

        In a multi-process run every process passes its own rows of the same number of
        microbatches (`packing.pack_across_processes`); the update and metrics are global.
        `time_compile` is the time this step spent compiling programs (tracing included), zero
        once every shape has been seen.
        """
        compiling = compile_seconds()
        grads, loss, sums = self.gradients(microbatches)
        if self._update is None:
            self._update = self._update_program()
        lr = float(self.schedule(self.step))
        with self.model.mesh_context():
            params, self.opt_state, finite, grad_norm = self._update(self.model.params, self.opt_state, grads, loss)
        self.model.params = params
        finite = bool(finite)
        if finite:
            self.step += 1
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite_in_a_row} non-finite updates in a row (loss {float(loss)}); stopping"
                )
        tokens = max(sums["tokens"], 1.0)
        metrics = {
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "skipped_nonfinite": float(not finite),
            "nonfinite_total": float(self.nonfinite_total),
            "entropy": sums["entropy_sum"] / tokens,
            "trained_tokens": sums["tokens"],
            "time_compile": compile_seconds() - compiling,
        }
        for name in ("clip_low", "clip_high"):
            if name in sums:
                metrics[f"{name}_frac"] = sums[name] / tokens
        if "drift_sum" in sums:
            metrics["logprob_drift"] = sums["drift_sum"] / tokens
        if "kl_sum" in sums:
            metrics["kl"] = sums["kl_sum"] / tokens
        return metrics

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of the trainer."""
        return {
            "params": self.model.params,
            "opt_state": self.opt_state,
            "step": np.asarray(self.step, np.int64),
            "nonfinite_total": np.asarray(self.nonfinite_total, np.int64),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.params = _committed(state["params"])
        self.opt_state = _committed(state["opt_state"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self._update = None
