"""Sampling strategies: how one token is drawn from a row of logits.

Dimension letters: R rows (sequences), V vocabulary.

`SamplingParams` is frozen and hashable, so each combination compiles its own (cheapest) code:
greedy needs no random numbers and no sort, plain temperature sampling no sort. Filters apply in
the order transformers applies them: temperature, top-k, top-p, min-p, each on what the previous
one kept (renormalised).

Every drawn token comes with two log-probabilities: under the sampling temperature over the whole
vocabulary (`logprobs`, what the trainer's importance ratio uses; the top-k / top-p / min-p
truncation is not part of it) and raw (temperature 1, `raw_logprobs`). Greedy reports the raw one
for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclass(frozen=True)
class SamplingParams:
    """How to draw tokens.

    Attributes:
      temperature: divides the logits; 0 means greedy (argmax).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
      top_k: keep the k most likely tokens (0 = off).
      min_p: keep tokens at least min_p times as likely as the most likely one (0 = off).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature: a number >= 0 is expected, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: a number in (0, 1] is expected, got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: an integer >= 0 is expected, got {self.top_k!r}")
        if not (isinstance(self.min_p, int | float) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p: a number in [0, 1) is expected, got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)
# The Magistral model cards' sampling settings.
MAGISTRAL = SamplingParams(temperature=0.7, top_p=0.95)
PRESETS: dict[str, SamplingParams] = {"greedy": GREEDY, "magistral": MAGISTRAL, "pure": SamplingParams()}


def _keep_top_k(scores: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores >= kth, scores, -jnp.inf)


def _keep_top_p(scores: jax.Array, p: float) -> jax.Array:
    order = jnp.sort(scores, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(order, axis=-1)
    # A token is kept if the mass of the more likely tokens is still below p (so the token that
    # crosses p is kept too); the most likely token is always kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(order, n_keep - 1, axis=-1)
    return jnp.where(scores >= threshold, scores, -jnp.inf)


def _keep_min_p(scores: jax.Array, min_p: float) -> jax.Array:
    logp = jax.nn.log_softmax(scores, axis=-1)
    floor = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logp >= floor, scores, -jnp.inf)


def choose(
    logits: Float[Array, "R V"], keys: jax.Array, params: SamplingParams
) -> tuple[Int[Array, " R"], Float[Array, " R"], Float[Array, " R"]]:
    """Draws one token per row; returns (tokens, logprobs under the temperature, raw logprobs)."""
    logits = logits.astype(jnp.float32)
    raw = jax.nn.log_softmax(logits, axis=-1)
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        picked = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
        return tokens, picked, picked
    scores = logits / params.temperature
    tempered = jax.nn.log_softmax(scores, axis=-1)
    if params.top_k:
        scores = _keep_top_k(scores, min(params.top_k, scores.shape[-1]))
    if params.top_p < 1:
        scores = _keep_top_p(scores, params.top_p)
    if params.min_p > 0:
        scores = _keep_min_p(scores, params.min_p)
    tokens = jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]  # noqa: E731
    return tokens, take(tempered), take(raw)
