"""The decoder: parameter declarations of the 24B presets, the KV cache, remat and attention options."""

import collections
import contextlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.model import decoder
from magistral_jax.model import params as P


def test_magistral_2509_text_parameter_count_from_eval_shape():
    cfg = mj.get_preset("magistral-small-2509")
    specs = decoder.param_specs(cfg.text)
    shapes = jax.eval_shape(lambda key: P.init(specs, key, cfg.param_dtype), jax.random.key(0))
    leaves = jax.tree.leaves(shapes)
    assert sum(math.prod(x.shape) for x in leaves) == 23_572_403_200
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    # Closed forms of the reference (architecture-and-checkpoints.md, section 6).
    assert math.prod(shapes["embed"].shape) == 671_088_640
    assert math.prod(shapes["lm_head"].shape) == 671_088_640
    per_layer = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["layers"])) // 40
    assert per_layer == 555_755_520
    assert P.count(specs) == 23_572_403_200


def test_24b_shardings_on_a_fsdp_tensor_mesh():
    """Per-device shard shapes of the 24B weights on (fsdp=2, tensor=4), derived from the rules."""
    cfg = mj.get_preset("magistral-small-2509")
    mesh = mj.make_mesh(data=1, fsdp=2, tensor=4)
    abstract = P.abstract(decoder.param_specs(cfg.text), cfg.param_dtype, mesh, cfg.rules)

    def shard(x):
        return x.sharding.shard_shape(x.shape)

    assert shard(abstract["layers"]["wq"]) == (40, 2560, 8, 128)
    assert shard(abstract["layers"]["wk"]) == (40, 2560, 2, 128)
    assert shard(abstract["layers"]["wo"]) == (40, 8, 128, 2560)
    assert shard(abstract["layers"]["w1"]) == (40, 2560, 8192)
    assert shard(abstract["layers"]["w2"]) == (40, 8192, 2560)
    assert shard(abstract["embed"]) == (32768, 2560)
    assert shard(abstract["lm_head"]) == (2560, 32768)
    assert shard(abstract["layers"]["attention_norm"]) == (40, 5120)


def _tiny(**changes):
    return mj.get_preset("tiny").replace(**changes)


def test_prefill_and_decode_with_cache_equal_the_full_forward():
    """Ragged right-padded prompts prefilled into a cache, then 4 single-token steps: every step's
    logits equal those of one cache-free forward over the whole sequence."""
    cfg = _tiny()
    model = mj.init_model(cfg, 0)
    rng = np.random.default_rng(0)
    lengths = np.array([5, 9, 1])
    full = rng.integers(0, cfg.text.vocab_size, (3, 13))
    prompts = np.zeros((3, 9), np.int32)
    segments = np.zeros((3, 9), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = full[i, :n]
        segments[i, :n] = 1

    forward = jax.jit(decoder.forward, static_argnames="cfg")
    cache = decoder.KVCache.init(cfg, 3, 16)
    logits, cache = forward(model.params, jnp.asarray(prompts), cfg, segment_ids=jnp.asarray(segments), cache=cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    step_logits = [np.asarray(logits)[np.arange(3), lengths - 1]]
    for j in range(4):
        token = full[np.arange(3), lengths + j][:, None]
        logits, cache = forward(model.params, jnp.asarray(token, jnp.int32), cfg, cache=cache)
        step_logits.append(np.asarray(logits)[:, 0])

    # The oracle: each row's own unpadded sequence through the cache-free forward.
    for i, n in enumerate(lengths):
        seq = full[i, : n + 4][None]
        ref = np.asarray(model.logits(seq))[0, n - 1 :]
        got = np.stack([s[i] for s in step_logits])
        np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 4)


def test_attention_implementations_agree_in_the_decoder():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (2, 40))
    base = mj.init_model(_tiny(attention="xla"), 1)
    ref = np.asarray(base.logits(tokens))
    for impl in ("cudnn", "chunked", "splash", "auto"):
        model = mj.Model(_tiny(attention=impl, attention_block=16), base.params)
        np.testing.assert_allclose(np.asarray(model.logits(tokens)), ref, atol=2e-5, err_msg=impl)


def _loss_and_grads(cfg, params, tokens):
    def loss(params):
        logits, _ = decoder.forward(params, tokens, cfg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def no_remat_reference():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)), jnp.int32)
    params = mj.init_model(_tiny(), 2).params
    return tokens, params, _loss_and_grads(_tiny(remat="none"), params, tokens)


@pytest.mark.parametrize("policy", ["full", "save_matmuls", "save_qkv"])
def test_remat_policies_keep_loss_and_gradients(policy, no_remat_reference):
    tokens, params, (ref_loss, ref_grads) = no_remat_reference
    cfg = _tiny(remat=policy)
    loss, grads = _loss_and_grads(cfg, params, tokens)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The policy is really applied: the backward pass recomputes inside a remat region.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: decoder.forward(p, tokens, cfg)[0].sum()))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


# Every dimension distinct, so each saved residual's shape says what it is.
L, B, T, D, N, G, K, F = 2, 3, 5, 24, 4, 2, 12, 40
SAVED = {
    "full": [(L, B, T, D)],  # each layer's input, nothing else
    "save_qkv": [(L, B, T, D), (L, B, T, N, K), (L, B, T, G, K), (L, B, T, G, K)],
    # q, k, v, the attention output projection, the FFN gate and up projections (the down
    # projection's output feeds only a sum: the backward pass never needs it)
    "save_matmuls": [
        (L, B, T, D),
        (L, B, T, N, K),
        (L, B, T, G, K),
        (L, B, T, G, K),
        (L, B, T, D),
        (L, B, T, F),
        (L, B, T, F),
    ],
}


def _saved_by_the_layer_scan(policy):
    """Shapes of the per-layer residuals that the backward pass of the forward keeps (the layer
    scan's stacked outputs), as `jax.ad_checkpoint.print_saved_residuals` reports them."""
    cfg = _tiny(
        remat=policy,
        **{"text.n_layers": L, "text.dim": D, "text.n_heads": N, "text.n_kv_heads": G, "text.head_dim": K},
        **{"text.hidden_dim": F},
    )
    params = jax.eval_shape(lambda: mj.init_model(cfg, 0).params)
    tokens = jnp.zeros((B, T), jnp.int32)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        jax.ad_checkpoint.print_saved_residuals(lambda p: decoder.forward(p, tokens, cfg)[0], params)
    shapes = []
    for line in report.getvalue().splitlines():
        dims = tuple(int(d) for d in line[line.index("[") + 1 : line.index("]")].split(",") if d)
        if "output of scan" in line and dims[:2] == (L, B):
            shapes.append(dims)
    return collections.Counter(shapes)


@pytest.mark.parametrize("policy", ["full", "save_qkv", "save_matmuls"])
def test_each_remat_policy_saves_exactly_its_named_residuals(policy):
    assert _saved_by_the_layer_scan(policy) == collections.Counter(SAVED[policy])


def test_no_remat_saves_more_than_every_policy():
    saved = _saved_by_the_layer_scan("none")
    assert saved > collections.Counter(SAVED["save_matmuls"])
    assert (L, B, G, N // G, T, T) in saved  # the attention probabilities, at least


def test_fp32_master_weights_compute_exactly_as_their_bf16_rounding():
    """Parameters stored in fp32, computed in bf16: every matmul sees the bf16-rounded weights, so
    the logits equal, bit for bit, those of the same weights stored in bf16; and they differ from
    fp32 compute by bf16-sized errors (neither 0 nor large)."""
    cfg = _tiny(param_dtype="float32", dtype="bfloat16")
    master = mj.init_model(cfg, 5).params
    tokens = np.random.default_rng(5).integers(0, 256, (2, 12))
    got = np.asarray(mj.Model(cfg, master).logits(tokens))
    rounded = jax.tree.map(lambda w: w.astype(jnp.bfloat16), master)
    stored_bf16 = np.asarray(mj.Model(cfg.replace(param_dtype="bfloat16"), rounded).logits(tokens))
    np.testing.assert_array_equal(got, stored_bf16)
    fp32 = np.asarray(mj.Model(cfg.replace(dtype="float32"), master).logits(tokens))
    relative = np.abs(got - fp32).mean() / np.abs(fp32).mean()
    assert 2**-12 < relative < 2**-4, relative


def test_bf16_compute_with_fp32_master_weights():
    cfg = _tiny(param_dtype="float32", dtype="bfloat16")
    model = mj.init_model(cfg, 3)
    assert model.params["layers"]["w1"].dtype == jnp.float32
    tokens = np.random.default_rng(3).integers(0, 256, (2, 10))
    logits = model.logits(tokens)
    assert logits.dtype == jnp.float32
    ref = np.asarray(mj.Model(cfg.replace(dtype="float32"), model.params).logits(tokens))
    assert np.abs(np.asarray(logits) - ref).max() <= 0.05 * np.abs(ref).max()


def test_logits_rejects_bad_tokens():
    model = mj.init_model(_tiny(), 4)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 256\)"):
        model.logits(np.array([[1, 256]]))
    with pytest.raises(ValueError, match=r"integer array \[batch, seq\]"):
        model.logits(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="segment_ids: shape"):
        model.logits(np.array([[1, 2]]), segment_ids=np.array([[1, 1, 1]]))
