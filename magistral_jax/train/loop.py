"""The training loops: GRPO (synchronous and colocated here; asynchronous in `train.async_grpo`) and SFT,
resumable from Orbax checkpoints.

GRPO, one step: draw `prompts_per_step` prompts; sample `group_size` completions each with the
trainer's own parameters (no copy) and their log-probabilities; score them in the reward pool;
drop constant groups if the variant says so; cut the kept groups into `minibatches`; for each,
compute advantages and loss weights from whole groups, pack into fixed-token microbatches and take
one optimizer step.

SFT, one step: `batch_size` examples, cross-entropy on the answer (assistant) tokens only, mean
over the batch's trained tokens.

Everything a step draws is a function of `(seed, step)` and of the data source's state, and the
checkpoint holds parameters, optimizer state, step and data state, so a resumed run continues
exactly as an uninterrupted one would have (CPU: bit for bit).

Outputs in `run_dir`: `checkpoints/` (the last `keep_checkpoints`), `metrics.jsonl` (one line per
step), `tb/` (TensorBoard event files) and `config.yaml`.

Several processes (multi-host, see `magistral_jax.distributed`): each draws `batch /
process_count` examples (its own shard of a problem file; its own block of a procedural source's
batch), samples the whole step's prompts (gathered), scores its own completions, and trains on its
own rows of every microbatch. Rewards are gathered before filtering and advantages, so everything
but the packing of rows (hence the order of floating-point sums) is what one process computes on
the whole batch. Checkpoints are written by every process (Orbax), logs and config by process 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from magistral_jax.config import ConfigError, ModelConfig, flatten_model_fields, get_preset, read_config
from magistral_jax.data.procedural import Example, Source
from magistral_jax.data.sources import make_source
from magistral_jax.distributed import allgather, allgather_objects, is_primary
from magistral_jax.sharding import batch_shards, process_rows, to_host
from magistral_jax.train.config import RunConfig, to_dict
from magistral_jax.train.packing import Item, pack_across_processes
from magistral_jax.train.step import Objective, Trainer

TIMING_METRICS = ("time_sampling", "time_scoring", "time_training", "time_step", "tokens_per_s", "time_compile")


def _overrides(cfg: RunConfig) -> dict:
    # `text: {n_layers: 2}` in YAML or `model_overrides.text.n_layers=2` on the command line.
    return flatten_model_fields(cfg.model_overrides)


def _model_config(cfg: RunConfig) -> ModelConfig:
    if os.path.exists(cfg.model) or cfg.model.endswith((".yaml", ".yml")):
        base = read_config(cfg.model)
    else:
        base = get_preset(cfg.model)
    return base.replace(**_overrides(cfg))


def build_model(cfg: RunConfig, mesh):
    from magistral_jax.api import init_model, load_model

    if cfg.init_from:
        # A training run directory (an SFT cold start, say) or any checkpoint load_model reads.
        if is_run_dir(cfg.init_from):
            model = load_run_model(cfg.init_from)
        else:
            model = load_model(cfg.init_from, mesh=mesh, dtype=None)
        model.cfg = model.cfg.replace(**_overrides(cfg))
        if model.cfg.param_dtype != cfg.param_dtype:
            model.params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), model.params)
            model.cfg = model.cfg.replace(param_dtype=cfg.param_dtype)
        return model
    return init_model(_model_config(cfg).replace(param_dtype=cfg.param_dtype), cfg.seed, mesh=mesh)


def build_trainer(cfg: RunConfig, model=None, devices: list | None = None) -> Trainer:
    """The trainer of a run, around `model` or the model the config builds, on `devices` (default
    all; a given model is moved onto their mesh)."""
    from magistral_jax.sharding import make_mesh, parse_mesh

    mesh = None
    if cfg.mesh or devices is not None or len(jax.devices()) > 1:
        mesh = make_mesh(**parse_mesh(cfg.mesh), devices=devices)
    if model is None:
        model = build_model(cfg, mesh)
    elif devices is not None:
        from magistral_jax.model import param_specs
        from magistral_jax.model import params as P

        model.params = jax.device_put(model.params, P.shardings(param_specs(model.cfg), mesh, model.cfg.rules))
        model.mesh = mesh
    objective = Objective(
        kind="sft" if cfg.kind == "sft" else "pg",
        eps_low=cfg.grpo.eps_low,
        eps_high=cfg.grpo.eps_high,
        kl_coef=cfg.grpo.kl_coef,
        temperature=cfg.grpo.temperature if cfg.kind == "grpo" else 1.0,
    )
    updates_per_step = cfg.grpo.minibatches if cfg.kind == "grpo" else 1
    return Trainer(
        model,
        cfg.optimizer,
        objective,
        total_steps=cfg.steps * updates_per_step,
        chunk=cfg.logprob_chunk,
        max_nonfinite=cfg.max_nonfinite,
    )


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoints"))


def load_run_model(run_dir: str):
    """The model of a training run directory at its latest checkpoint (the run's whole train
    state is restored, so this suits models whose optimizer state fits; export larger ones)."""
    from magistral_jax.train.config import load_run_config

    cfg = load_run_config(os.path.join(run_dir, "config.yaml"))
    checkpoints = Checkpoints(run_dir, cfg.keep_checkpoints)
    try:
        step = checkpoints.latest()
        if step is None:
            raise ConfigError(f"{run_dir}: the run has no checkpoint yet")
        trainer = build_trainer(cfg)
        state, _ = checkpoints.restore(step, trainer.state())
        trainer.load_state(state)
    finally:
        checkpoints.close()
    return trainer.model


class MetricsLog:
    """metrics.jsonl (truncated to the resumed step) and TensorBoard events."""

    def __init__(self, run_dir: str, resume_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class Checkpoints:
    """Orbax train-state checkpoints: the trainer's state plus a JSON of the data state."""

    def __init__(self, run_dir: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        ocp = self.ocp
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        ocp = self.ocp
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
            like,
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _row_len(cfg: RunConfig, longest: int) -> int:
    return cfg.row_len or max(64, math.ceil(longest / 64) * 64)


def _step_key(seed: int, step: int) -> int:
    return int(np.random.default_rng((seed, step, 7)).integers(2**31))


def _rows(cfg: RunConfig, row_len: int, trainer: Trainer) -> int:
    """Rows of a (global) microbatch: `microbatch_tokens / row_len`; with several processes a
    multiple of the batch shards and processes, so each process holds its own block of rows."""
    rows = max(1, cfg.microbatch_tokens // row_len)
    count = jax.process_count()
    if count == 1:
        return rows
    unit = math.lcm(batch_shards(trainer.model.mesh, trainer.model.cfg.rules), count)
    return max(unit, rows // unit * unit)


def _global_sum(x):
    return x if jax.process_count() == 1 else allgather(x).sum().item()


def _global_max(x):
    return x if jax.process_count() == 1 else allgather(x).max().item()


def _concat(values: list) -> list:
    """Every process's list, concatenated in process order (one process: the list itself)."""
    if jax.process_count() == 1:
        return values
    return [v for part in allgather_objects(values) for v in part]


class ProcessShard:
    """A source that draws the same examples on every process (the procedural ones), cut into
    per-process blocks: `next(n)` draws the `n * process_count` examples of the global batch and
    keeps this process's block, so the processes together train on exactly what one would."""

    def __init__(self, source, index: int, count: int):
        self.source, self.index, self.count = source, index, count

    def next(self, n: int) -> list[Example]:
        return self.source.next(n * self.count)[self.index * n : (self.index + 1) * n]

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.source.restore(state)


def budget(example: Example, default: int) -> int:
    """An example's budget of new tokens: its `max_new_tokens` field, capped by the run's."""
    return min(int(example.fields.get("max_new_tokens", default)), default)


@dataclass
class Rollouts:
    """Scored completions of whole groups: row `g * group_size + i` is sample i of prompt g.

    The per-row statistics (`lengths`, `finish_reasons`, `rewards`, `components`) cover the whole
    batch; the tokens (`prompts`, `completions`, `logprobs`) may cover only the rows from
    `first_row` on (a process's own rows when each process generates its own, asynchronously).
    """

    prompts: list[list[int]]  # per group, from group first_row // group_size
    completions: list[list[int]]  # per row from first_row, the stop token included
    logprobs: list[np.ndarray]  # per row from first_row: the sampler's log-probabilities (pi_old)
    lengths: np.ndarray
    finish_reasons: list[str]
    rewards: np.ndarray
    components: dict[str, np.ndarray]
    first_row: int = 0


class GRPOStep:
    """One synchronous GRPO step (sampling, scoring, filtering, minibatches, updates)."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rewards, tokenizer):
        from magistral_jax.rl.losses import get_variant
        from magistral_jax.sampling import Sampler, SamplingParams

        self.cfg, self.trainer, self.rewards, self.tokenizer = cfg, trainer, rewards, tokenizer
        g = cfg.grpo
        self.variant = get_variant(g.loss)
        if self.variant.kl and not g.kl_coef:
            raise ConfigError(f"grpo.kl_coef: the {g.loss} variant needs a KL coefficient > 0")
        self.sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        eos = tokenizer.eos_id if tokenizer is not None else 2
        self.sampler = Sampler(trainer.model, stop_ids=(eos,))
        self.ref_params = jax.tree.map(lambda x: x.copy(), trainer.model.params) if self.variant.kl else None

    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        # Control tokens stay as text ([THINK] ...), as the rewards read them.
        return self.tokenizer.decode(ids, keep_special=True)

    def __call__(self, examples: list[Example], step: int) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.perf_counter()
        # Every process samples the whole step's prompts (in process order) and scores its own.
        counts = _concat([len(examples)])
        first = sum(counts[: jax.process_index()]) * g.group_size if len(counts) > 1 else 0
        prompts = _concat([e.prompt for e in examples])
        out = self.sampler.sample(
            prompts,
            max_new_tokens=_concat([budget(e, g.max_new_tokens) for e in examples]),
            n=g.group_size,
            sampling=self.sampling,
            seed=_step_key(cfg.seed, step),
        )
        t1 = time.perf_counter()
        rows = len(out.lengths)
        completions = [out.completion(r) for r in range(rows)]
        mine = range(first, first + len(examples) * g.group_size)  # this process's rows
        scored = self.score(
            [prompts[r // g.group_size] for r in mine],
            [completions[r] for r in mine],
            [examples[(r - first) // g.group_size] for r in mine],
        )
        rewards, components = np.asarray(scored.rewards, np.float64), scored.components
        if jax.process_count() > 1:  # every process's scores, in row order
            rewards = np.asarray(_concat(rewards.tolist()), np.float64)
            components = {k: _concat(np.asarray(v, np.float64).tolist()) for k, v in components.items()}
        t2 = time.perf_counter()
        rollouts = Rollouts(
            prompts=prompts,
            completions=completions,
            logprobs=[out.logprobs[r, : out.lengths[r]] for r in range(rows)],
            lengths=np.asarray(out.lengths),
            finish_reasons=out.finish_reasons,
            rewards=rewards,
            components={k: np.asarray(v, np.float64) for k, v in components.items()},
        )
        metrics = self.update(rollouts, mine)
        t3 = time.perf_counter()
        metrics.update(
            time_sampling=t1 - t0,
            time_scoring=t2 - t1,
            time_training=t3 - t2,
            tokens_per_s=float(out.lengths.sum() + metrics["trained_tokens"]) / (t3 - t0),
        )
        return metrics

    def score(self, prompts: list[list[int]], completions: list[list[int]], examples: list[Example]):
        """The reward pool's output for completions of their prompts (one example per row)."""
        fields: dict[str, list[Any]] = {"completion_ids": completions}
        for key in examples[0].fields:
            fields[key] = [e.fields[key] for e in examples]
        return self.rewards([self._text(p) for p in prompts], [self._text(c) for c in completions], **fields)

    def update(self, r: Rollouts, mine: range | None = None) -> dict[str, float]:
        """Filters, splits into minibatches and trains on scored groups; `mine`: the rows this
        process trains (default all). Returns the step's metrics but its timings."""
        from magistral_jax.rl.losses import constant_groups

        cfg, g = self.cfg, self.cfg.grpo
        rows = len(r.lengths)
        mine = range(rows) if mine is None else mine
        groups = np.arange(rows) // g.group_size
        lengths = np.asarray(r.lengths)
        if g.filter_metric == "reward":
            signal = r.rewards
        elif g.filter_metric in r.components:
            signal = r.components[g.filter_metric]
        else:
            raise ConfigError(
                f"grpo.filter_metric: {g.filter_metric!r} is not a component of the reward "
                f"({', '.join(r.components)}) nor 'reward'"
            )
        constant = constant_groups(signal, groups)
        keep = ~constant if self.variant.filter_constant_groups else np.ones(rows, bool)
        metrics: dict[str, float] = {
            "reward_mean": float(r.rewards.mean()),
            **{f"reward_{k}": float(np.mean(v)) for k, v in r.components.items()},
            "filtered_groups_frac": float(constant.reshape(-1, g.group_size)[:, 0].mean())
            if self.variant.filter_constant_groups
            else 0.0,
            "completion_len_mean": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "stopped_frac": float(np.mean([f == "stop" for f in r.finish_reasons])),
        }
        kept_groups = np.unique(groups[keep])
        updates = []
        row_len = _row_len(cfg, _global_max(max(len(p) for p in r.prompts)) + g.max_new_tokens)
        local = lambda row: row - r.first_row  # noqa: E731
        saved = []
        for part in np.array_split(kept_groups, min(g.minibatches, len(kept_groups))) if len(kept_groups) else []:
            rows_in = np.flatnonzero(np.isin(groups, part))
            adv, weights = self.variant.fn(r.rewards[rows_in], groups[rows_in], lengths[rows_in], g.max_new_tokens)
            items = [
                Item(
                    tokens=r.prompts[local(row) // g.group_size] + r.completions[local(row)],
                    loss_start=len(r.prompts[local(row) // g.group_size]),
                    weight=float(w),
                    advantage=float(a),
                    old_logprobs=np.asarray(r.logprobs[local(row)]).tolist(),
                )
                for row, a, w in zip(rows_in, adv, weights, strict=True)
                if mine.start <= row < mine.stop
            ]
            packing = pack_across_processes(items, row_len, _rows(cfg, row_len, self.trainer))
            if self.ref_params is not None:
                self._fill_reference(packing.microbatches)
            saved.append(packing.padding_saved)
            updates.append(self.trainer.train_step(packing.microbatches))
        if updates:
            for k in updates[0]:
                metrics[k] = float(np.mean([u[k] for u in updates]))
            metrics["padding_saved"] = float(np.mean(saved))
        metrics.update(updates=float(len(updates)), trained_tokens=float(sum(u["trained_tokens"] for u in updates)))
        return metrics

    def _fill_reference(self, microbatches) -> None:
        from magistral_jax.model.decoder import token_logprobs

        trainer = self.trainer
        model = trainer.model
        fn = jax.jit(token_logprobs, static_argnames=("cfg", "temperature", "chunk"))
        with model.mesh_context():
            for mb in microbatches:
                tokens = trainer.place(mb.tokens)
                logp, _ = fn(
                    self.ref_params,
                    tokens,
                    trainer.place(mb.targets),
                    model.cfg,
                    positions=trainer.place(mb.positions),
                    segment_ids=trainer.place(mb.segment_ids),
                    temperature=self.cfg.grpo.temperature,
                    chunk=self.cfg.logprob_chunk,
                )
                logp = to_host(logp)
                if jax.process_count() > 1:  # this process's rows of the global microbatch
                    logp = logp[process_rows(tokens.sharding, tokens.shape)]
                mb.ref_logprobs = np.where(mb.weights > 0, logp, 0.0).astype(np.float32)


class SFTStep:
    """One SFT step: cross-entropy on the answer tokens, mean over the batch's answer tokens."""

    def __init__(self, cfg: RunConfig, trainer: Trainer):
        self.cfg, self.trainer = cfg, trainer

    def __call__(self, examples: list[Example], step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if any(e.answer is None for e in examples):
            raise ConfigError("data: SFT needs examples with answers")
        # With several processes, each holds its own examples; the mean is over the global batch.
        total = _global_sum(sum(len(e.answer) for e in examples))
        items = [Item(tokens=e.prompt + e.answer, loss_start=len(e.prompt), weight=1.0 / total) for e in examples]
        row_len = _row_len(self.cfg, _global_max(max(len(i.tokens) for i in items)))
        packing = pack_across_processes(items, row_len, _rows(self.cfg, row_len, self.trainer))
        metrics = self.trainer.train_step(packing.microbatches)
        seconds = time.perf_counter() - t0
        metrics.update(
            padding_saved=packing.padding_saved,
            time_training=seconds,
            tokens_per_s=_global_sum(sum(len(i.tokens) for i in items)) / seconds,
        )
        return metrics


def run(
    cfg: RunConfig,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    *,
    tokenizer=None,
    source=None,
    model=None,
) -> dict[str, float]:
    """Trains (or resumes training) until `cfg.steps`; returns the last step's metrics.

    `tokenizer`, `source` and `model` replace what the config would build (the demo passes its
    own); a given model is trained in place.

    With several processes (`magistral_jax.distributed`), every process calls `run` with the same
    config; a given `source` draws this process's examples (a procedural `Source`, which draws
    the same on every process, is cut into per-process blocks) and the batch is split evenly
    over the processes.
    """
    import yaml

    from magistral_jax.rl.rewards import RewardPool

    os.makedirs(cfg.run_dir, exist_ok=True)
    asynchronous = cfg.kind == "grpo" and cfg.async_rl.enabled
    devices = None
    if asynchronous:
        from magistral_jax.train.async_grpo import split_devices

        devices = split_devices(cfg.async_rl.generator_devices, cfg.async_rl.trainer_devices)
    trainer = build_trainer(cfg, model, devices[1] if devices else None)
    if tokenizer is None and cfg.tokenizer:
        from magistral_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    source = source if source is not None else make_source(cfg.data, cfg.seed, tokenizer)
    batch = cfg.grpo.prompts_per_step if cfg.kind == "grpo" else cfg.sft.batch_size
    count, primary = jax.process_count(), is_primary()
    if count > 1:
        what = "grpo.prompts_per_step" if cfg.kind == "grpo" else "sft.batch_size"
        if batch % count:
            raise ConfigError(f"{what}: {batch} does not split evenly over {count} processes")
        if isinstance(source, Source):
            source = ProcessShard(source, jax.process_index(), count)
    checkpoints = Checkpoints(cfg.run_dir, cfg.keep_checkpoints)
    start = checkpoints.latest() or 0
    meta: dict[str, Any] = {}
    if start:
        state, meta = checkpoints.restore(start, trainer.state())
        trainer.load_state(state)
        if "async_per_process" in meta:  # an asynchronous multi-process run: this process's part
            parts = meta["async_per_process"]
            if len(parts) != count:
                raise ConfigError(f"the checkpoint was written by {len(parts)} processes, not {count}")
            meta = {**meta, **parts[jax.process_index()]}
        # Each process resumes its own data state where the checkpoint has one per process.
        per_process = meta.get("data_per_process")
        source.restore(per_process[jax.process_index()] if per_process and len(per_process) == count else meta["data"])
    if primary:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    log = MetricsLog(cfg.run_dir, start) if primary else None
    # Asynchronous runs score in verifier threads, which hand the work to worker processes (rewards
    # such as math-verify need a process's main thread for their timeouts).
    workers = max(1, cfg.grpo.reward_workers) if asynchronous else cfg.grpo.reward_workers
    rewards = (
        RewardPool(cfg.reward.get("name", ""), {k: v for k, v in cfg.reward.items() if k != "name"}, workers)
        if cfg.kind == "grpo"
        else None
    )
    step_fn = GRPOStep(cfg, trainer, rewards, tokenizer) if cfg.kind == "grpo" else SFTStep(cfg, trainer)
    metrics: dict[str, float] = {}

    def finish(step: int, step_metrics: dict[str, float], data_state: Callable[[], dict[str, Any]]) -> None:
        if log is not None:
            log.write(step + 1, step_metrics)
        bar.set_postfix({k: f"{step_metrics[k]:.3g}" for k in ("loss", "reward_mean") if k in step_metrics})
        if on_step is not None:
            on_step(step + 1, step_metrics)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoints.save(step + 1, trainer.state(), {**data_state(), "step": step + 1})

    def data_state() -> dict[str, Any]:
        out = {"data": source.state()}
        if count > 1:
            out["data_per_process"] = allgather_objects(source.state())
        return out

    try:
        bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            desc=f"train {cfg.kind}" + (" (async)" if asynchronous else ""),
            unit="step",
            disable=not (progress and primary),
        )
        if asynchronous:
            from magistral_jax.train.async_grpo import train_async

            metrics = train_async(cfg, step_fn, source, devices[0], bar, meta=meta, finish=finish)
        else:
            for step in bar:
                t0 = time.perf_counter()
                metrics = step_fn(source.next(batch // count), step)
                metrics["time_step"] = time.perf_counter() - t0
                finish(step, metrics, data_state)
    finally:
        checkpoints.close()
        if log is not None:
            log.close()
        if rewards is not None:
            rewards.close()
    return metrics
