"""GRPO's learning step, shared by the synchronous driver (here) and the asynchronous one
(`train.async_grpo`): scored groups in, a batch of groups with signal formed, advantages and loss
weights per minibatch (the objective's variant, `rl.losses`), packing into fixed-token
microbatches, one optimizer update per minibatch.

Forming a batch (paper §2.1: "we filter out all groups with zero advantage when forming training
batches"): variants that drop groups without signal (`magistral`, `dapo`) keep drawing groups until
`prompts_per_step` of them have some, at most `max_draws x prompts_per_step` groups a step (DAPO's
dynamic sampling). A group has signal when its `filter_metric` (the reward, or a component such as
`correct`) is not the same for all its completions (max != min, exactly). Rewards and lengths are
reported over every group drawn; the update sees only the chosen ones, so the loss normaliser and
the minibatch's advantage statistics never count a group without signal.

Synchronous step: draw `prompts_per_step` prompts (each process its share), sample `group_size`
completions each with the trainer's current parameters (no copy), score them in the reward pool,
and repeat while the variant needs more groups with signal; then train on the first
`prompts_per_step` of those in draw order. Everything drawn is a function of `(seed, step, round)`
and the data state, so a resumed run repeats an uninterrupted one.

Several processes: each draws and scores its own share; the rewards and lengths of every group are
gathered (`gather`), so choosing groups and computing advantages give every process the same
answer; tokens stay on the process that trains them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from magistral_jax.config import ConfigError
from magistral_jax.data.procedural import Example
from magistral_jax.distributed import allgather_objects, concat_lists, global_max
from magistral_jax.sharding import batch_shards, process_rows, to_host
from magistral_jax.train.config import RunConfig
from magistral_jax.train.packing import Item, pack_across_processes
from magistral_jax.train.step import Trainer


def budget(example: Example, default: int) -> int:
    """An example's budget of new tokens: its `max_new_tokens` field, capped by the run's."""
    return min(int(example.fields.get("max_new_tokens", default)), default)


def step_seed(seed: int, step: int, draw: int = 0) -> int:
    """The sampling seed of draw `draw` of step `step`."""
    entropy = (seed, step, 7) if draw == 0 else (seed, step, 7, draw)
    return int(np.random.default_rng(entropy).integers(2**31))


def row_len(cfg: RunConfig, longest: int) -> int:
    """Slots per packed row: the config's, or the longest sequence rounded up to 64."""
    return cfg.row_len or max(64, math.ceil(longest / 64) * 64)


def microbatch_rows(cfg: RunConfig, length: int, trainer: Trainer) -> int:
    """Rows of a (global) microbatch: `microbatch_tokens / length`; with several processes a
    multiple of the batch shards and processes, so each process holds its own block of rows."""
    rows = max(1, cfg.microbatch_tokens // length)
    count = jax.process_count()
    if count == 1:
        return rows
    unit = math.lcm(batch_shards(trainer.model.mesh, trainer.model.cfg.rules), count)
    return max(unit, rows // unit * unit)


@dataclass
class Rollouts:
    """Scored completions of whole groups: row `g * group_size + i` is sample i of group g.

    The statistics (`lengths`, `finish_reasons`, `rewards`, `components`) cover every row; the
    tokens (`prompts` per group, `completions` and `logprobs` per row) only the rows this process
    trains, None elsewhere.
    """

    group_size: int
    prompts: list[list[int] | None]
    completions: list[list[int] | None]  # the stop token included
    logprobs: list[np.ndarray | None]  # the sampler's log-probabilities (pi_old)
    lengths: np.ndarray
    finish_reasons: list[str]
    rewards: np.ndarray
    components: dict[str, np.ndarray]

    @property
    def n_groups(self) -> int:
        return len(self.rewards) // self.group_size

    def select(self, groups: np.ndarray) -> Rollouts:
        """Groups `groups` (indices), in that order."""
        rows = (np.asarray(groups, int)[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
        return Rollouts(
            self.group_size,
            [self.prompts[g] for g in groups],
            [self.completions[r] for r in rows],
            [self.logprobs[r] for r in rows],
            self.lengths[rows],
            [self.finish_reasons[r] for r in rows],
            self.rewards[rows],
            {k: v[rows] for k, v in self.components.items()},
        )

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        first = parts[0]
        return Rollouts(
            first.group_size,
            [p for part in parts for p in part.prompts],
            [c for part in parts for c in part.completions],
            [x for part in parts for x in part.logprobs],
            np.concatenate([part.lengths for part in parts]),
            [f for part in parts for f in part.finish_reasons],
            np.concatenate([part.rewards for part in parts]),
            {k: np.concatenate([part.components[k] for part in parts]) for k in first.components},
        )


def gather(local: Rollouts) -> Rollouts:
    """Every process's groups, in process order: the statistics of all, the tokens of this
    process's own (one process: `local` itself)."""
    if jax.process_count() == 1:
        return local
    stats = {
        "lengths": np.asarray(local.lengths).tolist(),
        "finish_reasons": list(local.finish_reasons),
        "rewards": np.asarray(local.rewards, np.float64).tolist(),
        "components": {k: np.asarray(v, np.float64).tolist() for k, v in local.components.items()},
    }
    parts = []
    for p, s in enumerate(allgather_objects(stats)):
        mine = p == jax.process_index()
        rows, groups = len(s["rewards"]), len(s["rewards"]) // local.group_size
        parts.append(
            Rollouts(
                local.group_size,
                local.prompts if mine else [None] * groups,
                local.completions if mine else [None] * rows,
                local.logprobs if mine else [None] * rows,
                np.asarray(s["lengths"], np.int64),
                s["finish_reasons"],
                np.asarray(s["rewards"], np.float64),
                {k: np.asarray(v, np.float64) for k, v in s["components"].items()},
            )
        )
    return Rollouts.concat(parts)


class GRPOLearner:
    """Scores groups, tells which have signal, reports a batch and trains on it (both drivers)."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rewards, tokenizer):
        from magistral_jax.rl.losses import get_variant
        from magistral_jax.sampling import SamplingParams

        self.cfg, self.trainer, self.rewards, self.tokenizer = cfg, trainer, rewards, tokenizer
        g = cfg.grpo
        self.variant = get_variant(g.loss)
        self.sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        self.stop_ids = (tokenizer.eos_id if tokenizer is not None else 2,)
        self.ref_params = jax.tree.map(lambda x: x.copy(), trainer.model.params) if self.variant.kl else None

    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        if ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        # Control tokens stay as text ([THINK] ...), as the rewards read them.
        return self.tokenizer.decode(ids, keep_special=True)

    def score(self, prompts: list[list[int]], completions: list[list[int]], examples: list[Example]):
        """The reward pool's output for completions of their prompts (one example per row)."""
        fields: dict[str, list[Any]] = {"completion_ids": completions}
        for key in examples[0].fields:
            fields[key] = [e.fields[key] for e in examples]
        return self.rewards([self._text(p) for p in prompts], [self._text(c) for c in completions], **fields)

    def signal(self, rewards: np.ndarray, components: dict[str, np.ndarray]) -> np.ndarray:
        """[groups] bool: the group's `filter_metric` varies (always True for variants that keep
        every group)."""
        from magistral_jax.rl.losses import constant_groups

        g = self.cfg.grpo
        size = g.group_size
        if not self.variant.filter_constant_groups:
            return np.ones(len(rewards) // size, bool)
        if g.filter_metric == "reward":
            values = rewards
        elif g.filter_metric in components:
            values = components[g.filter_metric]
        else:
            raise ConfigError(
                f"grpo.filter_metric: {g.filter_metric!r} is not a component of the reward "
                f"({', '.join(components)}) nor 'reward'"
            )
        return ~constant_groups(np.asarray(values, np.float64), np.arange(len(values)) // size)[::size]

    def drawn_metrics(self, drawn: Rollouts, signal: np.ndarray, chosen: int) -> dict[str, float]:
        """What every group drawn this step says about the policy, and how many were kept."""
        return {
            "reward_mean": float(drawn.rewards.mean()),
            **{f"reward_{k}": float(np.mean(v)) for k, v in drawn.components.items()},
            "groups_drawn": float(drawn.n_groups),
            "groups_trained": float(chosen),
            "filtered_groups_frac": float(1.0 - signal.mean()),
            "completion_len_mean": float(drawn.lengths.mean()),
            "completion_len_max": float(drawn.lengths.max()),
            "stopped_frac": float(np.mean([f == "stop" for f in drawn.finish_reasons])),
        }

    def update(self, r: Rollouts) -> dict[str, float]:
        """Splits the chosen groups into minibatches and takes one optimizer step on each."""
        cfg, g = self.cfg, self.cfg.grpo
        groups = np.arange(len(r.rewards)) // g.group_size
        lengths = np.asarray(r.lengths)
        metrics: dict[str, float] = {}
        updates, saved = [], []
        longest = global_max(max((len(p) for p in r.prompts if p is not None), default=0))
        length = row_len(cfg, longest + g.max_new_tokens)
        for part in np.array_split(np.arange(r.n_groups), min(g.minibatches, r.n_groups)) if r.n_groups else []:
            rows_in = np.flatnonzero(np.isin(groups, part))
            adv, weights = self.variant.fn(r.rewards[rows_in], groups[rows_in], lengths[rows_in], g.max_new_tokens)
            items = [
                Item(
                    tokens=r.prompts[row // g.group_size] + r.completions[row],
                    loss_start=len(r.prompts[row // g.group_size]),
                    weight=float(w),
                    advantage=float(a),
                    old_logprobs=np.asarray(r.logprobs[row]).tolist(),
                )
                for row, a, w in zip(rows_in, adv, weights, strict=True)
                if r.completions[row] is not None
            ]
            packing = pack_across_processes(items, length, microbatch_rows(cfg, length, self.trainer))
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


class GRPOStep(GRPOLearner):
    """One synchronous GRPO step: draw and sample until the batch has its groups with signal, then
    train on them with the parameters that sampled them."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rewards, tokenizer):
        from magistral_jax.sampling import Sampler

        super().__init__(cfg, trainer, rewards, tokenizer)
        self.sampler = Sampler(trainer.model, stop_ids=self.stop_ids)

    def draw(self, examples: list[Example], step: int, draw: int) -> tuple[Rollouts, float, float]:
        """Samples and scores the groups of `examples` (this process's share of one draw); returns
        them with the seconds spent sampling and scoring."""
        g = self.cfg.grpo
        t0 = time.perf_counter()
        # Every process samples the whole draw's prompts (in process order) and scores its own.
        counts = concat_lists([len(examples)])
        first = sum(counts[: jax.process_index()]) * g.group_size
        prompts = concat_lists([e.prompt for e in examples])
        out = self.sampler.sample(
            prompts,
            max_new_tokens=concat_lists([budget(e, g.max_new_tokens) for e in examples]),
            n=g.group_size,
            sampling=self.sampling,
            seed=step_seed(self.cfg.seed, step, draw),
        )
        t1 = time.perf_counter()
        mine = range(first, first + len(examples) * g.group_size)
        completions = [out.completion(r) for r in mine]
        own_prompts = [e.prompt for e in examples]
        scored = self.score(
            [own_prompts[(r - first) // g.group_size] for r in mine],
            completions,
            [examples[(r - first) // g.group_size] for r in mine],
        )
        local = Rollouts(
            g.group_size,
            own_prompts,
            completions,
            [out.logprobs[r, : out.lengths[r]] for r in mine],
            np.asarray(out.lengths)[first : mine.stop],
            out.finish_reasons[first : mine.stop],
            np.asarray(scored.rewards, np.float64),
            {k: np.asarray(v, np.float64) for k, v in scored.components.items()},
        )
        return gather(local), t1 - t0, time.perf_counter() - t1

    def __call__(self, source, step: int) -> dict[str, float]:
        """Draws from `source` (this process's share, `prompts_per_step / process_count` prompts a
        draw) and trains; returns the step's metrics."""
        g = self.cfg.grpo
        t0 = time.perf_counter()
        per_process = g.prompts_per_step // jax.process_count()
        parts: list[Rollouts] = []
        found, sample_s, score_s = 0, 0.0, 0.0
        for draw in range(g.max_draws):
            part, sampling, scoring = self.draw(source.next(per_process), step, draw)
            parts.append(part)
            sample_s, score_s = sample_s + sampling, score_s + scoring
            found += int(self.signal(parts[-1].rewards, parts[-1].components).sum())
            if found >= g.prompts_per_step:
                break
        drawn = Rollouts.concat(parts)
        signal = self.signal(drawn.rewards, drawn.components)
        chosen = np.flatnonzero(signal)[: g.prompts_per_step]
        t1 = time.perf_counter()
        metrics = self.drawn_metrics(drawn, signal, len(chosen))
        metrics.update(self.update(drawn.select(chosen)))
        t2 = time.perf_counter()
        metrics.update(
            time_sampling=sample_s,
            time_scoring=score_s,
            time_training=t2 - t1,
            tokens_per_s=float(drawn.lengths.sum() + metrics["trained_tokens"]) / (t2 - t0),
        )
        return metrics
