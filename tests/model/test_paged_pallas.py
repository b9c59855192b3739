"""The paged decode-attention Pallas kernel, in Pallas' TPU interpreter, against a float64 oracle that
gathers each row's slots through its page table; and its ahead-of-time compilation for a TPU."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from magistral_jax.aot.topologies import libtpu_available, topology_devices
from magistral_jax.model.paged_pallas import paged_decode_attention

# Pool: P pages, L layers, G kv heads, S tokens a page, K head dim; rows: N query heads, M table entries.
P, L, G, S, K, N, M = 24, 2, 2, 8, 16, 8, 4
GARBAGE = 1e4  # unused pages and slots: attending to one of them swamps the output
# Three table entries a step: a row of 4 pages takes two steps (online softmax across steps,
# double-buffered copies), and the second step's last two entries lie past the table.
attend = jax.jit(functools.partial(paged_decode_attention, pages_per_block=3, interpret=True))


def _oracle(q, k_pages, v_pages, layer, table, lengths):
    """Definition of the contract in float64: row b's slot t is page table[b, t // S] at offset t % S."""
    b_, n_, k_ = q.shape
    group = n_ // k_pages.shape[2]
    out = np.zeros((b_, n_, k_))
    for b in range(b_):
        slots = np.arange(lengths[b])
        pages, offsets = table[b, slots // S], slots % S
        keys = k_pages[pages, layer, :, offsets].astype(np.float64)  # [T, G, K]
        values = v_pages[pages, layer, :, offsets].astype(np.float64)
        for n in range(n_):
            if not len(slots):
                continue
            logits = keys[:, n // group] @ q[b, n].astype(np.float64) / np.sqrt(k_)
            weights = np.exp(logits - logits.max())
            out[b, n] = (weights / weights.sum()) @ values[:, n // group]
    return out


def _case(rng, lengths, *, shared=0, unused_entry=None, layer=1, dtype=np.float32):
    """A pool full of garbage whose used slots (of `layer`) hold normal values, and each row's table of
    distinct pages, except that every row's first `shared` entries are row 0's. Unused table entries
    point to `unused_entry` (default: random garbage pages)."""
    k_pages = rng.normal(scale=GARBAGE, size=(P, L, G, S, K))
    v_pages = rng.normal(scale=GARBAGE, size=(P, L, G, S, K))
    ids = rng.permutation(P)
    table = np.zeros((len(lengths), M), np.int32)
    taken = 0
    for b, length in enumerate(lengths):
        used = -(-length // S)
        own = np.arange(used) >= shared if b else np.ones(used, bool)
        table[b, :used] = np.where(own, 0, table[0, :used])
        table[b, :used][own] = ids[taken : taken + own.sum()]
        taken += own.sum()
        table[b, used:] = rng.integers(0, P, M - used) if unused_entry is None else unused_entry
        slots = np.arange(length)
        k_pages[table[b, slots // S], layer, :, slots % S] = rng.normal(size=(length, G, K))
        v_pages[table[b, slots // S], layer, :, slots % S] = rng.normal(size=(length, G, K))
    q = rng.normal(size=(len(lengths), N, K))
    cast = [a.astype(dtype) for a in (q, k_pages, v_pages)]
    return (*cast, np.int32(layer), table, np.asarray(lengths, np.int32))


def _check(args, atol=1e-5):
    out = np.asarray(attend(*args))
    np.testing.assert_allclose(out, _oracle(*args), atol=atol, rtol=1e-5)
    return out


def test_ragged_rows_attend_to_exactly_their_slots():
    """One slot, a full page, one past a page boundary, a partial third page, the whole table."""
    _check(_case(np.random.default_rng(0), [1, S, S + 1, 3 * S - 2, M * S]))


def test_query_heads_read_their_groups_kv_head():
    """Query head n reads kv head n // (N // G): with random keys a wrong mapping changes every row."""
    _check(_case(np.random.default_rng(1), [S + 3, 2 * S + 5, 1, 3 * S, 7]))


def test_the_layer_index_selects_the_pools_layer():
    """Layer 0 holds garbage where layer 1 holds the rows' slots, and the reverse."""
    rng = np.random.default_rng(2)
    _check(_case(rng, [5, 2 * S, 3 * S + 1, 1, S], layer=1))
    _check(_case(rng, [5, 2 * S, 3 * S + 1, 1, S], layer=0))


def test_rows_sharing_prompt_pages_read_them_through_their_own_tables():
    """A group's samples share their prompt's first two full pages and then diverge."""
    args = _case(np.random.default_rng(3), [2 * S + 1, 3 * S, 2 * S + 5, 4 * S, 2 * S], shared=2)
    table = args[4]
    assert (table[1:, :2] == table[0, :2]).all() and len(set(table[:4, 2])) == 4
    _check(args)


def test_table_entries_past_a_rows_pages_are_never_read():
    """Unused entries point past the pool: the interpreter raises on an out-of-bounds read, so any copy
    of a page the row does not use (a row of one page reading M) fails."""
    _check(_case(np.random.default_rng(4), [1, S, S + 1, 3 * S - 2, 2 * S], unused_entry=P + 1000))


def test_an_idle_row_outputs_zeros():
    """A row of length 0 beside busy ones: zeros, not 0 / 0; its table is never read."""
    out = _check(_case(np.random.default_rng(5), [0, 3 * S - 2, 0, S, 1], unused_entry=P + 1000))
    assert np.isfinite(out).all() and not out[[0, 2]].any()


def test_bf16_inputs_softmax_in_float32():
    """bf16 pool and query: the output is the float32 result rounded to bf16 (half an ulp, 2^-8
    relative). Every score is about 64 + O(1) (a shared component of q and k), where bf16's ulp is 0.5:
    scores rounded to bf16 before the softmax would move the weights by up to 25%, far past that bound."""
    rng = np.random.default_rng(6)
    lengths = [S + 1, 3 * S - 2, 1, 4 * S, 2 * S - 1]
    q, k_pages, v_pages, layer, table, lengths = _case(rng, lengths, dtype=ml_dtypes.bfloat16)
    q[:, :, 0] = 16
    for b, length in enumerate(lengths):
        slots = np.arange(length)
        k_pages[table[b, slots // S], layer, :, slots % S, 0] = 16
    args = (q, k_pages, v_pages, layer, table, lengths)
    expected = _oracle(*args)
    bound = 2.0**-8 * np.abs(expected) + 1e-5
    out = np.asarray(attend(*args)).astype(np.float64)
    assert attend(*args).dtype == jnp.bfloat16
    assert (np.abs(out - expected) <= bound).all(), np.abs(out - expected).max()

    # The case discriminates: the same softmax over bf16-rounded scores misses the bound.
    def bf16_softmax_row(b, n):
        slots = np.arange(lengths[b])
        keys = k_pages[table[b, slots // S], layer, n // (N // G), slots % S].astype(np.float64)
        logits = (keys @ q[b, n].astype(np.float64) / np.sqrt(K)).astype(ml_dtypes.bfloat16).astype(np.float64)
        weights = np.exp(logits - logits.max())
        return (weights / weights.sum()) @ v_pages[table[b, slots // S], layer, n // (N // G), slots % S]

    assert np.abs(bf16_softmax_row(1, 0) - expected[1, 0]).max() > 10 * bound[1, 0].max()


def test_query_heads_not_a_multiple_of_kv_heads_is_refused():
    q, k_pages, v_pages, layer, table, lengths = _case(np.random.default_rng(7), [S])
    with pytest.raises(ValueError, match="query heads 6 must be a multiple of kv heads 4"):
        paged_decode_attention(
            q[:, :6], k_pages[:, :, [0, 1, 0, 1]], v_pages[:, :, [0, 1, 0, 1]], layer, table, lengths
        )


@pytest.mark.skipif(not libtpu_available(), reason="TPU ahead-of-time compilation needs libtpu")
def test_compiles_for_a_tpu_ahead_of_time():
    """Mosaic lowers and compiles the kernel for a v5e chip (bf16, the default pages per block)."""
    sharding = jax.sharding.SingleDeviceSharding(topology_devices("v5e-1")[0])

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    pool = spec((64, 2, 2, 16, 128), jnp.bfloat16)
    args = (
        spec((4, 8, 128), jnp.bfloat16),
        pool,
        pool,
        spec((), jnp.int32),
        spec((4, 8), jnp.int32),
        spec((4,), jnp.int32),
    )
    compiled = jax.jit(paged_decode_attention).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    assert "tpu_custom_call" in compiled.as_text()
