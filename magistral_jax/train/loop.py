"""The training driver: builds a run from its config, resumes it, runs its steps, evaluates,
checkpoints and logs.

Steps: SFT (`train.sft`), GRPO synchronously (`train.sync_grpo`) or asynchronously
(`train.async_grpo`), both learning through `train.grpo`.

Everything a step draws is a function of `(seed, step)` and of the data source's state, and the
checkpoint holds parameters, optimizer state, step and data state, so a resumed run continues
exactly as an uninterrupted one would have (CPU: bit for bit). A run directory belongs to one run
(`train.run_dir`): another config there is refused before anything is built, and a finished run
says so.

Evaluation (`eval.every`): pass@1 of the current parameters on a fixed held-out problem set,
scored by the Magistral reward, as `eval/...` fields of that step's metrics line; the step is
checkpointed, and the best evaluated checkpoint is kept for `init_from: RUN_DIR` (the paper starts
RL from the cold start's best checkpoint).

Several processes (multi-host, see `magistral_jax.distributed`): each draws `batch /
process_count` examples (its own shard of a problem file; its own block of a procedural source's
batch) and trains on its own rows of every microbatch; GRPO gathers the rewards before choosing
groups and computing advantages, so everything but the packing of rows (hence the order of
floating-point sums) is what one process computes on the whole batch. Checkpoints are written by
every process (Orbax), logs and config by process 0.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from tqdm.auto import tqdm

from magistral_jax.config import ConfigError
from magistral_jax.data.procedural import Example, Source
from magistral_jax.data.sources import make_source
from magistral_jax.distributed import allgather_objects, is_primary
from magistral_jax.train.build import build_trainer, model_config
from magistral_jax.train.config import EvalConfig, RunConfig, to_dict
from magistral_jax.train.grpo import GRPOLearner
from magistral_jax.train.run_dir import (
    Checkpoints,
    MetricsLog,
    check_same_model,
    check_same_run,
    read_metrics,
    write_run_files,
)
from magistral_jax.train.sft import SFTStep
from magistral_jax.train.step import Trainer
from magistral_jax.train.sync_grpo import GRPOStep

TIMING_METRICS = ("time_sampling", "time_scoring", "time_training", "time_step", "tokens_per_s", "time_compile")


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


class Evaluator:
    """pass@1 (and format, language, reward, length) of `k` samples on the first `problems`
    problems of a held-out set, scored by the Magistral reward in this process."""

    def __init__(self, ecfg: EvalConfig, tokenizer, seed: int):
        from magistral_jax.data.sources import problem_section
        from magistral_jax.sampling import SamplingParams

        problems, self.system_prompt = problem_section("eval.data", ecfg.data, tokenizer)
        self.cfg, self.tokenizer, self.problems, self.seed = ecfg, tokenizer, problems[: ecfg.problems], seed
        self.sampling = SamplingParams(temperature=ecfg.temperature, top_p=ecfg.top_p)

    def __call__(self, model) -> dict[str, float]:
        from magistral_jax.evaluation import sample_and_score, summarize

        samples = sample_and_score(
            model,
            self.tokenizer,
            self.problems,
            k=self.cfg.k,
            max_new_tokens=self.cfg.max_new_tokens,
            sampling=self.sampling,
            seed=self.seed,
            system_prompt=self.system_prompt,
            reward=self.cfg.reward,
            progress=False,
        )
        report = summarize(self.problems, samples, self.cfg.k)
        return {f"eval/{k}": float(report[k]) for k in ("pass@1", "format", "language", "reward", "length")}


def _side_files(cfg: RunConfig, tokenizer) -> dict[str, str]:
    """The tokenizer file and the system prompt a run trains with (copied into its directory)."""
    from magistral_jax.data.sources import system_prompt
    from magistral_jax.tokenizer import find_tokenizer

    files: dict[str, str] = {}
    if cfg.tokenizer:
        path = find_tokenizer(cfg.tokenizer) if os.path.isdir(cfg.tokenizer) else cfg.tokenizer
        files[os.path.basename(path)] = path
    if tokenizer is not None and cfg.data.get("name") in ("problems", "traces"):
        prompt = system_prompt(cfg.data.get("system_prompt", "default"), tokenizer)
        if prompt is not None:
            files["SYSTEM_PROMPT.txt"] = prompt
    return files


def _check_prompt(cfg: RunConfig, tokenizer) -> None:
    """A Magistral-reward run whose system prompt contradicts the format it grades is refused."""
    from magistral_jax.data.sources import system_prompt
    from magistral_jax.rl.magistral_rewards import prompt_conflicts

    if cfg.kind != "grpo" or cfg.reward.get("name") != "magistral" or tokenizer is None:
        return
    if cfg.data.get("name") not in ("problems", "traces"):
        return
    style = cfg.reward.get("style", "think_tokens")
    conflict = prompt_conflicts(system_prompt(cfg.data.get("system_prompt", "default"), tokenizer), style)
    if conflict:
        raise ConfigError(f"data.system_prompt: {conflict}")


def _finished(cfg: RunConfig, step: int) -> dict[str, float]:
    """A run already at its last step: says so, returns its last metrics."""
    path = os.path.join(cfg.run_dir, "metrics.jsonl")
    rows = read_metrics(path) if os.path.exists(path) else []
    if is_primary():
        print(
            f"{cfg.run_dir}: already at step {step} of {cfg.steps}; nothing to train "
            "(to go on, raise steps and add resume_overrides=[steps])",
            file=sys.stderr,
        )
    return {k: v for k, v in (rows[-1] if rows else {}).items() if k != "step"}


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
    from magistral_jax.rl.pool import RewardPool

    cfg_dict = to_dict(cfg)
    # A directory that holds another run is refused before anything is built.
    check_same_run(cfg.run_dir, cfg_dict, cfg.resume_overrides)
    check_same_model(cfg.run_dir, model.cfg if model is not None else model_config(cfg))
    if tokenizer is None and cfg.tokenizer:
        from magistral_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.eval.every and tokenizer is None:
        raise ConfigError("eval.every: evaluation needs a tokenizer (set `tokenizer:` in the run config)")
    _check_prompt(cfg, tokenizer)
    os.makedirs(cfg.run_dir, exist_ok=True)
    checkpoints = Checkpoints(cfg.run_dir, cfg.keep_checkpoints)
    start = checkpoints.latest() or 0
    if start >= cfg.steps:
        checkpoints.close()
        return _finished(cfg, start)
    log = rewards = None
    try:
        asynchronous = cfg.kind == "grpo" and cfg.async_rl.enabled
        devices = None
        if asynchronous:
            from magistral_jax.train.async_grpo import split_devices

            devices = split_devices(cfg.async_rl.generator_devices, cfg.async_rl.trainer_devices)
        trainer = build_trainer(cfg, model, devices[1] if devices else None, progress and is_primary())
        source = source if source is not None else make_source(cfg.data, cfg.seed, tokenizer)
        batch = cfg.grpo.prompts_per_step if cfg.kind == "grpo" else cfg.sft.batch_size
        count = jax.process_count()
        if count > 1:
            what = "grpo.prompts_per_step" if cfg.kind == "grpo" else "sft.batch_size"
            if batch % count:
                raise ConfigError(f"{what}: {batch} does not split evenly over {count} processes")
            if isinstance(source, Source):
                source = ProcessShard(source, jax.process_index(), count)
        evaluator = Evaluator(cfg.eval, tokenizer, cfg.seed) if cfg.eval.every else None
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
            source.restore(
                per_process[jax.process_index()] if per_process and len(per_process) == count else meta["data"]
            )
        if is_primary():
            write_run_files(cfg.run_dir, cfg_dict, trainer.model.cfg, _side_files(cfg, tokenizer))
            log = MetricsLog(cfg.run_dir, start)
        # Asynchronous runs score in verifier threads, which hand the work to worker processes
        # (rewards such as math-verify need a process's main thread for their timeouts).
        if cfg.kind == "grpo":
            workers = max(1, cfg.grpo.reward_workers) if asynchronous else cfg.grpo.reward_workers
            settings = {k: v for k, v in cfg.reward.items() if k != "name"}
            rewards = RewardPool(cfg.reward.get("name", ""), settings, workers)
        if cfg.kind == "sft":
            step_fn = SFTStep(cfg, trainer)
        else:
            step_fn = (GRPOLearner if asynchronous else GRPOStep)(cfg, trainer, rewards, tokenizer)
        steps = Steps(cfg, trainer, step_fn, source, checkpoints, log, evaluator, on_step)
        return steps.run(start, meta, devices, progress)
    finally:
        checkpoints.close()
        if log is not None:
            log.close()
        if rewards is not None:
            rewards.close()


@dataclass
class Steps:
    """The steps of a run: each one's metrics logged, evaluations and checkpoints where due."""

    cfg: RunConfig
    trainer: Trainer
    step_fn: Callable[..., dict[str, float]]
    source: Any
    checkpoints: Checkpoints
    log: MetricsLog | None
    evaluator: Evaluator | None
    on_step: Callable[[int, dict], None] | None

    def finish(self, step: int, metrics: dict[str, float], data_state: Callable[[], dict[str, Any]]) -> None:
        """After step `step` (0-based): evaluate, log, report, checkpoint."""
        cfg, done = self.cfg, step + 1
        evaluate = self.evaluator is not None and (done % cfg.eval.every == 0 or done == cfg.steps)
        if evaluate:
            metrics.update(self.evaluator(self.trainer.model))
        if self.log is not None:
            self.log.write(done, metrics)
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward_mean") if k in metrics})
        if self.on_step is not None:
            self.on_step(done, metrics)
        if evaluate or done % cfg.checkpoint_every == 0 or done == cfg.steps:
            score = metrics["eval/pass@1"] if evaluate else None
            self.checkpoints.save(done, self.trainer.state(), {**data_state(), "step": done}, evaluation=score)

    def data_state(self) -> dict[str, Any]:
        out = {"data": self.source.state()}
        if jax.process_count() > 1:
            out["data_per_process"] = allgather_objects(self.source.state())
        return out

    def run(self, start: int, meta: dict[str, Any], devices, progress: bool) -> dict[str, float]:
        """Steps `start` to `cfg.steps`; `devices`: the (generator, trainer) devices of an
        asynchronous run, else None. Returns the last step's metrics."""
        cfg = self.cfg
        self.bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            desc=f"train {cfg.kind}" + (" (async)" if devices else ""),
            unit="step",
            disable=not (progress and is_primary()),
        )
        if devices:
            from magistral_jax.train.async_grpo import train_async

            return train_async(cfg, self.step_fn, self.source, devices[0], self.bar, meta=meta, finish=self.finish)
        metrics: dict[str, float] = {}
        per_process = cfg.sft.batch_size // jax.process_count()
        for step in self.bar:
            t0 = time.perf_counter()
            if cfg.kind == "grpo":  # draws as many groups as its batch needs
                metrics = self.step_fn(self.source, step)
            else:
                metrics = self.step_fn(self.source.next(per_process), step)
            metrics["time_step"] = time.perf_counter() - t0
            self.finish(step, metrics, self.data_state)
        return metrics
