"""Decode attention over a paged KV cache as a TPU Pallas kernel; off TPU it runs in Pallas' interpreter.

Dimension letters: B batch rows, N query heads, G kv heads, R = N / G query heads per kv head,
K head dim, P pages in the pool, L layers, S tokens per page, M table entries per row.

The pool holds keys and values as `[P, L, G, S, K]`: page `p` of layer `l` and kv head `g` is one
contiguous `[S, K]` tile, so a page is a single DMA. Row `b` holds `lengths[b]` tokens; its slot `t`
lives in page `page_table[b, t // S]` at offset `t % S`. Table entries at or past
`ceil(lengths[b] / S)` are never dereferenced, and a page id may appear in several rows (a group's
samples share their prompt's full pages).

The kernel runs a grid `(B, G, blocks)`; a block is `pages_per_block` table entries. The page table,
lengths and layer index are scalar-prefetched into SMEM, the pool stays in HBM and the kernel copies
a block's pages into VMEM itself, double-buffered across blocks (the next block's copies start
before the current block's arithmetic). Blocks past a row's length issue no copy and no arithmetic,
so a row's cost follows its own length, not M. Scores, running max, sum and accumulator are float32
whatever the input dtype (an online softmax across blocks); the output is cast to q's dtype. A row
with no tokens outputs zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

DEFAULT_PAGES_PER_BLOCK = 8


def paged_decode_attention(
    q: Float[Array, "B N K"],
    k_pages: Float[Array, "P L G S K"],
    v_pages: Float[Array, "P L G S K"],
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    scale: float | None = None,
    pages_per_block: int = DEFAULT_PAGES_PER_BLOCK,
    interpret: bool = False,
) -> Float[Array, "B N K"]:
    """One new query token per row attends to the row's `lengths[b]` cached slots, read through its page table.

    `layer` (traced) picks the pool's layer; query head n reads kv head `n // (N // G)`.
    `pages_per_block` table entries are fetched per kernel step (clamped to M). `interpret` runs the
    kernel in Pallas' TPU interpreter (CPU tests): buffers start as NaN and an out-of-bounds read raises.
    """
    _check_shapes(q, k_pages, v_pages, page_table, lengths, pages_per_block)
    batch, heads, head_dim = q.shape
    _, _, kv_heads, page_size, _ = k_pages.shape
    max_pages = page_table.shape[1]
    per_kv = heads // kv_heads
    block_pages = min(pages_per_block, max_pages)
    blocks = pl.cdiv(max_pages, block_pages)
    scale = head_dim**-0.5 if scale is None else float(scale)

    kernel = functools.partial(_kernel, scale=scale, page_size=page_size, block_pages=block_pages, max_pages=max_pages)
    # Flat in SMEM: a 2-D [B, M] scalar array would be padded to SMEM's tile on each row.
    table = page_table.astype(jnp.int32).reshape(-1)
    scalars = (lengths.astype(jnp.int32), table, jnp.asarray(layer, jnp.int32).reshape(1))
    q_spec = pl.BlockSpec((None, None, per_kv, head_dim), lambda b, g, i, *_: (b, g, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(batch, kv_heads, blocks),
        in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((2, block_pages, page_size, head_dim), k_pages.dtype),
            pltpu.VMEM((2, block_pages, page_size, head_dim), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),  # [keys | values, buffer]
            pltpu.VMEM((per_kv, 1), jnp.float32),  # running max
            pltpu.VMEM((per_kv, 1), jnp.float32),  # running sum
            pltpu.VMEM((per_kv, head_dim), jnp.float32),  # accumulator
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, per_kv, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_decode_attention",
    )(*scalars, q.reshape(batch, kv_heads, per_kv, head_dim), k_pages, v_pages)
    return out.reshape(batch, heads, head_dim)


def _check_shapes(q, k_pages, v_pages, page_table, lengths, pages_per_block) -> None:
    if q.ndim != 3:
        raise ValueError(f"paged_decode_attention: q of shape [B, N, K] expected, got {q.shape}")
    batch, heads, head_dim = q.shape
    if k_pages.ndim != 5 or k_pages.shape[4] != head_dim:
        raise ValueError(
            f"paged_decode_attention: k_pages of shape [P, L, G, S, {head_dim}] expected, got {k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"paged_decode_attention: v_pages of shape {k_pages.shape} (as k_pages) expected, got {v_pages.shape}"
        )
    kv_heads = k_pages.shape[2]
    if heads % kv_heads:
        raise ValueError(f"paged_decode_attention: query heads {heads} must be a multiple of kv heads {kv_heads}")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(f"paged_decode_attention: page_table of shape [{batch}, M] expected, got {page_table.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"paged_decode_attention: lengths of shape ({batch},) expected, got {lengths.shape}")
    if pages_per_block < 1:
        raise ValueError(f"paged_decode_attention: pages_per_block must be at least 1, got {pages_per_block}")


def _kernel(
    lengths_ref,
    table_ref,
    layer_ref,
    q_ref,
    k_hbm,
    v_hbm,
    o_ref,
    k_buf,
    v_buf,
    sems,
    max_ref,
    sum_ref,
    acc_ref,
    *,
    scale: float,
    page_size: int,
    block_pages: int,
    max_pages: int,
):
    b, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    # A length beyond the table is clamped to it, so no copy reads past row b's table entries.
    length = jnp.minimum(lengths_ref[b], max_pages * page_size)
    used_pages = pl.cdiv(length, page_size)
    used_blocks = pl.cdiv(used_pages, block_pages)

    def copy_page(buffer, p, entry, method):
        page = table_ref[b * max_pages + entry]
        getattr(pltpu.make_async_copy(k_hbm.at[page, layer, g], k_buf.at[buffer, p], sems.at[0, buffer]), method)()
        getattr(pltpu.make_async_copy(v_hbm.at[page, layer, g], v_buf.at[buffer, p], sems.at[1, buffer]), method)()

    def copy_block(block, buffer, method):
        """Starts (or waits for) the copies of the block's pages that the row uses."""
        for p in range(block_pages):
            entry = block * block_pages + p
            # Entries past the row's pages are never read from the table: they may hold anything.
            pl.when(entry < used_pages)(functools.partial(copy_page, buffer, p, entry, method))

    @pl.when(i == 0)
    def _():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when(used_blocks > 0)
        def _():
            copy_block(0, 0, "start")

    @pl.when(i < used_blocks)
    def _():
        buffer = i % 2

        @pl.when(i + 1 < used_blocks)
        def _():
            copy_block(i + 1, 1 - buffer, "start")

        copy_block(i, buffer, "wait")
        q = q_ref[...]
        scores, values = [], []
        for p in range(block_pages):
            first = (i * block_pages + p) * page_size
            # Slots past the length (and whole entries not copied, whose buffers hold stale data)
            # get a -inf score and a zero value: a NaN left there cannot reach the output.
            lane_slots = first + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
            row_slots = first + lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
            k = k_buf[buffer, p]
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            scores.append(jnp.where(lane_slots < length, s, -jnp.inf))
            values.append(jnp.where(row_slots < length, v_buf[buffer, p].astype(jnp.float32), 0.0))
        block_max = functools.reduce(jnp.maximum, [s.max(axis=1, keepdims=True) for s in scores])
        old_max = max_ref[...]
        new_max = jnp.maximum(old_max, block_max)
        rescale = jnp.exp(old_max - new_max)
        probs = [jnp.exp(s - new_max) for s in scores]
        sum_ref[...] = rescale * sum_ref[...] + sum(p.sum(axis=1, keepdims=True) for p in probs)
        acc_ref[...] = rescale * acc_ref[...] + sum(
            lax.dot_general(p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            for p, v in zip(probs, values, strict=True)
        )
        max_ref[...] = new_max

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        total = sum_ref[...]
        # An idle row saw no slot: its sum is 0 and its output zeros, not 0 / 0.
        o_ref[...] = jnp.where(total > 0, acc_ref[...] / jnp.where(total > 0, total, 1.0), 0.0).astype(o_ref.dtype)
