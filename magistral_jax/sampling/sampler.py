"""The jitted sampler: one prefill, then decode inside `lax.while_loop`, over a donated KV cache.

Dimension letters: B prompts, R = B * n rows (samples), P padded prompt length, T new tokens,
S cache slots, V vocabulary.

- Prompts of different lengths are right-padded into one batch; the decoder's cache writes each
  row's tokens at that row's own offset, so positions stay exact per row.
- `n` samples per prompt share one prefill: the filled cache is repeated along the batch axis
  (row `b * n + i` is sample `i` of prompt `b`).
- Each row stops on its own at an EOS / stop token or after `max_new_tokens`; finished rows idle
  until every row is done or the budget is spent.
- Prefill and decode call the decoder's one `forward`, so the log-probabilities reported here are
  those a teacher-forced forward computes (tests check it to 1e-5 in fp32).
- Streaming runs the same loop in chunks of `chunk` tokens and hands each chunk to Python, so
  control leaves the compiled loop once per chunk, not per token.
- Prompt length and cache size are rounded up to multiples of `BUCKET` (`cache_shape`), so
  prompts of similar lengths share compiled code.
- The compiled programs are public: `prefill` (prompts into a fresh cache, `n` samples each) and
  `decode` (decode steps over a donated `DecodeState` up to a step limit: the whole loop, or one
  chunk of it). `Sampler`, the continuous batcher and `magistral-jax plan` all call these.
- Over a mesh that spans several processes (multi-host), every process passes the same prompts,
  seed and settings (checked), the prompts become global arrays sharded over the batch axes, and
  the outputs are gathered to every process: each gets exactly what one process sampling on the
  same mesh would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magistral_jax.api import image_inputs
from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder, vision
from magistral_jax.model.layers import round_up
from magistral_jax.sampling.strategies import MAGISTRAL, SamplingParams, choose
from magistral_jax.sharding import to_host

BUCKET = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries (a pytree; donated from one chunk to the next).

    Each row keeps its own count of generated tokens, budget and PRNG key, so rows may start at
    different times (continuous batching refills a finished row with a new prompt between two
    chunks, see `sampling.continuous`) and a row's draws depend only on its key and its own token
    index, not on the batch around it.
    """

    cache: decoder.KVCache
    logits: jax.Array  # [R, V] float32: the distribution of each row's next token
    logits_version: jax.Array  # [R] int32: the policy version whose forward computed `logits`
    step: jax.Array  # [] int32: decode steps run so far
    tokens: jax.Array  # [R, T] int32 (0 after a row's end)
    logprobs: jax.Array  # [R, T] float32, under the sampling temperature
    raw_logprobs: jax.Array  # [R, T] float32
    versions: jax.Array  # [R, T] int32: the policy version each token was drawn from
    done: jax.Array  # [R] bool: the row drew a stop token
    lengths: jax.Array  # [R] int32: tokens generated per row, the stop token included
    limits: jax.Array  # [R] int32: each row's budget of new tokens (<= T)
    keys: jax.Array  # [R] PRNG keys, one per row

    def live(self) -> jax.Array:
        """[R] bool: rows that still generate."""
        return ~self.done & (self.lengths < self.limits)


@dataclass
class SampleOutput:
    """What `sample` returns (host arrays).

    Attributes:
      tokens: [R, T] int32 completions, 0 after each row's end; row `b * n + i` is sample `i` of
        prompt `b`.
      logprobs: [R, T] log-probabilities of the drawn tokens under the sampling temperature.
      raw_logprobs: [R, T] the same at temperature 1.
      lengths: [R] completion lengths, the stop token included.
      finish_reasons: `stop` (an EOS or stop token) or `length` (the budget ran out), per row.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    raw_logprobs: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]

    def completion(self, row: int) -> list[int]:
        return self.tokens[row, : self.lengths[row]].tolist()


def cache_shape(longest_prompt: int, max_new_tokens: int) -> tuple[int, int]:
    """(padded prompt width P, cache slots S) of a batch whose longest prompt and largest budget
    are given: both rounded up to `BUCKET`, so that nearby lengths share compiled programs."""
    width = round_up(longest_prompt, BUCKET)
    return width, round_up(width + max_new_tokens, BUCKET)


def empty_outputs(rows: int, max_new: int) -> dict[str, jax.Array]:
    """The per-token buffers of a `DecodeState` for `rows` rows of `max_new` tokens, zeroed."""
    return dict(
        tokens=jnp.zeros((rows, max_new), jnp.int32),
        logprobs=jnp.zeros((rows, max_new), jnp.float32),
        raw_logprobs=jnp.zeros((rows, max_new), jnp.float32),
        versions=jnp.zeros((rows, max_new), jnp.int32),
    )


def prefill_rows(params, prompts, lengths, cfg: ModelConfig, cache_len: int, images=None):
    """Prefills `prompts` (right-padded to `lengths`) into a fresh cache of `cache_len` slots;
    returns the cache and the logits after each prompt's last token."""
    b, p = prompts.shape
    segments = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
    cache = decoder.KVCache.init(cfg, b, cache_len)
    x = None if images is None else vision.embed_with_images(params, prompts, images, cfg)
    logits, cache = decoder.forward(params, prompts, cfg, segment_ids=segments, cache=cache, embeddings=x)
    return cache, jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "n", "cache_len", "max_new"))
def prefill(
    params, prompts, lengths, key, images, limits=None, *, cfg: ModelConfig, n: int, cache_len: int, max_new: int
) -> DecodeState:
    """The prefill program: `prompts` [B, P] (right-padded to `lengths`, with `images` or None)
    into a fresh cache of `cache_len` slots, repeated `n` times along the rows (row `b * n + i`
    is sample i of prompt b), with row budgets `limits` [B] (default `max_new` each) and one
    PRNG key per row folded from `key`."""
    cache, last = prefill_rows(params, prompts, lengths, cfg, cache_len, images)
    # n samples per prompt: repeat the filled cache rather than prefilling again.
    repeat = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    cache = jax.tree.map(repeat, cache)
    rows = prompts.shape[0] * n
    limits = jnp.full((rows,), max_new, jnp.int32) if limits is None else repeat(limits)
    return DecodeState(
        cache=cache,
        logits=repeat(last),
        logits_version=jnp.zeros((rows,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        **empty_outputs(rows, max_new),
        done=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        limits=limits,
        keys=jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows)),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids"), donate_argnums=1)
def decode(
    params,
    state: DecodeState,
    limit,
    version=0,
    *,
    cfg: ModelConfig,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
):
    """The decode program: decode steps over `state` (donated) until `state.step` reaches `limit`
    or no row is live; `version` is recorded as the policy version of the logits these
    parameters compute. One call runs a whole sampling loop or one chunk of it."""
    rows = state.done.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32)
    version = jnp.asarray(version, jnp.int32)

    def cond(s: DecodeState):
        return (s.step < limit) & jnp.any(s.live())

    def body(s: DecodeState) -> DecodeState:
        # One key per (row, token index): a row's draws do not depend on the batch it is in.
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.lengths)
        token, logprob, raw = choose(s.logits, keys, sampling)
        live = s.live()
        token = jnp.where(live, token, 0)
        at = jnp.where(live, s.lengths, s.tokens.shape[1])  # out of range: dropped
        write = lambda buf, x: buf.at[jnp.arange(rows), at].set(x, mode="drop")  # noqa: E731
        # Rows that no longer generate add nothing to their cache.
        segments = live[:, None].astype(jnp.int32)
        logits, cache = decoder.forward(params, token[:, None], cfg, segment_ids=segments, cache=s.cache)
        return dataclasses.replace(
            s,
            cache=cache,
            logits=logits[:, 0],
            logits_version=jnp.where(live, version, s.logits_version),
            step=s.step + 1,
            tokens=write(s.tokens, token),
            logprobs=write(s.logprobs, logprob),
            raw_logprobs=write(s.raw_logprobs, raw),
            versions=write(s.versions, s.logits_version),
            done=s.done | (live & jnp.isin(token, stops)),
            lengths=s.lengths + live,
        )

    return jax.lax.while_loop(cond, body, state)


@dataclass(frozen=True)
class Chunk:
    """Tokens generated since the previous chunk: `tokens[r]` for row r (empty once it ended).
    The last chunk of a stream also carries the whole `output`."""

    tokens: list[list[int]]
    done: np.ndarray  # [R] bool
    output: SampleOutput | None = None


class Sampler:
    """Samples completions from a `Model` (its parameters, config and mesh).

    Args:
      model: a `magistral_jax.Model`.
      stop_ids: token ids that end a completion (default: the model's EOS, id 2).
    """

    def __init__(self, model, stop_ids: Sequence[int] = (2,)):
        self.model = model
        self.stop_ids = tuple(int(i) for i in stop_ids)

    def _start(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int | Sequence[int],
        seed: int,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> DecodeState:
        cfg = self.model.cfg
        batch, lengths, budgets = self._batch(prompts, n, max_new_tokens)
        max_new_tokens = int(budgets.max())
        cache_len = cache_shape(int(lengths.max()), max_new_tokens)[1]
        if jax.process_count() > 1:
            _check_same_on_every_process(batch, lengths, budgets, n, seed)
        vision_inputs = None if images is None else image_inputs(batch, images, cfg)
        with self.model.mesh_context():
            return prefill(
                self.model.params,
                self.model.place_batch(batch),
                jnp.asarray(lengths),
                jax.random.key(seed),
                vision_inputs,
                jnp.asarray(budgets),
                cfg=cfg,
                n=n,
                cache_len=cache_len,
                max_new=max_new_tokens,
            )

    def _batch(
        self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int | Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The prompts checked and right-padded to the `BUCKET`-rounded width, their lengths and
        budgets."""
        cfg = self.model.cfg
        if not prompts:
            raise ValueError("prompts: at least one prompt is expected")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        budgets = _budgets(max_new_tokens, len(prompts))
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError(f"prompt {int(lengths.argmin())} is empty")
        if int(lengths.max()) + int(budgets.max()) > cfg.text.max_position_embeddings:
            raise ValueError(
                f"a prompt of {int(lengths.max())} tokens plus {int(budgets.max())} new tokens exceeds the model's "
                f"context of {cfg.text.max_position_embeddings}"
            )
        batch = np.zeros((len(prompts), cache_shape(int(lengths.max()), 1)[0]), np.int32)
        for i, p in enumerate(prompts):
            batch[i, : len(p)] = p
        if batch.max() >= cfg.text.vocab_size or batch.min() < 0:
            raise ValueError(f"prompt token ids must lie in [0, {cfg.text.vocab_size})")
        return batch, lengths, budgets

    def _sample_chunk(self, max_new_tokens: int | Sequence[int]) -> int:
        """Decode steps per chunk of `sample`: the whole budget (one compiled loop)."""
        return max(1, int(np.max(max_new_tokens)))

    def _decode(self, state: DecodeState, limit: int, sampling: SamplingParams) -> DecodeState:
        # A fixed-weights sampler: every token comes from policy version 0.
        with self.model.mesh_context():
            return decode(
                self.model.params,
                state,
                jnp.int32(limit),
                cfg=self.model.cfg,
                sampling=sampling,
                stop_ids=self.stop_ids,
            )

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
        """Yields the new tokens of every row every `chunk` decode steps (see `Chunk`); `images`
        are the prompts' images as `Model.logits` takes them. `max_new_tokens` is one budget for
        every prompt or one per prompt."""
        if chunk < 1:
            raise ValueError(f"chunk: a positive number of tokens is expected, got {chunk}")
        state = self._start(prompts, n, max_new_tokens, seed, images)
        longest = state.tokens.shape[1]
        seen = 0
        while True:
            state = self._decode(state, min(seen + chunk, longest), sampling)
            step = int(state.step)
            tokens, lengths, live = (
                to_host(state.tokens[:, seen:step]),
                to_host(state.lengths),
                to_host(state.live()),
            )
            new = [row[: max(0, int(length) - seen)].tolist() for row, length in zip(tokens, lengths, strict=True)]
            last = not live.any()
            yield Chunk(new, ~live, _output(state) if last else None)
            if last:
                return
            seen = step

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        n: int = 1,
        sampling: SamplingParams = MAGISTRAL,
        seed: int = 0,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> SampleOutput:
        """Completions of every prompt, `n` each, in one compiled decode loop (`max_new_tokens`:
        one budget for all prompts or one per prompt)."""
        *_, last = self.stream(
            prompts,
            max_new_tokens=max_new_tokens,
            n=n,
            sampling=sampling,
            seed=seed,
            chunk=self._sample_chunk(max_new_tokens),
            images=images,
        )
        assert last.output is not None
        return last.output


def _budgets(max_new_tokens: int | Sequence[int], prompts: int) -> np.ndarray:
    budgets = np.atleast_1d(np.asarray(max_new_tokens))
    if budgets.ndim != 1 or budgets.dtype.kind not in "iu" or (budgets.size != 1 and budgets.size != prompts):
        raise ValueError(f"max_new_tokens: an integer or one integer per prompt ({prompts}) is expected")
    if budgets.min() < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {budgets.min()}")
    return np.broadcast_to(budgets, (prompts,)).astype(np.int32)


def _check_same_on_every_process(
    batch: np.ndarray, lengths: np.ndarray, budgets: np.ndarray, n: int, seed: int
) -> None:
    from magistral_jax.distributed import allgather

    digest = hashlib.blake2b(digest_size=8)
    for part in (batch, lengths, budgets, np.asarray([n, seed], np.int64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    digests = allgather(np.frombuffer(digest.digest(), np.int64)[0])
    if len(set(digests.tolist())) > 1:
        raise ValueError("sample: the processes of a multi-host mesh must pass the same prompts, n and seed")


def _output(state: DecodeState) -> SampleOutput:
    done = to_host(state.done)
    return SampleOutput(
        tokens=to_host(state.tokens),
        logprobs=to_host(state.logprobs),
        raw_logprobs=to_host(state.raw_logprobs),
        lengths=to_host(state.lengths),
        finish_reasons=["stop" if d else "length" for d in done],
    )
