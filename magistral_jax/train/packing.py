"""Packing sequences into fixed-token microbatches.

A minibatch has a fixed number of sequences but a variable number of tokens; it is cut into
microbatches of `rows x row_len` tokens. Sequences are sorted by length (longest first) and placed
first-fit into rows of `row_len` tokens, several to a row, each with its own segment id so packed
sequences never attend to each other and positions restart at each one; rows are then grouped
`rows` at a time. Every per-token quantity a loss needs (weights, advantages, old and reference
log-probabilities) travels with its token, so the loss of the minibatch does not depend on how it
was cut.

A sequence of n tokens occupies n - 1 slots: inputs `tokens[:-1]`, targets `tokens[1:]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

FIELDS = ("weights", "advantages", "old_logprobs", "ref_logprobs")


@dataclass
class Item:
    """One sequence to train on.

    Attributes:
      tokens: prompt and completion (or chat) token ids.
      loss_start: index of the first token that is trained on (the completion's first token).
      weight: the loss weight of each trained token (the variant's normaliser).
      advantage: the sequence's advantage (policy-gradient objectives).
      old_logprobs: sampling-policy log-probabilities of the trained tokens, in order.
      ref_logprobs: reference-policy log-probabilities of the trained tokens (KL variants).
    """

    tokens: Sequence[int]
    loss_start: int
    weight: float = 1.0
    advantage: float = 0.0
    old_logprobs: Sequence[float] | None = None
    ref_logprobs: Sequence[float] | None = None

    @property
    def slots(self) -> int:
        return len(self.tokens) - 1


@dataclass
class Microbatch:
    """Arrays of shape [rows, row_len] (numpy, host)."""

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    weights: np.ndarray
    advantages: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: np.ndarray
    items: list[int] = field(default_factory=list)  # indices of the packed items


@dataclass
class Packing:
    microbatches: list[Microbatch]
    rows_used: int
    padding_saved: float  # fraction of the tokens one-sequence-per-row batching would have padded


def row_length(setting: int, longest: int) -> int:
    """Slots per packed row: `setting` (a run's `row_len`), or with 0 the longest sequence rounded
    up to a multiple of 64."""
    return setting or max(64, math.ceil(longest / 64) * 64)


def microbatch_rows(tokens: int, length: int, mesh, rules) -> int:
    """Rows of a (global) microbatch of about `tokens` tokens in rows of `length`; with several
    processes a multiple of the batch shards and processes, so each process holds its own block."""
    import jax

    from magistral_jax.sharding import batch_shards

    rows = max(1, tokens // length)
    count = jax.process_count()
    if count == 1:
        return rows
    unit = math.lcm(batch_shards(mesh, rules), count)
    return max(unit, rows // unit * unit)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items sorted by decreasing length, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} needs {lengths[i]} slots, more than a row of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _zeros(rows: int, row_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, row_len), np.int32),
        "targets": np.zeros((rows, row_len), np.int32),
        "segment_ids": np.zeros((rows, row_len), np.int32),
        "positions": np.zeros((rows, row_len), np.int32),
        **{f: np.zeros((rows, row_len), np.float32) for f in FIELDS},
    }


def pack(items: Sequence[Item], row_len: int, rows: int) -> Packing:
    """Packs `items` into microbatches of `rows` rows of `row_len` slots."""
    if not items:
        raise ValueError("pack: no sequences to pack")
    for i, it in enumerate(items):
        if not 1 <= it.loss_start < len(it.tokens):
            raise ValueError(f"item {i}: loss_start {it.loss_start} must lie in [1, {len(it.tokens)})")
    bins = first_fit([it.slots for it in items], row_len)
    n_micro = math.ceil(len(bins) / rows)
    microbatches = []
    for m in range(n_micro):
        arrays = _zeros(rows, row_len)
        packed = []
        for r, members in enumerate(bins[m * rows : (m + 1) * rows]):
            offset = 0
            for seg, i in enumerate(members, start=1):
                it = items[i]
                n = it.slots
                sl = slice(offset, offset + n)
                toks = np.asarray(it.tokens, np.int32)
                arrays["tokens"][r, sl] = toks[:-1]
                arrays["targets"][r, sl] = toks[1:]
                arrays["segment_ids"][r, sl] = seg
                arrays["positions"][r, sl] = np.arange(n)
                # Target j predicts tokens[j + 1]: trained targets start at loss_start - 1.
                trained = slice(offset + it.loss_start - 1, offset + n)
                n_trained = n - it.loss_start + 1
                arrays["weights"][r, trained] = it.weight
                arrays["advantages"][r, trained] = it.advantage
                for name, values in (("old_logprobs", it.old_logprobs), ("ref_logprobs", it.ref_logprobs)):
                    if values is not None:
                        if len(values) != n_trained:
                            raise ValueError(f"item {i}: {len(values)} {name} for {n_trained} trained tokens")
                        arrays[name][r, trained] = values
                offset += n
                packed.append(i)
        microbatches.append(Microbatch(**arrays, items=packed))
    unpacked_rows = len(items)
    return Packing(microbatches, len(bins), 1.0 - len(bins) / unpacked_rows)


def pack_across_processes(items: Sequence[Item], row_len: int, rows: int) -> Packing:
    """`pack` of this process's share of a minibatch split over the processes.

    Each process packs its own `items` (possibly none) into microbatches of `rows / process_count`
    rows; the processes agree on the number of microbatches (a process with fewer adds empty
    ones, which weigh nothing), so global microbatch m is every process's microbatch m, one
    block of rows each (`sharding.local_batch_to_global`). `padding_saved` is that of the whole
    minibatch. In a single process, exactly `pack(items, row_len, rows)`.
    """
    import jax

    from magistral_jax.distributed import allgather

    count = jax.process_count()
    if count == 1:
        return pack(items, row_len, rows)
    if rows % count:
        raise ValueError(f"pack: {rows} rows per microbatch do not split over {count} processes")
    local_rows = rows // count
    packing = pack(items, row_len, local_rows) if items else Packing([], 0, 0.0)
    n_micro, rows_used, n_items = allgather([len(packing.microbatches), packing.rows_used, len(items)]).T
    if not n_items.sum():
        raise ValueError("pack: no sequences to pack on any process")
    empty = [Microbatch(**_zeros(local_rows, row_len)) for _ in range(int(n_micro.max()) - len(packing.microbatches))]
    return Packing(packing.microbatches + empty, int(rows_used.sum()), 1.0 - rows_used.sum() / n_items.sum())
