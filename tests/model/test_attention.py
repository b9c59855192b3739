"""Every attention implementation against a loop-form oracle, with GQA, packing and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magistral_jax.model.attention import attention

IMPLS = ["xla", "cudnn", "chunked"]


def _oracle(q, k, v, qp, qs, kp, ks, causal):
    """Loop form of masked softmax attention in float64; rows that see nothing are zero."""
    b, t, n, d = q.shape
    g = k.shape[2]
    out = np.zeros((b, t, n, d))
    for bi in range(b):
        for ti in range(t):
            visible = (ks[bi] == qs[bi, ti]) & (ks[bi] != 0)
            if causal:
                visible &= kp[bi] <= qp[bi, ti]
            if not visible.any():
                continue
            for ni in range(n):
                gi = ni // (n // g)
                logits = k[bi, :, gi] @ q[bi, ti, ni] / np.sqrt(d)
                logits = np.where(visible, logits, -np.inf)
                p = np.exp(logits - logits.max())
                out[bi, ti, ni] = (p / p.sum()) @ v[bi, :, gi]
    return out


def _case(rng, b=2, t=23, s=None, n=4, g=2, d=8):
    s = t if s is None else s
    q = rng.normal(size=(b, t, n, d))
    k = rng.normal(size=(b, s, g, d))
    v = rng.normal(size=(b, s, g, d))
    seg = np.ones((b, s), np.int32)
    seg[0, 13:] = 2  # a second packed document
    seg[1, s - 5 :] = 0  # right padding
    pos = np.zeros((b, s), np.int32)
    for bi in range(b):
        for i in range(1, s):
            pos[bi, i] = 0 if seg[bi, i] != seg[bi, i - 1] else pos[bi, i - 1] + 1
    return q, k, v, pos, seg


def _run(impl, q, k, v, qp, qs, kp, ks, causal=True, dtype=jnp.float32):
    return attention(
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        q_positions=jnp.asarray(qp),
        q_segments=jnp.asarray(qs),
        kv_positions=jnp.asarray(kp),
        kv_segments=jnp.asarray(ks),
        causal=causal,
        impl=impl,
        block=8,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_oracle_with_gqa_packing_and_padding(impl, causal):
    q, k, v, pos, seg = _case(np.random.default_rng(0))
    got = _run(impl, q, k, v, pos, seg, pos, seg, causal)
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, pos, seg, pos, seg, causal), atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_queries_against_a_longer_cache(impl):
    """Decode-like: 3 new queries at positions 20..22 over 29 cache slots, some empty."""
    rng = np.random.default_rng(1)
    q, k, v, _, _ = _case(rng, t=3, s=29)
    kp = np.tile(np.arange(29), (2, 1))
    ks = np.ones((2, 29), np.int32)
    ks[:, 23:] = 0  # empty slots
    kp[:, 23:] = -1
    qp = np.tile(np.arange(20, 23), (2, 1))
    qs = np.ones((2, 3), np.int32)
    got = _run(impl, q, k, v, qp, qs, kp, ks)
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, qp, qs, kp, ks, True), atol=2e-5)


def _reference_loss(q, k, v, pos, seg):
    """An independent dense formulation (repeat kv heads, additive mask) for gradients."""
    n, g = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, n // g, axis=2), jnp.repeat(v, n // g, axis=2)
    visible = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (pos[:, None, :] <= pos[:, :, None])
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / jnp.sqrt(q.shape[-1])
    logits = jnp.where(visible[:, None], logits, -1e30)
    out = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)
    out = out * (seg != 0)[:, :, None, None]
    return jnp.sum(jnp.sin(out))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_a_dense_reference(impl):
    q, k, v, pos, seg = (jnp.asarray(a) for a in _case(np.random.default_rng(2)))
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))

    def loss(q, k, v):
        out = attention(q, k, v, q_positions=pos, q_segments=seg, kv_positions=pos, kv_segments=seg, impl=impl, block=8)
        return jnp.sum(jnp.sin(out))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_reference_loss, argnums=(0, 1, 2))(q, k, v, pos, seg)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_give_bf16_outputs_close_to_fp32(impl):
    q, k, v, pos, seg = _case(np.random.default_rng(3))
    got = _run(impl, q, k, v, pos, seg, pos, seg, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), _oracle(q, k, v, pos, seg, pos, seg, True), atol=5e-2)


def test_unknown_implementation_is_refused():
    q, k, v, pos, seg = _case(np.random.default_rng(4))
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        _run("flash", q, k, v, pos, seg, pos, seg)
