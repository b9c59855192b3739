"""Parameter declarations and what derives from them.

Each weight is declared once as a `ParamSpec` (shape, logical axes, initializer) in a nested-dict
tree. Abstract shapes (for `jax.eval_shape` and AOT compilation), shardings, sharded random
initialisation and checkpoint name maps all derive from that one tree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from magistral_jax.sharding import Rules, logical_sharding, logical_to_spec

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
ParamTree = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, one logical axis name per dimension, and its initializer."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Initializer

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec: shape {self.shape} and axes {self.axes} differ in rank")


def normal(stddev: float) -> Initializer:
    """Normal initializer with a fixed standard deviation."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def fan_in(*dims: int) -> Initializer:
    """Normal initializer with stddev 1/sqrt(prod(dims)) (dims = the contracted input dims)."""
    return normal(1.0 / math.sqrt(math.prod(dims)))


def ones(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _map(fn: Callable[[ParamSpec], Any], specs: ParamTree) -> ParamTree:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def _shards(spec, mesh_shape: dict[str, int]) -> int:
    axes = [a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part)]
    return math.prod(mesh_shape[a] for a in axes)


def undivided(specs: ParamTree, mesh: Mesh, rules: Rules) -> list[tuple[str, int, int]]:
    """The weights that a mesh axis their rules name does not divide (6 query heads on `tensor=4`),
    which are therefore replicated over that axis: (dotted name, shards wanted, shards kept)."""
    mesh_shape = dict(mesh.shape)
    out = []
    for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        wanted = _shards(logical_to_spec(s.axes, rules, None, mesh_shape), mesh_shape)
        kept = _shards(logical_to_spec(s.axes, rules, s.shape, mesh_shape), mesh_shape)
        if kept < wanted:
            out.append((".".join(str(k.key) for k in path), wanted, kept))
    return out


def warn_undivided(specs: ParamTree, mesh: Mesh | None, rules: Rules, dtype: Any) -> None:
    """Warns (once per mesh and set of weights) when some weights cannot be split as their rules
    ask, naming them and the memory per device their replication costs."""
    if mesh is None:
        return
    found = undivided(specs, mesh, rules)
    if not found:
        return
    size = {
        ".".join(str(k.key) for k in path): math.prod(s.shape) * jnp.dtype(dtype).itemsize
        for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    }
    extra = {name: size[name] / kept - size[name] / wanted for name, wanted, kept in found}
    mesh_text = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    names = ", ".join(f"{name} ({kept} of {wanted} shards, +{_size(extra[name])})" for name, wanted, kept in found)
    warnings.warn(
        f"mesh {mesh_text}: {len(found)} weights have a dimension their mesh axes do not divide and "
        f"are replicated over those axes instead, {_size(sum(extra.values()))} more per device "
        f"({jnp.dtype(dtype).name}): {names}. Choose mesh sizes that divide the heads, the MLP width and "
        "the vocabulary, or rules that do not shard those dimensions.",
        stacklevel=3,
    )


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def shardings(specs: ParamTree, mesh: Mesh, rules: Rules) -> ParamTree:
    """The tree of NamedShardings of the parameters on `mesh`."""
    return _map(lambda s: logical_sharding(mesh, s.axes, rules, s.shape), specs)


def abstract(specs: ParamTree, dtype: Any, mesh: Mesh | None = None, rules: Rules | None = None) -> ParamTree:
    """The tree of ShapeDtypeStructs (with shardings when `mesh` is given)."""
    if mesh is None:
        return _map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), specs)
    assert rules is not None
    warn_undivided(specs, mesh, rules, dtype)
    return _map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, jnp.dtype(dtype), sharding=logical_sharding(mesh, s.axes, rules, s.shape)
        ),
        specs,
    )


def count(specs: ParamTree) -> int:
    """Total number of parameters."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))


def init(
    specs: ParamTree, key: jax.Array, dtype: Any, mesh: Mesh | None = None, rules: Rules | None = None
) -> ParamTree:
    """Random parameters, created directly in their shardings (no host-side full copy).

    Each leaf's key is `fold_in(key, i)` with `i` the leaf's index in tree order.
    """
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)

    def make(k: jax.Array) -> ParamTree:
        out = [s.init(jax.random.fold_in(k, i), s.shape, jnp.dtype(dtype)) for i, s in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out)

    out_shardings = None
    if mesh is not None:
        assert rules is not None
        warn_undivided(specs, mesh, rules, dtype)
        out_shardings = shardings(specs, mesh, rules)
    return jax.jit(make, out_shardings=out_shardings)(key)
