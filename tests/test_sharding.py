"""Logical-axis rules, meshes, and sharded forward/backward equal to the single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import magistral_jax as mj
from magistral_jax.model import decoder
from magistral_jax.model import params as P
from magistral_jax.sharding import DEFAULT_RULES, logical_to_spec, parse_mesh, validate_rules

MESH_SIZES = {"data": 2, "fsdp": 2, "tensor": 4}


def test_rules_map_logical_axes_to_mesh_axes():
    spec = logical_to_spec(("layers", "embed", "q_heads", "head_dim"), DEFAULT_RULES)
    assert spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "act_seq"), DEFAULT_RULES) == PartitionSpec(("data", "fsdp"), None)


def test_indivisible_dimensions_keep_the_longest_dividing_prefix():
    # vocab 101 cannot be split over tensor=4; batch 2 can be split over data=2 but not data*fsdp=4.
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, (101, 64), MESH_SIZES) == PartitionSpec(None, "fsdp")
    assert logical_to_spec(("batch", "act_seq"), DEFAULT_RULES, (2, 7), MESH_SIZES) == PartitionSpec("data", None)
    # Mesh axes of size 1 are dropped.
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    assert logical_to_spec(("batch", "act_seq"), DEFAULT_RULES, (8, 7), sizes) == PartitionSpec("fsdp", None)


def test_a_mesh_axis_used_twice_in_one_array_is_refused():
    rules = (("embed", "tensor"), ("mlp", "tensor"))
    with pytest.raises(ValueError, match="mesh axis 'tensor' would shard both 'embed' and 'mlp'"):
        logical_to_spec(("embed", "mlp"), rules)
    with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
        logical_to_spec(("nope",), DEFAULT_RULES)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        validate_rules((("embed", "model"),))
    with pytest.raises(ValueError, match="appears twice"):
        validate_rules((("embed", "fsdp"), ("embed", None)))


def test_make_mesh():
    mesh = mj.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(mj.make_mesh(tensor=4, fsdp=1).shape) == {"data": 1, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="needs 16 devices, 8 available"):
        mj.make_mesh(data=4, fsdp=4, tensor=1)
    with pytest.raises(ValueError, match="cannot be split"):
        mj.make_mesh(data=3, fsdp=-1)


def test_parse_mesh():
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": -1, "tensor": 4}
    assert parse_mesh("") == {"data": 1, "fsdp": -1, "tensor": 1}
    with pytest.raises(ValueError, match="is not AXIS=SIZE"):
        parse_mesh("model=2")
    with pytest.raises(ValueError, match="'two' is not an integer"):
        parse_mesh("data=two")


def _sharding_config():
    # Shapes that divide every mesh below (kv heads 4 over tensor 4, vocab 128) so that every
    # weight is really split.
    return mj.get_preset("tiny").replace(
        **{
            "text.vocab_size": 128,
            "text.n_heads": 8,
            "text.n_kv_heads": 4,
            "text.head_dim": 16,
            "text.hidden_dim": 128,
            "remat": "full",
        }
    )


@pytest.fixture(scope="module")
def single_device_reference():
    cfg = _sharding_config()
    model = mj.init_model(cfg, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 16))
    mask = np.ones((8, 16), np.int32)
    mask[1, 11:] = 0
    mask[5, :4] = 0
    params = jax.device_get(model.params)
    return cfg, params, tokens, mask, np.asarray(model.logits(tokens, mask=mask))


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 1, 4)])
def test_sharded_logits_equal_single_device(single_device_reference, shape):
    cfg, params, tokens, mask, ref = single_device_reference
    data, fsdp, tensor = shape
    mesh = mj.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    specs = decoder.param_specs(cfg.text)

    placed = jax.device_put(params, P.shardings(specs, mesh, cfg.rules))
    model = mj.Model(cfg, placed, mesh)
    got = model.logits(tokens, mask=mask)
    assert len(got.sharding.device_set) == data * fsdp * tensor
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_random_init_lands_in_its_shardings():
    cfg = _sharding_config()
    mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)
    model = mj.init_model(cfg, 0, mesh=mesh)
    w1 = model.params["layers"]["w1"]  # [L, D, F] = [2, 64, 128]: embed over fsdp, mlp over tensor
    assert w1.addressable_shards[0].data.shape == (2, 32, 64)
    # The same seed gives the same values whatever the mesh.
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(mj.init_model(cfg, 0).params["layers"]["w1"]))


def test_sharded_gradients_equal_single_device(single_device_reference):
    cfg, params, tokens, mask, _ = single_device_reference
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

    def loss(params, tokens, mask):
        logits, _ = decoder.forward(params, tokens, cfg, segment_ids=mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    grad_fn = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = grad_fn(params, tokens, mask)
    mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)

    placed = jax.device_put(params, P.shardings(decoder.param_specs(cfg.text), mesh, cfg.rules))
    model = mj.Model(cfg, placed, mesh)
    with model.mesh_context():
        got_loss, got_grads = grad_fn(
            placed, model.place_batch(np.asarray(tokens)), model.place_batch(np.asarray(mask))
        )
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_weights_a_mesh_axis_does_not_divide_are_named_once_with_their_cost(tmp_path):
    import warnings

    from magistral_jax.checkpoint.convert import save_model
    from magistral_jax.sharding import make_mesh

    # 6 query heads and 2 kv heads on tensor=4: wq and wo ([2, 64, 6, 32], 96 KiB in float32) keep
    # fsdp's 2 shards of the 8 their rules ask (48 KiB a device instead of 12: +36 KiB each), wk
    # and wv ([2, 64, 2, 32], 32 KiB) the same (16 KiB instead of 4: +12 KiB each).
    cfg = mj.get_preset("tiny").replace(dtype="float32", param_dtype="float32", **{"text.n_heads": 6})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        model = mj.init_model(cfg, 0, mesh=make_mesh(fsdp=2, tensor=4))
        mj.init_model(cfg, 1, mesh=make_mesh(fsdp=2, tensor=4))  # the same message: not repeated
        mj.init_model(cfg, 0, mesh=make_mesh(fsdp=4, tensor=2))  # 2 divides every dimension
    messages = [str(w.message) for w in caught if "replicated" in str(w.message)]
    assert len(messages) == 1, messages
    (message,) = messages
    assert "mesh data=1 fsdp=2 tensor=4: 4 weights" in message and "96.0 KiB more per device (float32)" in message
    for name, extra in (("wq", "36.0"), ("wk", "12.0"), ("wv", "12.0"), ("wo", "36.0")):
        assert f"layers.{name} (2 of 8 shards, +{extra} KiB)" in message
    # Loading a checkpoint onto such a mesh says the same.
    save_model(model, tmp_path / "ckpt", to="hf")
    with pytest.warns(UserWarning, match=r"4 weights .* 96.0 KiB more per device"):
        mj.load_model(tmp_path / "ckpt", mesh=make_mesh(fsdp=2, tensor=4), dtype="float32")
