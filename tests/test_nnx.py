"""The Flax NNX bridge: the Params carry the model's shardings, and an `nnx.Optimizer` AdamW step on
the bridged module equals this project's trainer on the same SFT batch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import magistral_jax as mj
from magistral_jax.model import param_specs
from magistral_jax.model import params as P
from magistral_jax.nnx import MagistralNNX
from magistral_jax.train.packing import Item, pack
from magistral_jax.train.step import Objective, OptimizerConfig, Trainer, make_optimizer

CFG = mj.get_preset("tiny").replace(
    **{
        "text.vocab_size": 128,
        "text.dim": 32,
        "text.hidden_dim": 64,
        "param_dtype": "float32",
        "dtype": "float32",
        "remat": "none",
    }
)


def _params(seed: int, shardings=None):
    """Random parameters made on the host (a jitted random init costs seconds of compilation)."""
    rng = np.random.default_rng(seed)

    def make(spec):
        noise = rng.normal(0.0, 0.2, spec.shape).astype(np.float32)
        return noise + 1.0 if "norm" in spec.axes else noise

    params = jax.tree.map(make, param_specs(CFG), is_leaf=P.is_spec)
    return jax.device_put(params, shardings)


def test_the_params_carry_the_models_shardings():
    mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)
    model = mj.Model(CFG, _params(7, P.shardings(param_specs(CFG), mesh, CFG.rules)), mesh)
    module = MagistralNNX.from_model(model)
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree.leaves(model.params)
    assert len(flat_specs) == len(flat_params)
    for spec, array in zip(flat_specs, flat_params, strict=True):
        assert jax.sharding.NamedSharding(model.mesh, spec).is_equivalent_to(array.sharding, array.ndim)
    wq = module.params["layers"]["wq"]
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "q_heads", "head_dim")
    assert tuple(wq[...].sharding.spec)[1:3] == ("fsdp", "tensor")  # sharded: the comparison above is not vacuous
    assert module.to_model().params["layers"]["wq"] is model.params["layers"]["wq"]  # shared, not copied


def _sft_batch():
    rng = np.random.default_rng(11)
    examples = [(rng.integers(3, 128, 5).tolist(), rng.integers(3, 128, n).tolist()) for n in (4, 6, 3, 2)]
    total = sum(len(a) for _, a in examples)
    items = [Item(tokens=p + a, loss_start=len(p), weight=1.0 / total) for p, a in examples]
    return pack(items, row_len=16, rows=4).microbatches


def test_an_nnx_adamw_step_equals_the_trainers_step():
    before = jax.device_get(_params(7))
    model = mj.Model(CFG, jax.device_put(before))
    # eps well above float32 rounding of the gradients: Adam's first step is lr * g / (|g| + eps),
    # which for eps ~ 0 turns the rounding noise of near-zero gradients into steps of lr.
    opt = OptimizerConfig(lr=1e-3, weight_decay=0.1, grad_clip=1e9, eps=1e-6)
    microbatches = _sft_batch()
    metrics = Trainer(model, opt, Objective(kind="sft"), total_steps=1, chunk=8).train_step(microbatches)

    module = MagistralNNX(CFG, jax.device_put(before))
    optimizer = nnx.Optimizer(module, make_optimizer(opt, 1)[0], wrt=nnx.Param)
    (mb,) = microbatches
    arrays = {k: jnp.asarray(getattr(mb, k)) for k in ("tokens", "targets", "segment_ids", "positions", "weights")}

    def loss(m):  # the SFT loss from its definition: the weighted negative log-likelihood of the targets
        logits = m(arrays["tokens"], positions=arrays["positions"], segment_ids=arrays["segment_ids"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), arrays["targets"][..., None], -1)[..., 0]
        return -jnp.sum(logp * arrays["weights"])

    @nnx.jit
    def step(m, o):
        value, grads = nnx.value_and_grad(loss)(m)
        o.update(m, grads)
        return value

    np.testing.assert_allclose(step(module, optimizer), metrics["loss"], rtol=1e-5)
    moved = 0.0
    for a, b, start in zip(
        jax.tree.leaves(module.param_tree()), jax.tree.leaves(model.params), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(start)).max()))
    assert moved > 5e-4  # Adam's first step moves elements by up to lr: the step did happen
