"""Scored completions of whole groups, and their gathering across processes.

Row `g * group_size + i` of a `Rollouts` is sample i of group g. Every process holds the
statistics of every row (lengths, finish reasons, rewards and their components), gathered so that
choosing groups and computing advantages give every process the same answer; the tokens stay on
the process that trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from magistral_jax.distributed import allgather_objects


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
