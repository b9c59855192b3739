"""Policy-gradient objectives of the GRPO family, as combinations of registered parts.

A variant turns the rewards of a minibatch of complete groups into per-sequence advantages and
per-sequence token weights (the loss normaliser), on the host, before the minibatch is cut into
microbatches. The loss of the minibatch is then a plain weighted sum over tokens,

    loss = sum_{i, t} w_i * l_{i,t},   l_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
           (+ beta * w_i * KL_{i,t} for variants with a KL term)

so it, and its gradient, are the same however the minibatch is split into microbatches.
Weights include the mean over the minibatch's groups (the expectation over prompts).

A variant is a named combination of registry keys, as tunix composes its GRPO family:

- `ADVANTAGES` (`register_advantage`): rewards and group ids -> advantages;
- `AGGREGATIONS` (`register_aggregation`): group ids, lengths and the budget -> each sequence's
  token weight, before the mean over groups;
- whether groups without signal are dropped when batches are formed (`filter_groups`), and
  whether a k3 KL term to a reference policy is added (`kl`, with the run's `kl_coef`).

The four named ones (`reference/magistral-rl-recipe.md`, sections 1 and 6):

| variant | advantage | aggregation | filter_groups | kl |
|---|---|---|---|---|
| `magistral` | `minibatch_normalized` | `group_tokens` | yes | no |
| `grpo` | `group_normalized` | `sequence_tokens` | no | yes |
| `dapo` | `group_normalized` | `group_tokens` | yes | no |
| `dr_grpo` | `group_centered` | `budget` | no | no |

Advantages: `minibatch_normalized` r - mean_g, then standardised over the minibatch;
`group_normalized` (r - mean_g) / std_g; `group_centered` r - mean_g. Aggregations (the weight of
each token of sequence i in group g): `group_tokens` 1 / sum_{j in g} len_j; `sequence_tokens`
1 / (G_g * len_i); `budget` 1 / (G_g * budget).

A new combination needs no code: `grpo: {loss: dapo, aggregation: budget}` changes one part of a
named variant, and a new estimator is one registered function. Standard deviations are population
ones (ddof 0); every division by a standard deviation adds `EPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

EPS = 1e-8

# (rewards [S], group ids [S]) -> advantages [S]
AdvantageFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (group ids [S], lengths [S], budget) -> token weights [S], before the mean over groups
AggregationFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

ADVANTAGES: dict[str, AdvantageFn] = {}
AGGREGATIONS: dict[str, AggregationFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Registers `fn(rewards, groups) -> advantages` as advantage estimator `name`."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def register_aggregation(name: str) -> Callable[[AggregationFn], AggregationFn]:
    """Registers `fn(groups, lengths, budget) -> weights` as loss aggregation `name`."""

    def wrap(fn: AggregationFn) -> AggregationFn:
        AGGREGATIONS[name] = fn
        return fn

    return wrap


@dataclass(frozen=True)
class Variant:
    """An objective: its advantage estimator and loss aggregation (registry keys), whether groups
    without signal are dropped, and whether a KL term to a reference policy is added."""

    name: str
    advantage: str
    aggregation: str
    filter_groups: bool
    kl: bool

    def __post_init__(self) -> None:
        for part, registry in (("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS)):
            if getattr(self, part) not in registry:
                raise ValueError(f"{part}: unknown {getattr(self, part)!r}; registered: {', '.join(sorted(registry))}")

    def fn(
        self, rewards: np.ndarray, groups: np.ndarray, lengths: np.ndarray, budget: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(advantages [S], weights [S]) of a minibatch of whole groups."""
        rewards = np.asarray(rewards, np.float64)
        advantages = ADVANTAGES[self.advantage](rewards, groups)
        weights = AGGREGATIONS[self.aggregation](groups, np.asarray(lengths), budget)
        return advantages, weights / n_groups(groups)


def _group_stats(rewards: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence: its group's mean reward, reward std and size.

    A group whose rewards are all equal gets exactly that reward as its mean and exactly 0 as its
    std: the float sum of G copies of 0.1 divided by G is not always 0.1 again, and a std of 1e-17
    would keep a group without signal alive and scale its advantages by 1e9 / EPS.
    """
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    lows, highs = _extremes(rewards, inverse, len(counts))
    constant = lows == highs
    means = np.where(constant, lows, np.bincount(inverse, rewards) / counts)
    var = np.where(constant, 0.0, np.bincount(inverse, (rewards - means[inverse]) ** 2) / counts)
    return means[inverse], np.sqrt(var)[inverse], counts[inverse].astype(np.float64)


def _extremes(rewards: np.ndarray, inverse: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] lowest and highest reward of each group."""
    lows, highs = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(lows, inverse, rewards)
    np.maximum.at(highs, inverse, rewards)
    return lows, highs


def _group_sizes(groups: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.float64)


def _group_lengths(lengths: np.ndarray, groups: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, lengths.astype(np.float64))[inverse]


def n_groups(groups: np.ndarray) -> int:
    return len(np.unique(groups))


@register_advantage("minibatch_normalized")
def minibatch_normalized(rewards, groups):
    mean, _, _ = _group_stats(rewards, groups)
    adv = rewards - mean
    return (adv - adv.mean()) / (adv.std() + EPS)


@register_advantage("group_normalized")
def group_normalized(rewards, groups):
    mean, std, _ = _group_stats(rewards, groups)
    return (rewards - mean) / (std + EPS)


@register_advantage("group_centered")
def group_centered(rewards, groups):
    mean, _, _ = _group_stats(rewards, groups)
    return rewards - mean


@register_aggregation("group_tokens")
def group_tokens(groups, lengths, budget):
    return 1.0 / _group_lengths(lengths, groups)


@register_aggregation("sequence_tokens")
def sequence_tokens(groups, lengths, budget):
    return 1.0 / (_group_sizes(groups) * lengths)


@register_aggregation("budget")
def budget_tokens(groups, lengths, budget):
    return 1.0 / (_group_sizes(groups) * budget)


VARIANTS: dict[str, Variant] = {
    "magistral": Variant("magistral", "minibatch_normalized", "group_tokens", filter_groups=True, kl=False),
    "grpo": Variant("grpo", "group_normalized", "sequence_tokens", filter_groups=False, kl=True),
    "dapo": Variant("dapo", "group_normalized", "group_tokens", filter_groups=True, kl=False),
    "dr_grpo": Variant("dr_grpo", "group_centered", "budget", filter_groups=False, kl=False),
}


def get_variant(
    name: str,
    *,
    advantage: str | None = None,
    aggregation: str | None = None,
    filter_groups: bool | None = None,
    kl: bool | None = None,
) -> Variant:
    """Variant `name`, with any of its parts replaced (None keeps the named variant's)."""
    try:
        variant = VARIANTS[name]
    except KeyError:
        raise ValueError(f"loss: unknown variant {name!r}; registered: {', '.join(VARIANTS)}") from None
    parts = {"advantage": advantage, "aggregation": aggregation, "filter_groups": filter_groups, "kl": kl}
    changes = {k: v for k, v in parts.items() if v is not None}
    return replace(variant, **changes) if changes else variant


def constant_groups(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """True for sequences whose group's rewards are all equal (max == min: zero advantage, no signal)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    lows, highs = _extremes(np.asarray(rewards, np.float64), inverse, len(counts))
    return (lows == highs)[inverse]


def token_losses(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """Per-token clipped objective (negated, to minimise) and which tokens were clipped.

    Args:
      logp, old_logp: [..., T] log-probabilities under the current and the sampling policy.
      advantages: broadcastable to logp (one per sequence).
    Returns:
      (loss [..., T], clipped_low [..., T] bool, clipped_high [..., T] bool).
    """
    import jax.numpy as jnp

    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    return loss, (ratio < 1.0 - eps_low) & (advantages < 0), (ratio > 1.0 + eps_high) & (advantages > 0)


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    import jax.numpy as jnp

    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0
