"""Continuous batching: a fixed number of decode slots, refilled between chunks, weights swapped in flight.

The batcher keeps one `DecodeState` of `slots` rows. `insert` prefills new requests into free
slots (their own key, budget and cache row); `step` runs one jitted chunk of decode steps and
returns the requests that finished, so a finished slot is refilled at the next chunk boundary
and a long completion never holds the others hostage. `set_params` swaps the weights between two
chunks without touching the cache: in-flight rows continue with their slightly stale KV cache
(as Magistral's generators do), and every token records the policy version it was drawn from
(`versions`: the version whose forward computed the logits of that token).

A request's draws depend only on its seed and its own token index, never on the slot it lands in
or on the other rows, so a request decodes the same tokens in any batch under the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder
from magistral_jax.sampling.sampler import DecodeState, cache_shape, decode, empty_outputs, prefill_rows
from magistral_jax.sampling.strategies import SamplingParams
from magistral_jax.sharding import to_host


@dataclass(frozen=True)
class Request:
    """A prompt to complete: its budget of new tokens, the seed of its draws, and a caller's tag."""

    prompt: list[int]
    max_new_tokens: int
    seed: int
    tag: Any = None


@dataclass
class Finished:
    """A completed request: tokens (the stop token included), their log-probabilities under the
    sampling temperature and at temperature 1, and the policy version of each token."""

    request: Request
    tokens: list[int]
    logprobs: np.ndarray
    raw_logprobs: np.ndarray
    versions: np.ndarray
    finish_reason: str  # `stop` or `length`


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "cache_len", "max_new"))
def empty_state(*, cfg: ModelConfig, slots: int, cache_len: int, max_new: int) -> DecodeState:
    """A `DecodeState` of `slots` idle rows (done, no budget) over an empty cache."""
    return DecodeState(
        cache=decoder.KVCache.init(cfg, slots, cache_len),
        logits=jnp.zeros((slots, cfg.text.vocab_size), jnp.float32),
        logits_version=jnp.zeros((slots,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        **empty_outputs(slots, max_new),
        done=jnp.ones((slots,), bool),
        lengths=jnp.zeros((slots,), jnp.int32),
        limits=jnp.zeros((slots,), jnp.int32),
        keys=jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.int32)),
    )


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=1)
def insert(params, state: DecodeState, slots, prompts, lengths, limits, seeds, version, *, cfg):
    """The insert program: prefills `prompts` [R, P] into rows `slots` [R] of `state` (donated; an
    out-of-range slot drops its row), with their budgets, seeds and the policy `version`.

    The prompts are prefilled into a cache of P slots only, written over the first P slots of
    their rows; the rest of each row is marked empty (position -1), so what an earlier occupant
    left there is never attended to, and inserting holds no second full-length cache (with 128
    slots of 41k tokens, that second cache alone would not fit a v5p chip)."""
    width = prompts.shape[1]
    cache, last = prefill_rows(params, prompts, lengths, cfg, width)
    put = lambda buf, x: buf.at[slots].set(x, mode="drop")  # noqa: E731
    write = lambda buf, x: buf.at[slots, :, :, :width].set(x, mode="drop")  # noqa: E731  [B, L, G, S, K]
    empty = state.cache.positions.shape[1] - width
    zeros = {name: put(getattr(state, name), 0) for name in ("tokens", "logprobs", "raw_logprobs", "versions")}
    return dataclasses.replace(
        state,
        cache=decoder.KVCache(
            k=write(state.cache.k, cache.k),
            v=write(state.cache.v, cache.v),
            positions=put(state.cache.positions, jnp.pad(cache.positions, ((0, 0), (0, empty)), constant_values=-1)),
            lengths=put(state.cache.lengths, cache.lengths),
        ),
        logits=put(state.logits, last),
        logits_version=put(state.logits_version, version),
        **zeros,
        done=put(state.done, False),
        lengths=put(state.lengths, 0),
        limits=put(state.limits, limits),
        keys=put(state.keys, jax.vmap(jax.random.key)(seeds)),
    )


def insert_rows(requests: int, slots: int) -> int:
    """Rows of the insert program for `requests` new requests into a batcher of `slots` slots:
    rounded up to a power of two, at least 8 (or the slots), so that few programs are compiled."""
    return max(1 << (requests - 1).bit_length(), min(8, 1 << (slots - 1).bit_length()))


class ContinuousBatcher:
    """Decodes requests in `slots` rows of one KV cache, refilling finished rows between chunks.

    Args:
      model: a `magistral_jax.Model` (its mesh is where the batcher's state lives).
      slots: rows decoded at once.
      max_prompt_len / max_new_tokens: the longest prompt and budget a request may have (they fix
        the cache's size).
      chunk: decode steps per `step`.
      sampling: the sampling parameters; stop_ids: tokens that end a completion.
    """

    def __init__(
        self,
        model,
        *,
        slots: int,
        max_prompt_len: int,
        max_new_tokens: int,
        chunk: int = 16,
        sampling: SamplingParams,
        stop_ids: Sequence[int] = (2,),
        version: int = 0,
    ):
        if slots < 1 or chunk < 1 or max_new_tokens < 1 or max_prompt_len < 1:
            raise ValueError("slots, chunk, max_prompt_len and max_new_tokens must be positive")
        self.model, self.chunk, self.sampling = model, chunk, sampling
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.version = version
        self.max_new_tokens = max_new_tokens
        self.width, self.cache_len = cache_shape(max_prompt_len, max_new_tokens)
        if self.width + max_new_tokens > model.cfg.text.max_position_embeddings:
            raise ValueError(
                f"prompts of {max_prompt_len} tokens plus {max_new_tokens} new tokens exceed the model's context "
                f"of {model.cfg.text.max_position_embeddings}"
            )
        self.occupant: list[Request | None] = [None] * slots
        self.generated = 0  # tokens decoded so far
        self._lengths = np.zeros(slots, np.int64)
        with model.mesh_context():
            self.state = empty_state(cfg=model.cfg, slots=slots, cache_len=self.cache_len, max_new=max_new_tokens)

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.occupant) if r is None]

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.occupant)

    def set_params(self, params, version: int) -> None:
        """Decodes the next chunks with `params` (on the batcher's mesh), recorded as `version`."""
        self.model.params, self.version = params, version

    def insert(self, requests: Sequence[Request]) -> None:
        """Prefills `requests` into free slots (at most as many as are free)."""
        if not requests:
            return
        free = self.free_slots
        if len(requests) > len(free):
            raise ValueError(f"insert: {len(requests)} requests for {len(free)} free slots")
        cfg = self.model.cfg
        rows = insert_rows(len(requests), len(self.occupant))
        prompts = np.zeros((rows, self.width), np.int32)
        lengths = np.ones(rows, np.int32)
        limits = np.zeros(rows, np.int32)
        seeds = np.zeros(rows, np.int32)
        slots = np.full(rows, len(self.occupant), np.int32)  # out of range: dropped
        for i, (req, slot) in enumerate(zip(requests, free, strict=False)):
            n = len(req.prompt)
            if not 1 <= n <= self.width or not 1 <= req.max_new_tokens <= self.max_new_tokens:
                raise ValueError(
                    f"request {req.tag!r}: a prompt of 1 to {self.width} tokens and a budget of 1 to "
                    f"{self.max_new_tokens} expected, got {n} and {req.max_new_tokens}"
                )
            if min(req.prompt) < 0 or max(req.prompt) >= cfg.text.vocab_size:
                raise ValueError(f"request {req.tag!r}: token ids must lie in [0, {cfg.text.vocab_size})")
            prompts[i, :n] = req.prompt
            lengths[i], limits[i], seeds[i], slots[i] = n, req.max_new_tokens, req.seed, slot
            self.occupant[slot] = req
            self._lengths[slot] = 0
        with self.model.mesh_context():
            self.state = insert(
                self.model.params,
                self.state,
                jnp.asarray(slots),
                jnp.asarray(prompts),
                jnp.asarray(lengths),
                jnp.asarray(limits),
                jnp.asarray(seeds),
                jnp.int32(self.version),
                cfg=cfg,
            )

    def step(self) -> list[Finished]:
        """One chunk of decode steps; returns the requests that finished (their slots are free)."""
        if not self.busy:
            return []
        with self.model.mesh_context():
            self.state = decode(
                self.model.params,
                self.state,
                self.state.step + self.chunk,
                jnp.int32(self.version),
                cfg=self.model.cfg,
                sampling=self.sampling,
                stop_ids=self.stop_ids,
            )
        lengths, live, done = to_host(self.state.lengths), to_host(self.state.live()), to_host(self.state.done)
        busy = np.array([r is not None for r in self.occupant])
        self.generated += int((lengths - self._lengths)[busy].sum())
        self._lengths = lengths.astype(np.int64)
        ended = np.flatnonzero(busy & ~live)
        if not len(ended):
            return []
        index = jnp.asarray(ended)
        tokens, logprobs, raw, versions = (
            to_host(getattr(self.state, name)[index]) for name in ("tokens", "logprobs", "raw_logprobs", "versions")
        )
        out = []
        for i, slot in enumerate(ended):
            n = int(lengths[slot])
            request = self.occupant[slot]
            assert request is not None
            out.append(
                Finished(
                    request,
                    tokens[i, :n].tolist(),
                    logprobs[i, :n],
                    raw[i, :n],
                    versions[i, :n],
                    "stop" if done[slot] else "length",
                )
            )
            self.occupant[slot] = None
        return out
