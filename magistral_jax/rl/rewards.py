"""Reward functions: the registry, and the trivial rewards of tests and demos.

A reward function has one plain signature,

    fn(prompts: list[str], completions: list[str], **fields) -> list[float] | RewardOutput

where every field is a list aligned with `completions` (the problem's `answer` or `tests`, the
completion's token ids as `completion_ids`, ...) and configuration values arrive as keyword
arguments too. A function may return named components and a reason for each zero reward
(`RewardOutput`); a plain list is its own single component.

Functions are registered by name when their module is imported (`magistral_jax.rl` imports every
reward module of the package), so a config can select them and worker processes (fresh
interpreters, which never inherit the trainer's accelerator state, `rl.pool`) can find them; a
config may also name a function by import path (`package.module:function`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
