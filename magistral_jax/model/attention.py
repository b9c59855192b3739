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
- `auto`: `cudnn` on GPU for 16-bit inputs, otherwise `chunked` when T * S exceeds
  `CHUNKED_THRESHOLD`, otherwise `xla`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

CHUNKED_THRESHOLD = 4096 * 4096


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
) -> Float[Array, "B T N K"]:
    """Scaled dot-product attention; returns q's dtype. See the module docstring for the mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t, s = q.shape[1], k.shape[1]
    if impl == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            impl = "cudnn"
        elif t * s > CHUNKED_THRESHOLD:
            impl = "chunked"
        else:
            impl = "xla"
    if impl == "chunked":
        return _chunked_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, causal, scale, block)
    mask = attention_mask(q_positions, q_segments, kv_positions, kv_segments, causal)
    if impl == "xla":
        return _xla_attention(q, k, v, mask, scale)
    if impl == "cudnn":
        use_cudnn = jax.default_backend() == "gpu"
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn" if use_cudnn else None
        )
        return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)
    raise ValueError(f"attention: unknown implementation {impl!r}; expected auto, xla, cudnn or chunked")


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
                m, denom, acc = carry
                logits = _block_logits(q_i, k_j, mask, scale)
                m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(logits - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                denom = denom * alpha + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bgrqs,bsgk->bgrqk", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, denom, acc * alpha[..., None] + pv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        init = (
            jnp.full((b, g, r, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, g, r, bq), jnp.float32),
            jnp.zeros((b, g, r, bq, d), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, kpb, ksb))
        safe = jnp.where(denom > 0, denom, 1.0)
        out = acc / safe[..., None]
        lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
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
