"""Reward functions: a registry, and a process pool that runs them beside the training loop.

A reward function has one plain signature,

    fn(prompts: list[str], completions: list[str], **fields) -> list[float] | RewardOutput

where every field is a list aligned with `completions` (the problem's `answer` or `tests`, the
completion's token ids as `completion_ids`, ...) and configuration values arrive as keyword
arguments too. A function may return named components and a reason for each zero reward
(`RewardOutput`); a plain list is its own single component.

Functions are registered by name, so a config can select them and worker processes (started with
`spawn`, which never inherits the trainer's accelerator state) can find them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardOutput:
    """Rewards of a batch, their named components, and why a reward is what it is (or None)."""

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.reasons:
            self.reasons = [None] * len(self.rewards)


RewardFn = Callable[..., "list[float] | RewardOutput"]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`, or the function that `name` = `package.module:function`
    names, imported here: worker processes resolve the name themselves, so they import it too."""
    from magistral_jax.plugins import is_import_path, load_object

    if is_import_path(name):
        return load_object(name, "reward.name")
    if name not in REWARDS:
        import magistral_jax.rl.magistral_rewards  # noqa: F401  (registers `magistral`)
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"reward: unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}") from None


def as_output(result: list[float] | RewardOutput, name: str) -> RewardOutput:
    if isinstance(result, RewardOutput):
        return result
    rewards = [float(r) for r in result]
    return RewardOutput(rewards, {name: rewards})


@register_reward("token_frequency")
def token_frequency(prompts, completions, *, completion_ids, token: int = 7, tokens=None, **_) -> list[float]:
    """The share of the completion's tokens equal to `token` (or in `tokens`): a trivial,
    verifiable reward for tests and demos."""
    wanted = {int(t) for t in tokens} if tokens is not None else {int(token)}
    return [sum(1 for t in ids if t in wanted) / max(len(ids), 1) for ids in completion_ids]


@register_reward("exact_answer")
def exact_answer(prompts, completions, *, completion_ids, answer, **_) -> RewardOutput:
    """1 when the completion's token ids are exactly the answer's (its stop token included), else 0."""
    rewards = [float(list(ids) == list(a)) for ids, a in zip(completion_ids, answer, strict=True)]
    reasons = [None if r else "the completion differs from the answer" for r in rewards]
    return RewardOutput(rewards, {"correct": rewards}, reasons)


def _score(name: str, kwargs: dict[str, Any], prompts, completions, fields) -> RewardOutput:
    return as_output(get_reward(name)(prompts, completions, **kwargs, **fields), name)


class RewardPool:
    """Scores batches with a registered reward, in `workers` processes (0: in this process)."""

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, workers: int = 0):
        get_reward(name)  # fail early on an unknown name
        self.name, self.kwargs, self.workers = name, dict(kwargs or {}), workers
        self._pool = (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
        )

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]) -> RewardOutput:
        n = len(completions)
        for key, values in fields.items():
            if len(values) != n:
                raise ValueError(f"reward field {key!r}: {len(values)} values for {n} completions")
        if self._pool is None:
            out = _score(self.name, self.kwargs, list(prompts), list(completions), fields)
        else:
            size = -(-n // self.workers)
            parts = [slice(i, i + size) for i in range(0, n, size)]
            futures = [
                self._pool.submit(
                    _score,
                    self.name,
                    self.kwargs,
                    list(prompts[s]),
                    list(completions[s]),
                    {k: list(v[s]) for k, v in fields.items()},
                )
                for s in parts
            ]
            outs = [f.result() for f in futures]
            out = RewardOutput(
                [r for o in outs for r in o.rewards],
                {k: [v for o in outs for v in o.components[k]] for k in outs[0].components},
                [r for o in outs for r in o.reasons],
            )
        if len(out.rewards) != n:
            raise ValueError(f"reward {self.name!r} returned {len(out.rewards)} rewards for {n} completions")
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
