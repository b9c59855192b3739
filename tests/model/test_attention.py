"""Every attention implementation against a loop-form oracle, with GQA, packing and padding."""

import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from magistral_jax import make_mesh
from magistral_jax.model import attention as attention_module
from magistral_jax.model.attention import attention, cached_attention, paged_attention

# splash runs in Pallas' interpreter here (the TPU kernel's own code, slowly)
IMPLS = ["xla", "cudnn", "chunked", "splash"]


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
    # Self-attention passes the same position and segment arrays for queries and keys.
    qp_, qs_ = jnp.asarray(qp), jnp.asarray(qs)
    return attention(
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        q_positions=qp_,
        q_segments=qs_,
        kv_positions=qp_ if kp is qp else jnp.asarray(kp),
        kv_segments=qs_ if ks is qs else jnp.asarray(ks),
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


@pytest.mark.parametrize("impl", ["xla", "cudnn", "chunked"])
def test_bf16_inputs_get_a_float32_softmax(impl):
    """Sharp attention (logits spanning tens) on bf16 inputs against the float64 oracle on the same
    bf16 values: with logits and softmax in float32, the only errors left are the bf16 rounding of
    the probabilities before they weight v (at most 2^-9 max|v|) and of the output (half an ulp,
    2^-9 |out|), so every element is within 2^-8 |out| + 2^-8 max|v|. A softmax in bf16 misses that
    bound several times over. (`splash` scales q in bf16 before its kernel, a rounding of the logits
    of its own, so it is left to the parity tests.)"""
    q, k, v, pos, seg = _case(np.random.default_rng(6), t=40, d=32)
    q, k, v = (a.astype(ml_dtypes.bfloat16).astype(np.float64) for a in (8 * q, k, v))
    want = _oracle(q, k, v, pos, seg, pos, seg, True)
    got = np.asarray(_run(impl, q, k, v, pos, seg, pos, seg, dtype=jnp.bfloat16), np.float64)
    bound = 2.0**-8 * (np.abs(want) + np.abs(v).max())
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def test_unknown_implementation_is_refused():
    q, k, v, pos, seg = _case(np.random.default_rng(4))
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        _run("flash", q, k, v, pos, seg, pos, seg)


def test_splash_inside_a_shard_map_over_the_mesh():
    q, k, v, pos, seg = (jnp.asarray(a) for a in _case(np.random.default_rng(5), b=4, n=8, g=4))
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    def f(q, k, v):
        return attention(q, k, v, q_positions=pos, q_segments=seg, kv_positions=pos, kv_segments=seg, impl="splash")

    with jax.set_mesh(mesh):
        lowered = jax.jit(f).lower(q, k, v)
        got = jax.jit(f)(q, k, v)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    want = _oracle(*(np.asarray(a, np.float64) for a in (q, k, v)), pos, seg, pos, seg, True)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _filled_cache(rng, t: int, lengths):
    """A 40-slot cache whose rows are filled to `lengths`, the last `t` filled slots as queries:
    (q, k, v, q_positions, q_segments, kv_positions, kv_segments) and the loop-form oracle."""
    q, k, v, _, _ = _case(rng, t=t, s=40)
    kp = np.where(np.arange(40)[None] < lengths[:, None], np.arange(40)[None], -1)
    ks = (kp >= 0).astype(np.int32)
    qp = lengths[:, None] - t + np.arange(t)[None]
    qs = np.ones((len(lengths), t), np.int32)
    return (q, k, v, qp, qs, kp, ks), _oracle(q, k, v, qp, qs, kp, ks, True)


def _cached(q, k_layers, v_layers, layer, qp, qs, kp, ks, block):
    """`cached_attention` over `layer` of the caches made of the [B, S, G, K] arrays `*_layers`
    (one per layer, stacked as the decoder's cache [B, L, G, S, K])."""
    stack = lambda layers: jnp.asarray(np.stack([np.swapaxes(a, 1, 2) for a in layers], axis=1))  # noqa: E731
    out = cached_attention(
        jnp.asarray(q, jnp.float32),
        stack(k_layers).astype(jnp.float32),
        stack(v_layers).astype(jnp.float32),
        jnp.int32(layer),
        q_positions=jnp.asarray(qp),
        q_segments=jnp.asarray(qs),
        kv_positions=jnp.asarray(kp),
        kv_segments=jnp.asarray(ks),
        filled=jnp.asarray(kp.max() + 1),
        block=block,
    )
    return np.asarray(out)


@pytest.mark.parametrize("longest", [17, 23])
def test_cached_attention_reads_only_the_filled_blocks(longest):
    """Rows filled to 13 and `longest` of 40 slots, blocks of 8: ceil(17 / 8) = ceil(23 / 8) = 3
    blocks (slots 0-23) are read. NaNs from slot 24 on never reach the output, as they would if
    a fourth block were read (0 x NaN); at 17 the third block holds one filled slot, which a
    loop one block short would miss."""
    (q, k, v, qp, qs, kp, ks), want = _filled_cache(np.random.default_rng(6), 2, np.array([13, longest]))
    k[:, 24:], v[:, 24:] = np.nan, np.nan
    np.testing.assert_allclose(_cached(q, [k], [v], 0, qp, qs, kp, ks, block=8), want, atol=2e-5)
    # The plain implementation reads every slot: the NaNs poison it.
    assert np.isnan(np.asarray(_run("xla", q, k, v, qp, qs, kp, ks))).any()


def test_cached_attention_reads_its_layer_of_the_stacked_cache_with_a_ragged_last_block():
    """Blocks of 16 over 40 slots: the third block starts at slot 24 so that it fits, and slots
    24-31, already read by the second, must count once. The other layers (NaN) are never read."""
    (q, k, v, qp, qs, kp, ks), want = _filled_cache(np.random.default_rng(7), 1, np.array([13, 37]))
    nan = np.full_like(k, np.nan)
    got = _cached(q, [nan, k, nan], [nan, v, nan], 1, qp, qs, kp, ks, block=16)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize(
    ("platform", "dtype", "t", "s", "self_attention", "chosen"),
    [
        # The module's rule: splash on TPU (self-attention only), cudnn on GPU for 16-bit inputs,
        # else chunked when T * S exceeds 4096 * 4096, else xla.
        ("tpu", jnp.float32, 8, 8, True, "splash"),
        ("tpu", jnp.bfloat16, 8, 8, False, "xla"),  # a cache: not self-attention
        ("tpu", jnp.float32, 8, 8, "positions", "xla"),  # the same positions, other segments
        ("tpu", jnp.float32, 8, 8, "segments", "xla"),
        ("gpu", jnp.bfloat16, 8, 8, True, "cudnn"),
        ("gpu", jnp.float16, 8, 8, False, "cudnn"),
        ("gpu", jnp.float32, 8, 8, True, "xla"),
        ("cpu", jnp.bfloat16, 8, 8, True, "xla"),
        ("cpu", jnp.float32, 4096, 4096, False, "xla"),  # T * S at the threshold
        ("cpu", jnp.float32, 4097, 4096, False, "chunked"),  # one query row past it
        ("tpu", jnp.float32, 4097, 4096, False, "chunked"),
    ],
)
def test_auto_picks_the_implementation_of_the_platform(monkeypatch, platform, dtype, t, s, self_attention, chosen):
    """`impl="auto"` traced (never run) with each implementation replaced by a recorder."""
    picked = []

    def recorder(name):
        return lambda q, *args, **kw: picked.append(name) or jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(attention_module, "_platform", lambda: platform)
    for name in ("splash", "chunked", "xla"):
        monkeypatch.setattr(attention_module, f"_{name}_attention", recorder(name))
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder("cudnn"))

    def f(q, k, qp, kp):
        # Self-attention passes the queries' own position and segment arrays for the keys.
        kv_positions = qp if self_attention in (True, "positions") else kp
        kv_segments = qp if self_attention in (True, "segments") else kp + 0
        return attention(q, k, k, q_positions=qp, q_segments=qp, kv_positions=kv_positions, kv_segments=kv_segments)

    shape = lambda n, dt: jax.ShapeDtypeStruct((1, n, 2, 4), dt)  # noqa: E731
    jax.eval_shape(f, shape(t, dtype), shape(s, dtype), *(jax.ShapeDtypeStruct((1, n), jnp.int32) for n in (t, s)))
    assert picked == [chosen]


@pytest.mark.parametrize(
    ("platform", "impl", "t", "kernel"),
    [("tpu", "auto", 1, True), ("cpu", "auto", 1, False), ("cpu", "splash", 1, True), ("tpu", "auto", 2, False)],
)
def test_paged_attention_takes_the_kernel_for_one_new_token_on_tpu_or_when_asked(
    monkeypatch, platform, impl, t, kernel
):
    monkeypatch.setattr(attention_module, "_platform", lambda: platform)
    called = []
    monkeypatch.setattr(attention_module, "_paged_pallas", lambda q, *a: called.append(1) or jnp.zeros_like(q))
    pages = jax.ShapeDtypeStruct((4, 1, 1, 2, 8), jnp.float32)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    jax.eval_shape(
        lambda q, kp, vp, layer, table, lengths, qp: paged_attention(
            q, kp, vp, layer, table, lengths, q_positions=qp, pages_per_block=1, impl=impl
        ),
        jax.ShapeDtypeStruct((2, t, 2, 8), jnp.float32),
        pages,
        pages,
        ints(),
        ints(2, 2),
        ints(2),
        ints(2, t),
    )
    assert called == ([1] if kernel else [])


def test_the_platform_is_the_context_meshs_else_the_default_backends(monkeypatch):
    """A TPU topology's mesh compiled ahead of time from this CPU host traces for `tpu` (a stand-in
    mesh here: `tests/test_plan.py` compiles for real topologies); no mesh, the default backend."""
    assert attention_module._platform() == jax.default_backend() == "cpu"
    tpu_mesh = types.SimpleNamespace(empty=False, abstract_device=types.SimpleNamespace(platform="tpu"))
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: tpu_mesh)
    assert attention_module._platform() == "tpu"
