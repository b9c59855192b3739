"""GRPO's learning step, shared by the synchronous (`train.sync_grpo`) and the asynchronous
(`train.async_grpo`) drivers: score groups, tell which have signal, report a batch, and train on it
(advantages and loss weights per minibatch from the objective's variant, `rl.losses`; packing into
fixed-token microbatches; one optimizer update per minibatch).

Forming a batch (paper §2.1: "we filter out all groups with zero advantage when forming training
batches"): for variants that drop groups without signal, the drivers keep drawing groups until
`prompts_per_step` of them have some, at most `max_draws x prompts_per_step` groups a step (DAPO's
dynamic sampling). A group has signal when its `filter_metric` (the reward, or a component such as
`correct`) is not the same for all its completions (max != min, exactly). Rewards and lengths are
reported over every group drawn; the update sees only the chosen ones, so the loss normaliser and
the minibatch's advantage statistics never count a group without signal.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from magistral_jax.config import ConfigError
from magistral_jax.data.procedural import Example
from magistral_jax.distributed import global_max
from magistral_jax.sharding import process_rows, to_host
from magistral_jax.train.config import RunConfig
from magistral_jax.train.packing import Item, microbatch_rows, pack_across_processes, row_length
from magistral_jax.train.rollouts import Rollouts
from magistral_jax.train.step import Trainer


def budget(example: Example, default: int) -> int:
    """An example's budget of new tokens: its `max_new_tokens` field, capped by the run's."""
    return min(int(example.fields.get("max_new_tokens", default)), default)


def step_seed(seed: int, step: int, draw: int = 0) -> int:
    """The sampling seed of draw `draw` of step `step`."""
    entropy = (seed, step, 7) if draw == 0 else (seed, step, 7, draw)
    return int(np.random.default_rng(entropy).integers(2**31))


class GRPOLearner:
    """Scores groups, tells which have signal, reports a batch and trains on it (both drivers)."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rewards, tokenizer):
        from magistral_jax.sampling import SamplingParams

        self.cfg, self.trainer, self.rewards, self.tokenizer = cfg, trainer, rewards, tokenizer
        g = cfg.grpo
        self.variant = g.variant()
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
        if not self.variant.filter_groups:
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
        length = row_length(cfg.row_len, longest + g.max_new_tokens)
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
            rows = microbatch_rows(cfg.microbatch_tokens, length, self.trainer.model.mesh, self.trainer.model.cfg.rules)
            packing = pack_across_processes(items, length, rows)
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
