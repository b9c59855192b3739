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

The cache is contiguous (each slot reserves the longest prompt plus the largest budget; `insert`)
or paged (`model.decoder.PagedKVCache`, its pages handed out by `sampling.pages.PagePool`): the
requests of one `insert` with the same prompt are prefilled once (`prefill_pages`) and share its
full pages, each starting on its own copy of the partly filled last one (`start_paged_rows`); a
row takes pages chunk by chunk, and the youngest request is preempted and queued again when the
pool runs dry. `PagedSampler` is the `Sampler` interface over a paged batcher.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder
from magistral_jax.sampling.pages import PagePool, pages_for
from magistral_jax.sampling.sampler import (
    BUCKET,
    Chunk,
    DecodeState,
    SampleOutput,
    Sampler,
    cache_shape,
    decode,
    empty_outputs,
    prefill_rows,
)
from magistral_jax.sampling.strategies import MAGISTRAL, SamplingParams
from magistral_jax.sharding import to_host

CACHES = ("contiguous", "paged")


@dataclass(frozen=True)
class Request:
    """A prompt to complete: its budget of new tokens, the seed of its draws (0 to 2**32 - 1), and
    a caller's tag. With a `stream` index the draws come from `fold_in(key(seed), stream)`, the
    key of row `stream` of a `Sampler` run with that seed."""

    prompt: list[int]
    max_new_tokens: int
    seed: int
    tag: Any = None
    stream: int = -1


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


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "cache_len", "max_new", "paged"))
def empty_state(
    *, cfg: ModelConfig, slots: int, cache_len: int, max_new: int, paged: tuple[int, int, int] | None = None
) -> DecodeState:
    """A `DecodeState` of `slots` idle rows (done, no budget) over an empty cache: contiguous, of
    `cache_len` slots per row, or `paged` = (pages, page size, table width)."""
    cache = (
        decoder.KVCache.init(cfg, slots, cache_len)
        if paged is None
        else decoder.PagedKVCache.init(cfg, paged[0], paged[1], slots, paged[2])
    )
    return DecodeState(
        cache=cache,
        logits=jnp.zeros((slots, cfg.text.vocab_size), jnp.float32),
        logits_version=jnp.zeros((slots,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        **empty_outputs(slots, max_new),
        done=jnp.ones((slots,), bool),
        lengths=jnp.zeros((slots,), jnp.int32),
        limits=jnp.zeros((slots,), jnp.int32),
        keys=jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.int32)),
    )


def _row_key(seed, stream):
    """The key of a row: `key(seed)`, or with `stream` > 0 `fold_in(key(seed), stream - 1)`."""
    base = jax.random.key(seed)
    return jax.lax.cond(stream == 0, lambda: base, lambda: jax.random.fold_in(base, stream - 1))


def _start_rows(state: DecodeState, cache, slots, last, limits, seeds, version) -> DecodeState:
    """`state` with rows `slots` starting afresh: their cache, next-token logits `last`, budgets,
    seeds ([R, 2] uint32: seed and stream + 1, see `Request`) and policy version; out-of-range
    slots are dropped."""
    put = lambda buf, x: buf.at[slots].set(x, mode="drop")  # noqa: E731
    zeros = {name: put(getattr(state, name), 0) for name in ("tokens", "logprobs", "raw_logprobs", "versions")}
    return dataclasses.replace(
        state,
        cache=cache,
        logits=put(state.logits, last),
        logits_version=put(state.logits_version, version),
        **zeros,
        done=put(state.done, False),
        lengths=put(state.lengths, 0),
        limits=put(state.limits, limits),
        keys=put(state.keys, jax.vmap(_row_key)(seeds[:, 0], seeds[:, 1])),
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
    cache = decoder.KVCache(
        k=write(state.cache.k, cache.k),
        v=write(state.cache.v, cache.v),
        positions=put(state.cache.positions, jnp.pad(cache.positions, ((0, 0), (0, empty)), constant_values=-1)),
        lengths=put(state.cache.lengths, cache.lengths),
    )
    return _start_rows(state, cache, slots, last, limits, seeds, version)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=1)
def prefill_pages(params, cache: decoder.PagedKVCache, prompts, lengths, pages, *, cfg):
    """The paged cache's prefill program: prefills each distinct prompt of `prompts` [U, P]
    (right-padded to `lengths`) once and writes page j of prompt u into pool page `pages[u, j]`
    [U, P / S] (an out-of-range page drops it); returns the cache (donated) and the logits after
    each prompt's last token. The rows that share a prompt are started by `start_paged_rows`."""
    size = cache.page_size
    filled, last = prefill_rows(params, prompts, lengths, cfg, prompts.shape[1])

    def write(pool, x):  # x [U, L, G, P, K] as pages [U * P / S, L, G, S, K]
        u, n_layers, g, p, d = x.shape
        x = x.reshape(u, n_layers, g, p // size, size, d).transpose(0, 3, 1, 2, 4, 5)
        return pool.at[pages.reshape(-1)].set(x.reshape(-1, n_layers, g, size, d).astype(pool.dtype), mode="drop")

    return dataclasses.replace(cache, k=write(cache.k, filled.k), v=write(cache.v, filled.v)), last


@functools.partial(jax.jit, donate_argnums=0)
def start_paged_rows(state: DecodeState, slots, source, lengths, last, copy_from, copy_to, limits, seeds, version):
    """The paged cache's row start program: rows `slots` [R] start on prompts of `lengths` [R]
    whose next-token logits are `last[source]` (`last` [U, V] from `prefill_pages`); each first
    copies its prompt's partly filled last page from page `copy_from` [R] to its own page
    `copy_to` (an out-of-range page: no copy), where it writes its own tokens on."""
    cache = state.cache
    copy = lambda pool: pool.at[copy_to].set(pool[jnp.minimum(copy_from, pool.shape[0] - 1)], mode="drop")  # noqa: E731
    cache = dataclasses.replace(
        cache, k=copy(cache.k), v=copy(cache.v), lengths=cache.lengths.at[slots].set(lengths, mode="drop")
    )
    return _start_rows(state, cache, slots, last[source], limits, seeds, version)


@functools.partial(jax.jit, donate_argnums=0)
def retire(state: DecodeState, rows) -> DecodeState:
    """`state` with rows `rows` [R] (out of range: ignored) stopped: done, no budget."""
    return dataclasses.replace(
        state, done=state.done.at[rows].set(True, mode="drop"), limits=state.limits.at[rows].set(0, mode="drop")
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
        a contiguous cache's size, and a paged row's table).
      chunk: decode steps per `step`.
      sampling: the sampling parameters; stop_ids: tokens that end a completion.
      cache: `contiguous` (each row reserves the longest prompt plus the largest budget) or
        `paged` (a pool of `page_size`-token pages: a row holds the pages its tokens need, and the
        requests of one `insert` with the same prompt share its full pages and its prefill).
      pool_tokens: paged: the pool's size in tokens (default: what the contiguous cache holds,
        `slots` rows of prompt plus budget).
      reserve_tokens: paged: a request is admitted only if the pool has pages for its prompt plus
        this many tokens, beyond what the running requests' next chunk and the requests admitted
        with it take (default: one chunk).

    Paged admission and preemption: before each chunk every running row gets the pages its next
    `chunk` tokens need. When the pool cannot provide them, the youngest running request is
    preempted: its pages are released, its tokens dropped, and it goes back to the head of the
    queue, to be prefilled again by the next `insert` (its draws depend only on its seed and token
    index, so under the same weights it decodes the same tokens again). Nothing is lost; the
    tokens decoded again are counted in `recomputed`.
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
        cache: str = "contiguous",
        page_size: int = 64,
        pool_tokens: int | None = None,
        reserve_tokens: int | None = None,
    ):
        if slots < 1 or chunk < 1 or max_new_tokens < 1 or max_prompt_len < 1:
            raise ValueError("slots, chunk, max_prompt_len and max_new_tokens must be positive")
        if cache not in CACHES:
            raise ValueError(f"cache: {cache!r}; expected one of {CACHES}")
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
        self.waiting: collections.deque[Request] = collections.deque()  # preempted, inserted first
        self.generated = 0  # tokens decoded so far and kept (a preempted request's are taken back)
        self.recomputed = 0  # tokens decoded by requests preempted since, to be decoded again
        self.preemptions = 0
        self._lengths = np.zeros(slots, np.int64)
        self._prompt = np.zeros(slots, np.int64)
        self._admitted = np.zeros(slots, np.int64)  # admission order, to preempt the youngest
        self._admissions = 0
        self.pool: PagePool | None = None
        paged = None
        if cache == "paged":
            if page_size < 1 or BUCKET % page_size:
                raise ValueError(f"page_size: a divisor of {BUCKET} is expected, got {page_size}")
            width = decoder.PagedKVCache.table_width(self.cache_len, page_size)
            pool_tokens = slots * self.cache_len if pool_tokens is None else pool_tokens
            self.reserve = pages_for(chunk if reserve_tokens is None else reserve_tokens, page_size)
            largest = max(
                pages_for(self.width + max_new_tokens, page_size), pages_for(self.width, page_size) + self.reserve
            )
            if pages_for(pool_tokens, page_size) < largest:
                raise ValueError(
                    f"pool_tokens: {pool_tokens} tokens cannot hold one request of a {self.width}-token prompt "
                    f"and {max_new_tokens} new tokens (or its prompt and reserve): {largest * page_size} needed"
                )
            pages = 1 + pages_for(pool_tokens, page_size)
            self.pool = PagePool(pages, page_size, slots, width)
            paged = (pages, page_size, width)
        with model.mesh_context():
            self.state = empty_state(
                cfg=model.cfg, slots=slots, cache_len=self.cache_len, max_new=max_new_tokens, paged=paged
            )

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.occupant) if r is None]

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.occupant)

    def set_params(self, params, version: int) -> None:
        """Decodes the next chunks with `params` (on the batcher's mesh), recorded as `version`."""
        self.model.params, self.version = params, version

    def _check(self, req: Request) -> None:
        n = len(req.prompt)
        if not 1 <= n <= self.width or not 1 <= req.max_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"request {req.tag!r}: a prompt of 1 to {self.width} tokens and a budget of 1 to "
                f"{self.max_new_tokens} expected, got {n} and {req.max_new_tokens}"
            )
        if min(req.prompt) < 0 or max(req.prompt) >= self.model.cfg.text.vocab_size:
            raise ValueError(f"request {req.tag!r}: token ids must lie in [0, {self.model.cfg.text.vocab_size})")

    def insert(self, requests: Sequence[Request]) -> list[Request]:
        """Prefills requests into free slots, first those preempted earlier (`waiting`), then
        `requests` in order, as long as slots (and, paged, pages) allow; returns the requests of
        `requests` not admitted, in order (the caller offers them again later)."""
        for req in requests:
            self._check(req)
        queue = [*self.waiting, *requests]
        self.waiting.clear()
        admitted = self._admit(queue)
        rest = queue[len(admitted) :]
        preempted = len(rest) - min(len(rest), len(requests))
        self.waiting.extend(rest[:preempted])
        if admitted:
            slots = self.free_slots[: len(admitted)]
            for req, slot in zip(admitted, slots, strict=True):
                self.occupant[slot] = req
                self._lengths[slot] = 0
                self._prompt[slot] = len(req.prompt)
                self._admissions += 1
                self._admitted[slot] = self._admissions
            (self._insert_contiguous if self.pool is None else self._insert_paged)(admitted, slots)
        return list(rest[preempted:])

    def _admit(self, queue: list[Request]) -> list[Request]:
        """The longest head of `queue` that free slots, and a paged cache's free pages less each
        request's reserve, can take."""
        n = min(len(queue), len(self.free_slots))
        if self.pool is None:
            return queue[:n]
        # What the running rows' next chunk takes is not available to newcomers (admitting a
        # request only to preempt it at the next chunk would waste its prefill).
        free = self.pool.available - sum(self._missing(i) for i in self._running())
        size, shared = self.pool.page_size, set()
        for i, req in enumerate(queue[:n]):
            prompt = tuple(req.prompt)
            # Its own last page, its reserve, and for a group's first request its prompt's pages.
            need = (len(prompt) % size > 0) + self.reserve + (0 if prompt in shared else pages_for(len(prompt), size))
            if need > free:
                return queue[:i]
            free -= need
            shared.add(prompt)
        return queue[:n]

    def _insert_contiguous(self, requests: list[Request], slots: list[int]) -> None:
        rows = insert_rows(len(requests), len(self.occupant))
        lengths, limits, seeds, rows_slots = self._rows(requests, slots, rows)
        prompts = np.zeros((rows, self.width), np.int32)
        for i, req in enumerate(requests):
            prompts[i, : len(req.prompt)] = req.prompt
        with self.model.mesh_context():
            self.state = insert(
                self.model.params,
                self.state,
                jnp.asarray(rows_slots),
                jnp.asarray(prompts),
                jnp.asarray(lengths),
                jnp.asarray(limits),
                jnp.asarray(seeds),
                jnp.int32(self.version),
                cfg=self.model.cfg,
            )

    def _rows(self, requests: list[Request], slots: list[int], rows: int):
        """The per-row inputs of the insert programs, `rows` long: prompt lengths, budgets, seeds
        (and streams) and slots (out of range past the requests: dropped)."""
        lengths = np.ones(rows, np.int32)
        limits = np.zeros(rows, np.int32)
        seeds = np.zeros((rows, 2), np.uint32)
        rows_slots = np.full(rows, len(self.occupant), np.int32)  # out of range: dropped
        for i, (req, slot) in enumerate(zip(requests, slots, strict=True)):
            lengths[i], limits[i], rows_slots[i] = len(req.prompt), req.max_new_tokens, slot
            seeds[i] = req.seed, req.stream + 1
        return lengths, limits, seeds, rows_slots

    def _insert_paged(self, requests: list[Request], slots: list[int]) -> None:
        pool = self.pool
        assert pool is not None
        size, n_pages = pool.page_size, pool.holders.shape[0]
        # Each distinct prompt is prefilled once into pages: its full pages, which its rows share,
        # and its partly filled last page, which each row copies into a page of its own (the
        # prompt's copy is given back once the rows have theirs).
        distinct: dict[tuple[int, ...], int] = {}
        prompt_pages: list[list[int]] = []
        for req in requests:
            prompt = tuple(req.prompt)
            if prompt not in distinct:
                distinct[prompt] = len(distinct)
                prompt_pages.append(pool.take(pages_for(len(prompt), size)))
        rows = insert_rows(len(requests), len(self.occupant))
        copy_from = np.full(rows, n_pages, np.int32)
        copy_to = np.full(rows, n_pages, np.int32)
        source = np.zeros(rows, np.int32)
        for i, (req, slot) in enumerate(zip(requests, slots, strict=True)):
            u = source[i] = distinct[tuple(req.prompt)]
            full = len(req.prompt) // size
            pool.hold(slot, prompt_pages[u][:full], shared=True)
            if len(req.prompt) % size:
                (copy_to[i],) = own = pool.take(1)
                copy_from[i] = prompt_pages[u][full]
                pool.hold(slot, own)
        lengths, limits, seeds, rows_slots = self._rows(requests, slots, rows)
        # Distinct prompts padded as the rows are (a power of two, at least 8: few programs).
        prompts = np.zeros((insert_rows(len(distinct), len(self.occupant)), self.width), np.int32)
        prompt_lengths = np.ones(len(prompts), np.int32)
        pages = np.full((len(prompts), self.width // size), n_pages, np.int32)
        for prompt, u in distinct.items():
            prompts[u, : len(prompt)], prompt_lengths[u] = prompt, len(prompt)
            pages[u, : len(prompt_pages[u])] = prompt_pages[u]
        with self.model.mesh_context():
            cache, last = prefill_pages(
                self.model.params,
                self.state.cache,
                jnp.asarray(prompts),
                jnp.asarray(prompt_lengths),
                jnp.asarray(pages),
                cfg=self.model.cfg,
            )
            self.state = start_paged_rows(
                dataclasses.replace(self.state, cache=cache),
                jnp.asarray(rows_slots),
                jnp.asarray(source),
                jnp.asarray(lengths),
                last,
                jnp.asarray(copy_from),
                jnp.asarray(copy_to),
                jnp.asarray(limits),
                jnp.asarray(seeds),
                jnp.int32(self.version),
            )
        # The prompts' pages are held by their rows alone from here (a partial page by none).
        for taken in prompt_pages:
            pool.give_back(taken)

    def _grow(self) -> None:
        """Gives every running row the pages of its next chunk, preempting the youngest requests
        while the pool is short; then sends the tables to the device."""
        pool = self.pool
        assert pool is not None
        running = self._running()
        while sum(self._missing(i) for i in running) > pool.available:
            youngest = max(running, key=lambda i: self._admitted[i])
            running.remove(youngest)
            self._preempt(youngest)
        for row in running:
            pool.grow(row, self._next_chunk_tokens(row))
        cache = self.state.cache
        table = jax.device_put(pool.table, cache.page_table.sharding)
        block = decoder.paged_block(max((self._next_chunk_tokens(r) for r in running), default=1), pool.page_size)
        self.state = dataclasses.replace(self.state, cache=dataclasses.replace(cache, page_table=table, block=block))

    def _running(self) -> list[int]:
        return [i for i, r in enumerate(self.occupant) if r is not None]

    def _next_chunk_tokens(self, row: int) -> int:
        """The tokens row `row` holds after the next chunk (at most its budget)."""
        request = self.occupant[row]
        assert request is not None
        return int(self._prompt[row] + min(self._lengths[row] + self.chunk, request.max_new_tokens))

    def _missing(self, row: int) -> int:
        """Pages row `row` lacks for its next chunk."""
        assert self.pool is not None
        return max(0, pages_for(self._next_chunk_tokens(row), self.pool.page_size) - int(self.pool.held[row]))

    def _preempt(self, row: int) -> None:
        request = self.occupant[row]
        assert request is not None and self.pool is not None
        self.pool.release(row)
        self.occupant[row] = None
        self.waiting.appendleft(request)
        self.generated -= int(self._lengths[row])
        self.recomputed += int(self._lengths[row])
        self.preemptions += 1
        rows = np.full(len(self.occupant), len(self.occupant), np.int32)
        rows[0] = row
        with self.model.mesh_context():
            self.state = retire(self.state, jnp.asarray(rows))

    def step(self) -> list[Finished]:
        """One chunk of decode steps; returns the requests that finished (their slots are free)."""
        if not self.busy:
            return []
        if self.pool is not None:
            self._grow()
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
        # The ended rows' buffers, gathered on the device; their count padded to a power of two
        # (repeating a row) so that the gathers compile for a few shapes only.
        index = jnp.asarray(np.pad(ended, (0, (1 << (len(ended) - 1).bit_length()) - len(ended)), mode="edge"))
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
            if self.pool is not None:
                self.pool.release(slot)
        return out


class PagedSampler(Sampler):
    """A `Sampler` over a paged KV cache: the same tokens and log-probabilities as `Sampler` with
    the same seed (row r's draws come from `fold_in(key(seed), r)` in both), with memory that
    follows the tokens held. Runs a `ContinuousBatcher` of one row per sample; the `n` samples of
    a prompt share its prefill and its full pages. Text only, one process.

    Args:
      model, stop_ids: as `Sampler`.
      page_size / pool_tokens: the pages, and the pool's size in tokens (default: what the
        contiguous cache would hold).
      chunk: decode steps between two page allocations in `sample` (`stream` takes its own).
    """

    def __init__(
        self,
        model,
        stop_ids: Sequence[int] = (2,),
        *,
        page_size: int = 64,
        pool_tokens: int | None = None,
        chunk: int = 32,
    ):
        super().__init__(model, stop_ids)
        self.page_size, self.pool_tokens, self.chunk = page_size, pool_tokens, chunk
        self.preemptions = 0  # rows preempted (and decoded again) for want of pages, over all calls

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        n: int = 1,
        sampling: SamplingParams = MAGISTRAL,
        seed: int = 0,
        chunk: int = 16,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> Iterator[Chunk]:
        if images is not None:
            raise ValueError("images: the paged cache samples text only; use the contiguous cache")
        if jax.process_count() > 1:
            raise ValueError("the paged cache samples in one process; use the contiguous cache on a multi-host mesh")
        if chunk < 1:
            raise ValueError(f"chunk: a positive number of tokens is expected, got {chunk}")
        _, lengths, budgets = self._batch(prompts, n, max_new_tokens)
        rows = len(prompts) * n
        batcher = ContinuousBatcher(
            self.model,
            slots=rows,
            max_prompt_len=int(lengths.max()),
            max_new_tokens=int(budgets.max()),
            chunk=chunk,
            sampling=sampling,
            stop_ids=self.stop_ids,
            cache="paged",
            page_size=self.page_size,
            pool_tokens=self.pool_tokens,
        )
        pending = [
            Request(list(prompts[r // n]), int(budgets[r // n]), seed=seed, tag=r, stream=r) for r in range(rows)
        ]
        finished: dict[int, Finished] = {}
        seen = np.zeros(rows, np.int64)  # tokens of each row yielded so far
        while len(finished) < rows:
            pending = batcher.insert(pending)
            preempted = batcher.preemptions
            for f in batcher.step():
                finished[f.request.tag] = f
            self.preemptions += batcher.preemptions - preempted
            tokens, lengths_now = to_host(batcher.state.tokens), to_host(batcher.state.lengths)
            slot_of = {q.tag: i for i, q in enumerate(batcher.occupant) if q is not None}
            new = []
            for r in range(rows):
                if r in finished:
                    have = finished[r].tokens
                else:
                    slot = slot_of.get(r)
                    have = [] if slot is None else tokens[slot, : lengths_now[slot]].tolist()
                # A preempted row decodes its tokens again (the same ones): only what is beyond
                # what was yielded is new.
                new.append(have[seen[r] :])
                seen[r] = max(seen[r], len(have))
            done = np.array([r in finished for r in range(rows)])
            yield Chunk(new, done, _sample_output(finished, rows) if done.all() else None)

    def _sample_chunk(self, max_new_tokens: int | Sequence[int]) -> int:
        return self.chunk


def make_sampler(
    model, stop_ids: Sequence[int], cache: str = "contiguous", page_size: int = 64, pool_tokens: int | None = None
) -> Sampler:
    """A `Sampler` over the `cache` named (`contiguous` or `paged`, with its pages and pool)."""
    if cache not in CACHES:
        raise ValueError(f"cache: {cache!r}; expected one of {CACHES}")
    if cache == "paged":
        return PagedSampler(model, stop_ids, page_size=page_size, pool_tokens=pool_tokens)
    return Sampler(model, stop_ids)


def _sample_output(finished: dict[int, Finished], rows: int) -> SampleOutput:
    width = max(len(f.tokens) for f in finished.values())
    out = SampleOutput(
        tokens=np.zeros((rows, width), np.int32),
        logprobs=np.zeros((rows, width), np.float32),
        raw_logprobs=np.zeros((rows, width), np.float32),
        lengths=np.array([len(finished[r].tokens) for r in range(rows)], np.int32),
        finish_reasons=[finished[r].finish_reason for r in range(rows)],
    )
    for r in range(rows):
        f, m = finished[r], len(finished[r].tokens)
        out.tokens[r, :m], out.logprobs[r, :m], out.raw_logprobs[r, :m] = f.tokens, f.logprobs, f.raw_logprobs
    return out
