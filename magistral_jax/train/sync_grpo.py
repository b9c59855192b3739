"""The synchronous GRPO driver: sampling and training in turn, on the same devices.

A step draws `prompts_per_step` prompts (each process its share), samples `group_size` completions
each from the policy (`train.policy.Policy`: the trainer's newest weights, colocated, no copy), scores
them in the reward pool, and draws again while the variant still needs groups with signal: as many
prompts as the share of groups with signal so far says it needs (`next_draw`), at most
`max_draws x prompts_per_step` groups in all. Then it trains on the first `prompts_per_step` groups
with signal, in draw order (`train.grpo.GRPOLearner`), and pushes the new weights to the policy. Everything drawn is a
function of `(seed, step, draw)` and the data state, so a resumed run repeats an uninterrupted one.

Several processes: every process samples the whole draw's prompts and scores its own rows; the
statistics are gathered (`train.rollouts.gather`).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from magistral_jax.data.procedural import Example
from magistral_jax.distributed import concat_lists
from magistral_jax.train.config import RunConfig
from magistral_jax.train.grpo import GRPOLearner, budget, step_seed
from magistral_jax.train.policy import Policy
from magistral_jax.train.rollouts import Rollouts, gather
from magistral_jax.train.step import Trainer


def next_draw(batch: int, needed: int, rate: float, unit: int) -> int:
    """How many prompts to draw for `needed` more groups with signal when a share `rate` of the
    groups drawn so far had some: `needed / rate` (a whole batch when none had), rounded up to a
    power of two (the sampler compiles for a few batch sizes only) and to a multiple of `unit` (the
    processes), at most a whole `batch`."""
    want = batch if rate == 0 else math.ceil(needed / rate)
    size = 1 << max(want - 1, 0).bit_length()
    return min(batch, math.ceil(size / unit) * unit)


class GRPOStep(GRPOLearner):
    """One synchronous GRPO step: draw and sample until the batch has its groups with signal, then
    train on them with the parameters that sampled them."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rewards, tokenizer):
        from magistral_jax.api import Model
        from magistral_jax.sampling import Sampler

        super().__init__(cfg, trainer, rewards, tokenizer)
        model = trainer.model
        self.policy = Policy(Model(model.cfg, model.params, model.mesh), version=trainer.step)
        self.sampler = Sampler(self.policy.model, stop_ids=self.stop_ids)

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
        """Draws from `source` (this process's share of each draw) and trains; returns the step's
        metrics."""
        g = self.cfg.grpo
        t0 = time.perf_counter()
        count = jax.process_count()
        parts: list[Rollouts] = []
        size, drawn, found, sample_s, score_s = g.prompts_per_step, 0, 0, 0.0, 0.0
        while True:
            part, sampling, scoring = self.draw(source.next(size // count), step, len(parts))
            parts.append(part)
            drawn, sample_s, score_s = drawn + size, sample_s + sampling, score_s + scoring
            found += int(self.signal(part.rewards, part.components).sum())
            if found >= g.prompts_per_step or drawn >= g.max_draws * g.prompts_per_step:
                break
            size = next_draw(g.prompts_per_step, g.prompts_per_step - found, found / drawn, count)
            size = min(size, g.max_draws * g.prompts_per_step - drawn)
        drawn = Rollouts.concat(parts)
        signal = self.signal(drawn.rewards, drawn.components)
        chosen = np.flatnonzero(signal)[: g.prompts_per_step]
        t1 = time.perf_counter()
        metrics = self.drawn_metrics(drawn, signal, len(chosen))
        metrics.update(self.update(drawn.select(chosen)))
        self.policy.push(self.trainer.model.params, step + 1)
        self.policy.pull()  # colocated: the next draw samples from the new weights
        t2 = time.perf_counter()
        metrics.update(
            time_sampling=sample_s,
            time_scoring=score_s,
            time_training=t2 - t1,
            tokens_per_s=float(drawn.lengths.sum() + metrics["trained_tokens"]) / (t2 - t0),
        )
        return metrics
