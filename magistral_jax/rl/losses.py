"""Policy-gradient objectives of the GRPO family, as a registry of variants.

A variant turns the rewards of a minibatch of complete groups into per-sequence advantages and
per-sequence token weights (the loss normaliser), on the host, before the minibatch is cut into
microbatches. The loss of the minibatch is then a plain weighted sum over tokens,

    loss = sum_{i, t} w_i * l_{i,t},   l_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
           (+ beta * w_i * KL_{i,t} for variants with a KL term)

so it, and its gradient, are the same however the minibatch is split into microbatches.
Weights include the mean over the minibatch's groups (the expectation over prompts).

Registered variants (`reference/magistral-rl-recipe.md`, sections 1 and 6):

| variant | advantage | weight w_i of sequence i in group g | constant groups |
|---|---|---|---|
| `magistral` | r - mean_g, then standardised over the minibatch | 1 / sum_{j in g} len_j | dropped |
| `grpo` | (r - mean_g) / std_g | 1 / (G_g * len_i) | kept; k3 KL to a reference |
| `dapo` | (r - mean_g) / std_g | 1 / sum_{j in g} len_j | dropped |
| `dr_grpo` | r - mean_g | 1 / (G_g * budget) | kept |

Standard deviations are population ones (ddof 0); every division by a standard deviation adds
`EPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-8

# (rewards [S], group ids [S], lengths [S], budget) -> (advantages [S], weights [S])
VariantFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Variant:
    """A registered objective: its advantage/weight function and how groups are handled."""

    name: str
    fn: VariantFn
    filter_constant_groups: bool
    kl: bool


VARIANTS: dict[str, Variant] = {}


def register(name: str, *, filter_constant_groups: bool, kl: bool = False) -> Callable[[VariantFn], VariantFn]:
    """Registers `fn(rewards, groups, lengths, budget) -> (advantages, weights)` under `name`."""

    def wrap(fn: VariantFn) -> VariantFn:
        VARIANTS[name] = Variant(name, fn, filter_constant_groups, kl)
        return fn

    return wrap


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"loss: unknown variant {name!r}; registered: {', '.join(VARIANTS)}") from None


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


def _group_lengths(lengths: np.ndarray, groups: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, lengths.astype(np.float64))[inverse]


def n_groups(groups: np.ndarray) -> int:
    return len(np.unique(groups))


@register("magistral", filter_constant_groups=True)
def magistral(rewards, groups, lengths, budget):
    mean, _, _ = _group_stats(rewards, groups)
    adv = rewards - mean
    adv = (adv - adv.mean()) / (adv.std() + EPS)
    return adv, 1.0 / (_group_lengths(lengths, groups) * n_groups(groups))


@register("grpo", filter_constant_groups=False, kl=True)
def grpo(rewards, groups, lengths, budget):
    mean, std, size = _group_stats(rewards, groups)
    return (rewards - mean) / (std + EPS), 1.0 / (size * lengths * n_groups(groups))


@register("dapo", filter_constant_groups=True)
def dapo(rewards, groups, lengths, budget):
    mean, std, _ = _group_stats(rewards, groups)
    return (rewards - mean) / (std + EPS), 1.0 / (_group_lengths(lengths, groups) * n_groups(groups))


@register("dr_grpo", filter_constant_groups=False)
def dr_grpo(rewards, groups, lengths, budget):
    mean, _, size = _group_stats(rewards, groups)
    return rewards - mean, 1.0 / (size * budget * n_groups(groups))


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
