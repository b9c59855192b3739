"""Attention with grouped-query heads, one entry point and selectable implementations.

Dimension letters: B batch, T query length, S key length, N query heads, G kv heads,
R = N / G query heads per kv head, K head dim.

Which key a query may see is decided by positions and segment ids only:
  `kv_segment == q_segment != 0` and, when causal, `kv_position <= q_position`.
Segment id 0 marks padding (or an empty cache slot); packed documents carry distinct ids, so they
never attend to each other. A query that sees no key (padding) produces zeros.

Implementations (all compute logits, softmax and accumulation in float32):
- `xla`: the whole [T, S] logits matrix, plain einsums.
- `cudnn`: `jax.nn.dot_product_attention`; cuDNN's fused kernel on GPU (bf16/fp16), its portable
  XLA implementation elsewhere.
- `chunked`: blockwise online softmax with a custom VJP (flash-attention style) in pure JAX:
  memory O(T * K) instead of O(T * S) in the forward and the backward pass, on any backend; key
  blocks that the mask hides completely are skipped.
- `splash`: TPU splash attention (a Pallas kernel, forward and backward), inside a `shard_map`
  over the context mesh (batch over the batch axes, kv heads over `tensor`); off TPU it runs in
  Pallas' interpreter (slow; for tests). Self-attention only (queries and keys are the same
  slots, as in training and prefill without a cache): its causal mask is by slot index, which
  equals the position mask because positions increase along a segment. Other calls fall back to
  `chunked`.
- `auto`: `splash` on TPU, `cudnn` on GPU for 16-bit inputs, otherwise `chunked` when T * S
  exceeds `CHUNKED_THRESHOLD`, otherwise `xla`.

`cached_attention` serves the sampler: a few new queries over a KV cache, reading only the cache's
filled slots (a dynamic bound), so a decode step's cost follows the sequence, not the cache size.
`paged_attention` does the same over a paged cache, reading each row's pages through its page
table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from magistral_jax.model.layers import round_up
from magistral_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

CHUNKED_THRESHOLD = 4096 * 4096
IMPLS = ("auto", "xla", "cudnn", "chunked", "splash")


def attention_mask(
    q_positions: Int[Array, "B T"],
    q_segments: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    kv_segments: Int[Array, "B S"],
    causal: bool,
) -> Bool[Array, "B T S"]:
    """True where query t may attend to key s."""
    mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def attention(
    q: Float[Array, "B T N K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G K"],
    *,
    q_positions: Int[Array, "B T"],
    q_segments: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    kv_segments: Int[Array, "B S"],
    causal: bool = True,
    impl: str = "auto",
    block: int = 512,
    scale: float | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Float[Array, "B T N K"]:
    """Scaled dot-product attention; returns q's dtype. See the module docstring for the mask.

    `rules` place the splash kernel's `shard_map` (the model's logical-axis rules)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t, s = q.shape[1], k.shape[1]
    self_attention = kv_positions is q_positions and kv_segments is q_segments
    if impl == "auto":
        if _platform() == "tpu" and self_attention:
            impl = "splash"
        elif _platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            impl = "cudnn"
        elif t * s > CHUNKED_THRESHOLD:
            impl = "chunked"
        else:
            impl = "xla"
    if impl == "splash":
        if self_attention:
            return _splash_attention(q, k, v, q_segments, causal, scale, block, rules)
        impl = "chunked"
    if impl == "chunked":
        return _chunked_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, causal, scale, block)
    mask = attention_mask(q_positions, q_segments, kv_positions, kv_segments, causal)
    if impl == "xla":
        return _xla_attention(q, k, v, mask, scale)
    if impl == "cudnn":
        use_cudnn = _platform() == "gpu"
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn" if use_cudnn else None
        )
        return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)
    raise ValueError(f"attention: unknown implementation {impl!r}; expected one of {IMPLS}")


def _platform() -> str:
    """The platform this call is traced for: the context mesh's devices' (a TPU topology compiled
    ahead of time from a CPU host is `tpu`), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _xla_attention(q, k, v, mask, scale):
    b, t, n, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, n // g, d)
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    # A fully masked row would be NaN; it gets zeros instead.
    seen = jnp.any(mask, axis=-1)[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(seen, logits, 0.0), axis=-1)
    probs = jnp.where(seen, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# Chunked (flash-style) attention with a custom VJP
# ------------------------------------------------------------------------------------------------


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _chunked_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, block):
    b, t, n, d = q.shape
    s, g = k.shape[1], k.shape[2]
    bq, bk = min(block, t), min(block, s)
    # Padded queries and keys get segment 0: they see nothing and are seen by nobody.
    qg = _pad_to(q.reshape(b, t, g, n // g, d), 1, bq)
    out = _flash(
        qg,
        _pad_to(k, 1, bk),
        _pad_to(v, 1, bk),
        _pad_to(q_pos, 1, bq),
        _pad_to(q_seg, 1, bq),
        _pad_to(kv_pos, 1, bk),
        _pad_to(kv_seg, 1, bk),
        causal,
        float(scale),
        bq,
        bk,
    )
    return out[:, :t].reshape(b, t, n, d)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, L, ...] -> [L / size, B, size, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """[nb, B, size, ...] -> [B, nb * size, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _block_logits(q_i, k_j, mask_ij, scale):
    """Masked float32 logits [B, G, R, bq, bk] of one (query block, key block) pair."""
    logits = jnp.einsum("bqgrk,bsgk->bgrqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_ij[:, None, None], logits, -jnp.inf)


def _online_softmax_init(b: int, g: int, r: int, t: int, d: int):
    """(running max, denominator, accumulator) of an online softmax over key blocks."""
    return (
        jnp.full((b, g, r, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, g, r, t), jnp.float32),
        jnp.zeros((b, g, r, t, d), jnp.float32),
    )


def _online_softmax_step(carry, q_i, k_j, v_j, mask, scale):
    """Folds one key block into the online softmax of query block `q_i` [B, T, G, R, K]."""
    m, denom, acc = carry
    logits = _block_logits(q_i, k_j, mask, scale)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    denom = denom * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bgrqs,bsgk->bgrqk", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    return m_new, denom, acc * alpha[..., None] + pv


def _online_softmax_finish(m, denom, acc):
    """The normalised output [B, G, R, T, K] (zeros for rows that saw no key) and the log-sum-exp."""
    safe = jnp.where(denom > 0, denom, 1.0)
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
    return acc / safe[..., None], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, bq, bk):
    out, _ = _flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, bq, bk)
    return out


def _flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, bq, bk):
    """Returns the output [B, T, G, R, K] and the log-sum-exp [B, G, R, T] of every query row."""
    b, _, g, r, d = q.shape
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    kpb, ksb = _blocks(kv_pos, bk), _blocks(kv_seg, bk)

    def one_query_block(args):
        q_i, qp_i, qs_i = args

        def step(carry, kv):
            k_j, v_j, kp_j, ks_j = kv
            mask = attention_mask(qp_i, qs_i, kp_j, ks_j, causal)

            def update(carry):
                return _online_softmax_step(carry, q_i, k_j, v_j, mask, scale)

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        (m, denom, acc), _ = jax.lax.scan(step, _online_softmax_init(b, g, r, bq, d), (kb, vb, kpb, ksb))
        out, lse = _online_softmax_finish(m, denom, acc)
        return jnp.einsum("bgrqk->bqgrk", out).astype(q.dtype), lse

    out, lse = jax.lax.map(one_query_block, (_blocks(q, bq), _blocks(q_pos, bq), _blocks(q_seg, bq)))
    # lse: [nq, B, G, R, bq] -> [B, G, R, T]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, g, r, -1)
    return _unblocks(out), lse


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, causal, scale, bq, bk)
    return out, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse)


def _flash_bwd(causal, scale, bq, bk, res, dout):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse = res
    b, t, g, r, _ = q.shape
    # delta_t = sum_k dout * out: the softmax-Jacobian correction of every query row.
    delta = jnp.einsum("btgrk,btgrk->bgrt", dout.astype(jnp.float32), out.astype(jnp.float32))
    qb, dob = _blocks(q, bq), _blocks(dout, bq)
    qpb, qsb = _blocks(q_pos, bq), _blocks(q_seg, bq)
    lseb = jnp.moveaxis(lse.reshape(b, g, r, t // bq, bq), 3, 0)
    deltab = jnp.moveaxis(delta.reshape(b, g, r, t // bq, bq), 3, 0)
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    kpb, ksb = _blocks(kv_pos, bk), _blocks(kv_seg, bk)

    def probs_and_dlogits(q_i, do_i, lse_i, delta_i, k_j, v_j, mask):
        logits = _block_logits(q_i, k_j, mask, scale)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)[..., None])
        dp = jnp.einsum("bqgrk,bsgk->bgrqs", do_i, v_j, preferred_element_type=jnp.float32)
        return p, p * (dp - delta_i[..., None])

    def dq_block(args):
        q_i, do_i, qp_i, qs_i, lse_i, delta_i = args

        def step(dq, kv):
            k_j, v_j, kp_j, ks_j = kv
            mask = attention_mask(qp_i, qs_i, kp_j, ks_j, causal)

            def update(dq):
                _, ds = probs_and_dlogits(q_i, do_i, lse_i, delta_i, k_j, v_j, mask)
                return dq + scale * jnp.einsum("bgrqs,bsgk->bqgrk", ds, k_j, preferred_element_type=jnp.float32)

            return jax.lax.cond(jnp.any(mask), update, lambda x: x, dq), None

        dq, _ = jax.lax.scan(step, jnp.zeros(q_i.shape, jnp.float32), (kb, vb, kpb, ksb))
        return dq

    def dkv_block(args):
        k_j, v_j, kp_j, ks_j = args

        def step(carry, qs):
            q_i, do_i, qp_i, qs_i, lse_i, delta_i = qs
            mask = attention_mask(qp_i, qs_i, kp_j, ks_j, causal)

            def update(carry):
                dk, dv = carry
                p, ds = probs_and_dlogits(q_i, do_i, lse_i, delta_i, k_j, v_j, mask)
                dv = dv + jnp.einsum("bgrqs,bqgrk->bsgk", p, do_i, preferred_element_type=jnp.float32)
                dk = dk + scale * jnp.einsum("bgrqs,bqgrk->bsgk", ds, q_i, preferred_element_type=jnp.float32)
                return dk, dv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), (qb, dob, qpb, qsb, lseb, deltab))
        return dk, dv

    dq = _unblocks(jax.lax.map(dq_block, (qb, dob, qpb, qsb, lseb, deltab)))
    dk, dv = jax.lax.map(dkv_block, (kb, vb, kpb, ksb))
    return (
        dq.astype(q.dtype),
        _unblocks(dk).astype(k.dtype),
        _unblocks(dv).astype(v.dtype),
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------
# Attention over a KV cache, reading only its filled part
# ------------------------------------------------------------------------------------------------


def cached_attention(
    q: Float[Array, "B T N K"],
    k: Float[Array, "B L G S K"],
    v: Float[Array, "B L G S K"],
    layer: Int[Array, ""],
    *,
    q_positions: Int[Array, "B T"],
    q_segments: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    kv_segments: Int[Array, "B S"],
    filled: Int[Array, ""],
    block: int,
    scale: float | None = None,
) -> Float[Array, "B T N K"]:
    """Causal attention of the new queries over `layer` of a KV cache laid out as the decoder's
    (`KVCache`: [B, L, G, S, K]) whose slots past `filled` (a traced scalar: the longest row's
    written length) are empty: a loop over key blocks with a dynamic trip count, so only the first
    ceil(filled / block) blocks of that layer are ever read, and nothing is sliced out as a whole.
    When S is not a multiple of the block, the last block starts early (it must fit) and its
    slots that the previous block already covered are masked."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t, n, d = q.shape
    g, s = k.shape[2:4]
    bk = min(block, s)
    qg = q.reshape(b, t, g, n // g, d)

    def body(j, carry):
        start = jnp.minimum(j * bk, s - bk)
        k_j, v_j = (jax.lax.dynamic_slice(x, (0, layer, 0, start, 0), (b, 1, g, bk, d))[:, 0] for x in (k, v))
        k_j, v_j = jnp.swapaxes(k_j, 1, 2), jnp.swapaxes(v_j, 1, 2)  # [B, bk, G, K]
        kp_j, ks_j = (jax.lax.dynamic_slice_in_dim(x, start, bk, axis=1) for x in (kv_positions, kv_segments))
        fresh = start + jnp.arange(bk) >= j * bk
        mask = attention_mask(q_positions, q_segments, kp_j, ks_j, causal=True) & fresh
        return _online_softmax_step(carry, qg, k_j, v_j, mask, scale)

    n_blocks = jnp.minimum((filled + bk - 1) // bk, -(-s // bk))
    m, denom, acc = jax.lax.fori_loop(0, n_blocks, body, _online_softmax_init(b, g, n // g, t, d))
    out, _ = _online_softmax_finish(m, denom, acc)
    return jnp.einsum("bgrtk->btgrk", out).reshape(b, t, n, d).astype(q.dtype)


def paged_attention(
    q: Float[Array, "B T N K"],
    k_pages: Float[Array, "P L G S K"],
    v_pages: Float[Array, "P L G S K"],
    layer: Int[Array, ""],
    page_table: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    q_positions: Int[Array, "B T"],
    pages_per_block: int,
    impl: str = "auto",
    rules: Rules = DEFAULT_RULES,
    scale: float | None = None,
) -> Float[Array, "B T N K"]:
    """Causal attention of the new queries over `layer` of a paged KV cache (`PagedKVCache`:
    pools [P, L, G, S, K] of S-token pages, row b's j-th page `page_table[b, j]`). Row b's slot t
    (page t // S, offset t % S) holds position t; slots at or past `lengths[b]` are empty.

    Implementations: `splash` (and `auto` on TPU), for one new token per row, the Pallas kernel
    of `model.paged_pallas` (ragged: a row reads its own pages only; in a `shard_map` over the
    context mesh, rows over the batch axes and kv heads over `tensor`; off TPU in Pallas'
    interpreter, for tests); otherwise the portable one: a loop over blocks of
    `pages_per_block` table entries with a dynamic trip count (the longest row's pages),
    gathering each block's pages for every row (an entry a row does not hold names the null
    page). M must be a multiple of `pages_per_block`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[1] == 1 and (impl == "splash" or (impl == "auto" and _platform() == "tpu")):
        return _paged_pallas(q, k_pages, v_pages, layer, page_table, lengths, scale, rules)
    b, t, n, d = q.shape
    g, size = k_pages.shape[2], k_pages.shape[3]
    per_block = pages_per_block * size
    qg = q.reshape(b, t, g, n // g, d)

    def body(j, carry):
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * pages_per_block, pages_per_block, axis=1)
        k_j, v_j = (
            jnp.swapaxes(x[pages, layer], 2, 3).reshape(b, per_block, g, d)  # [B, blocks * S, G, K]
            for x in (k_pages, v_pages)
        )
        slots = j * per_block + jnp.arange(per_block)
        mask = (slots[None, None, :] < lengths[:, None, None]) & (slots[None, None, :] <= q_positions[:, :, None])
        return _online_softmax_step(carry, qg, k_j, v_j, mask, scale)

    n_blocks = (jnp.max(lengths) + per_block - 1) // per_block
    m, denom, acc = jax.lax.fori_loop(0, n_blocks, body, _online_softmax_init(b, g, n // g, t, d))
    out, _ = _online_softmax_finish(m, denom, acc)
    return jnp.einsum("bgrtk->btgrk", out).reshape(b, t, n, d).astype(q.dtype)


def _paged_pallas(q, k_pages, v_pages, layer, page_table, lengths, scale, rules):
    from magistral_jax.model.paged_pallas import paged_decode_attention

    def local(q, k_pages, v_pages, layer, page_table, lengths):
        out = paged_decode_attention(
            q[:, 0], k_pages, v_pages, layer, page_table, lengths, scale=scale, interpret=_platform() != "tpu"
        )
        return out[:, None]

    layer = jnp.asarray(layer, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k_pages, v_pages, layer, page_table, lengths)
    sizes_of = dict(mesh.shape)
    batch = logical_to_spec(("batch",), rules, (q.shape[0],), sizes_of)[0]
    heads = logical_to_spec(("act_kv_heads",), rules, (k_pages.shape[2],), sizes_of)[0]
    spec = jax.sharding.PartitionSpec
    pool = spec(None, None, heads, None, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec(batch, None, heads, None), pool, pool, spec(), spec(batch, None), spec(batch)),
        out_specs=spec(batch, None, heads, None),
        check_vma=False,
    )(q, k_pages, v_pages, layer, page_table, lengths)


# ------------------------------------------------------------------------------------------------
# TPU splash attention
# ------------------------------------------------------------------------------------------------


def _splash_attention(q, k, v, segments, causal, scale, block, rules):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, d = q.shape
    g = k.shape[2]
    r = n // g
    # Splash works on whole 128-slot blocks: pad with segment 0 (seen by nobody real).
    blk = min(round_up(block, 128), round_up(t, 128))
    padded = round_up(t, blk)
    shape = (padded, padded)
    mask = sm.MultiHeadMask([sm.CausalMask(shape) if causal else sm.FullMask(shape)] * r)
    sizes = sk.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=_platform() != "tpu")

    def local(q, k, v, segments):
        # One MQA kernel call per (sequence, kv head) on [R, T, K] queries and [T, K] keys.
        lb, lg = q.shape[0], k.shape[2]
        qs = jnp.transpose((q * jnp.asarray(scale, q.dtype)).reshape(lb, padded, lg, r, d), (0, 2, 3, 1, 4))
        ks, vs = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))

        def one(q_h, k_h, v_h, seg):
            return kernel(q_h, k_h, v_h, segment_ids=sk.SegmentIds(q=seg, kv=seg))

        out = jax.vmap(lambda qb, kb, vb, sb: jax.vmap(lambda qh, kh, vh: one(qh, kh, vh, sb))(qb, kb, vb))(
            qs, ks, vs, segments
        )  # [B, G, R, T, K]
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(lb, padded, lg * r, d)
        return jnp.where((segments != 0)[:, :, None, None], out, 0).astype(q.dtype)

    args = (_pad_to(q, 1, blk), _pad_to(k, 1, blk), _pad_to(v, 1, blk), _pad_to(segments, 1, blk))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(*args)[:, :t]
    sizes_of = dict(mesh.shape)
    batch = logical_to_spec(("batch",), rules, (b,), sizes_of)[0]
    heads = logical_to_spec(("act_kv_heads",), rules, (g,), sizes_of)[0]
    qkv = jax.sharding.PartitionSpec(batch, None, heads, None)
    seg = jax.sharding.PartitionSpec(batch, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)(*args)
    return out[:, :t]
