"""The model as a Flax NNX Module, for NNX code and NNX-based libraries.

`MagistralNNX` holds this project's parameter tree as `nnx.Param`s (the same arrays, on the same
devices and shardings; nothing is copied) and calls the same pure forward
(`model/decoder.py::forward`), so its logits are this project's logits and its gradients are the
trainer's. Each Param carries its sharding as NNX expects it: `out_sharding` is the array's mesh
PartitionSpec (so `nnx.get_partition_spec` and `nnx.get_named_sharding` return this project's
shardings) and `logical_axes` the declared logical axes (`model/decoder.py::param_specs`).

    import magistral_jax as mj
    from flax import nnx
    from magistral_jax.nnx import MagistralNNX

    module = MagistralNNX.from_model(mj.load_model("m2509-orbax/", mesh=mesh))   # any checkpoint load_model reads
    optimizer = nnx.Optimizer(module, optax.adamw(1e-5), wrt=nnx.Param)
    grads = nnx.grad(lambda m: loss(m(tokens)))(module)
    optimizer.update(module, grads)
    module.to_model()  # back to a `Model`: save_model, the sampler, the trainer

The module is one node over the scanned layer stack, not a module per layer: code that rewrites an
NNX model layer by layer (LoRA or quantisation that replaces `nnx.Linear` modules) does not see
per-layer linears here.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jaxtyping import Array, Float, Int

from magistral_jax.api import Model
from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder, param_specs, vision
from magistral_jax.model import params as P


def _is_param(x: Any) -> bool:
    return isinstance(x, nnx.Param)


def _partition(array: jax.Array) -> tuple[Any, ...]:
    spec = getattr(array.sharding, "spec", None)
    spec = tuple(spec) if spec is not None else ()
    return spec + (None,) * (array.ndim - len(spec))


class MagistralNNX(nnx.Module):
    """A Magistral / Mistral Small model as an NNX Module (see the module docstring).

    Attributes:
      cfg: the model config (static).
      mesh: the mesh the parameters live on, or None.
      params: the parameter tree, each leaf an `nnx.Param`.
    """

    def __init__(self, cfg: ModelConfig, params: P.ParamTree, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh
        specs = param_specs(cfg)

        def wrap(spec: P.ParamSpec, array: jax.Array) -> nnx.Param:
            return nnx.Param(
                array, out_sharding=_partition(array), logical_axes=spec.axes, mesh=mesh, eager_sharding=False
            )

        self.params = nnx.data(jax.tree.map(wrap, specs, params, is_leaf=P.is_spec))

    @classmethod
    def from_model(cls, model: Model) -> MagistralNNX:
        """The module over `model`'s parameters (shared, not copied)."""
        return cls(model.cfg, model.params, model.mesh)

    def param_tree(self) -> P.ParamTree:
        """The parameters as this project's plain tree of arrays."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_param)

    def to_model(self) -> Model:
        """A `Model` over the module's current parameters."""
        return Model(self.cfg, self.param_tree(), self.mesh)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        images: vision.VisionInputs | None = None,
    ) -> Float[Array, "B T V"]:
        """float32 logits of every token (the arguments as `decoder.forward`'s; `images` as
        `api.image_inputs` prepares them)."""
        params = self.param_tree()
        x = None if images is None else vision.embed_with_images(params, tokens, images, self.cfg)
        return decoder.forward(params, tokens, self.cfg, positions=positions, segment_ids=segment_ids, embeddings=x)[0]
