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
- Prompt length and cache size are rounded up to multiples of `BUCKET`, so prompts of similar
  lengths share compiled code.
- Over a mesh that spans several processes (multi-host), every process passes the same prompts,
  seed and settings (checked), the prompts become global arrays sharded over the batch axes, and
  the outputs are gathered to every process: each gets exactly what one process sampling on the
  same mesh would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magistral_jax.api import image_inputs
from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder, vision
from magistral_jax.sampling.strategies import MAGISTRAL, SamplingParams, choose
from magistral_jax.sharding import to_host

BUCKET = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries (a pytree; donated from one chunk to the next)."""

    cache: decoder.KVCache
    logits: jax.Array  # [R, V] float32: the distribution of each row's next token
    step: jax.Array  # [] int32: tokens generated so far
    tokens: jax.Array  # [R, T] int32 (0 after a row's end)
    logprobs: jax.Array  # [R, T] float32, under the sampling temperature
    raw_logprobs: jax.Array  # [R, T] float32
    done: jax.Array  # [R] bool
    lengths: jax.Array  # [R] int32: tokens generated per row, the stop token included
    key: jax.Array  # PRNG key of the run


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


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("cfg", "n", "cache_len", "max_new"))
def _prefill(
    params, prompts, lengths, key, images, *, cfg: ModelConfig, n: int, cache_len: int, max_new: int
) -> DecodeState:
    b, p = prompts.shape
    segments = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
    cache = decoder.KVCache.init(cfg, b, cache_len)
    x = None if images is None else vision.embed_with_images(params, prompts, images, cfg)
    logits, cache = decoder.forward(params, prompts, cfg, segment_ids=segments, cache=cache, embeddings=x)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    # n samples per prompt: repeat the filled cache rather than prefilling again.
    repeat = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
    cache = decoder.KVCache(
        k=repeat(cache.k, 1),
        v=repeat(cache.v, 1),
        positions=repeat(cache.positions, 0),
        lengths=repeat(cache.lengths, 0),
    )
    rows = b * n
    return DecodeState(
        cache=cache,
        logits=repeat(last, 0),
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.zeros((rows, max_new), jnp.int32),
        logprobs=jnp.zeros((rows, max_new), jnp.float32),
        raw_logprobs=jnp.zeros((rows, max_new), jnp.float32),
        done=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        key=key,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids"), donate_argnums=1)
def _decode(
    params, state: DecodeState, limit, *, cfg: ModelConfig, sampling: SamplingParams, stop_ids: tuple[int, ...]
):
    rows = state.done.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        # One key per (row, step): a row's draws do not depend on the batch it is in.
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(s.key, r), s.step))(jnp.arange(rows))
        token, logprob, raw = choose(s.logits, keys, sampling)
        live = ~s.done
        token = jnp.where(live, token, 0)
        write = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, jnp.where(live, x, 0), s.step, 1)  # noqa: E731
        logits, cache = decoder.forward(params, token[:, None], cfg, cache=s.cache)
        return dataclasses.replace(
            s,
            cache=cache,
            logits=logits[:, 0],
            step=s.step + 1,
            tokens=write(s.tokens, token),
            logprobs=write(s.logprobs, logprob),
            raw_logprobs=write(s.raw_logprobs, raw),
            done=s.done | (live & jnp.isin(token, stops)),
            lengths=jnp.where(live, s.step + 1, s.lengths),
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
        max_new_tokens: int,
        seed: int,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> DecodeState:
        cfg = self.model.cfg
        if not prompts:
            raise ValueError("prompts: at least one prompt is expected")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError(f"prompt {int(lengths.argmin())} is empty")
        longest = int(lengths.max()) + max_new_tokens
        if longest > cfg.text.max_position_embeddings:
            raise ValueError(
                f"a prompt of {int(lengths.max())} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"context of {cfg.text.max_position_embeddings}"
            )
        width = _round_up(int(lengths.max()), BUCKET)
        batch = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            batch[i, : len(p)] = p
        if batch.max() >= cfg.text.vocab_size or batch.min() < 0:
            raise ValueError(f"prompt token ids must lie in [0, {cfg.text.vocab_size})")
        cache_len = _round_up(width + max_new_tokens, BUCKET)
        if jax.process_count() > 1:
            _check_same_on_every_process(batch, lengths, n, max_new_tokens, seed)
        vision_inputs = None if images is None else image_inputs(batch, images, cfg)
        with self.model.mesh_context():
            return _prefill(
                self.model.params,
                self.model.place_batch(batch),
                jnp.asarray(lengths),
                jax.random.key(seed),
                vision_inputs,
                cfg=cfg,
                n=n,
                cache_len=cache_len,
                max_new=max_new_tokens,
            )

    def _decode(self, state: DecodeState, limit: int, sampling: SamplingParams) -> DecodeState:
        with self.model.mesh_context():
            return _decode(
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
        max_new_tokens: int,
        n: int = 1,
        sampling: SamplingParams = MAGISTRAL,
        seed: int = 0,
        chunk: int = 16,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> Iterator[Chunk]:
        """Yields the new tokens of every row every `chunk` decode steps (see `Chunk`); `images`
        are the prompts' images as `Model.logits` takes them."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if chunk < 1:
            raise ValueError(f"chunk: a positive number of tokens is expected, got {chunk}")
        state = self._start(prompts, n, max_new_tokens, seed, images)
        seen = 0
        while True:
            state = self._decode(state, min(seen + chunk, max_new_tokens), sampling)
            step = int(state.step)
            tokens, lengths, done = (
                to_host(state.tokens[:, seen:step]),
                to_host(state.lengths),
                to_host(state.done),
            )
            new = [row[: max(0, int(length) - seen)].tolist() for row, length in zip(tokens, lengths, strict=True)]
            last = step >= max_new_tokens or bool(done.all())
            yield Chunk(new, done, _output(state) if last else None)
            if last:
                return
            seen = step

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        n: int = 1,
        sampling: SamplingParams = MAGISTRAL,
        seed: int = 0,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> SampleOutput:
        """Completions of every prompt, `n` each, in one compiled decode loop."""
        *_, last = self.stream(
            prompts,
            max_new_tokens=max_new_tokens,
            n=n,
            sampling=sampling,
            seed=seed,
            chunk=max_new_tokens,
            images=images,
        )
        assert last.output is not None
        return last.output


def _check_same_on_every_process(batch: np.ndarray, lengths: np.ndarray, n: int, max_new: int, seed: int) -> None:
    from magistral_jax.distributed import allgather

    digest = hashlib.blake2b(digest_size=8)
    for part in (batch, lengths, np.asarray([n, max_new, seed], np.int64)):
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
