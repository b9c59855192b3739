"""The device mesh and the logical-axis sharding rules.

Every weight and activation carries logical axis names (`batch`, `embed`, `q_heads`, ...). A rules
table maps each logical name to zero, one or several mesh axes of the one mesh with axes
`data`, `fsdp` and `tensor`. Changing the parallelism of a run is a change of mesh shape and rules,
never of model code.

Conventions:
- A mesh axis may appear at most once in one array's sharding; a rules table that would do so for
  some array is refused when the spec is built.
- A dimension whose size is not divisible by its mesh axes keeps the longest prefix of those axes
  whose product divides it (a tiny vocabulary of 101 tokens stays replicated over `tensor`).
- Activation constraints read the mesh of the surrounding `jax.set_mesh` context; outside of
  one (a single device, no mesh) they are no-ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged", "tensor"),
    ("projector_hidden", "tensor"),
    # activations
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache
    ("cache_seq", None),
)


def validate_rules(rules: Rules) -> None:
    """Refuses a rules table with duplicate logical names or unknown mesh axes."""
    seen: set[str] = set()
    for entry in rules:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"rules: each entry must be (logical_name, mesh_axes), got {entry!r}")
        name, axes = entry
        if name in seen:
            raise ValueError(f"rules: logical axis {name!r} appears twice")
        seen.add(name)
        for axis in _as_tuple(axes):
            if axis not in MESH_AXES:
                raise ValueError(f"rules: {name!r} maps to unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    logical: Sequence[str | None],
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh_shape: dict[str, int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh_shape`, mesh axes of size 1 are dropped and each dimension keeps the
    longest prefix of its mesh axes whose product divides the dimension.
    """
    table = dict(rules)
    used: dict[str, str] = {}
    spec: list[MeshAxes] = []
    for i, name in enumerate(logical):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = _as_tuple(table[name])
        for axis in axes:
            if axis in used:
                raise ValueError(
                    f"mesh axis {axis!r} would shard both {used[axis]!r} and {name!r} of one array "
                    f"with logical axes {tuple(logical)}"
                )
            used[axis] = name
        if mesh_shape is not None:
            axes = tuple(a for a in axes if mesh_shape[a] > 1)
            if shape is not None:
                kept: list[str] = []
                for axis in axes:
                    if shape[i] % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]):
                        break
                    kept.append(axis)
                axes = tuple(kept)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical: Sequence[str | None], rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """The NamedSharding of an array with `shape` and logical axes `logical` on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(logical, rules, shape, dict(mesh.shape)))


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Rules) -> jax.Array:
    """Sharding constraint on an activation from its logical axes, against the context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical, rules, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {sizes}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ValueError(f"mesh.{k}: a positive size or -1 is expected, got {v}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices cannot be split as {sizes}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        if total > len(devices):
            raise ValueError(f"mesh: {sizes} needs {total} devices, {len(devices)} available")
        devices = devices[:total]
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """Parses `data=2,fsdp=4,tensor=1` into `make_mesh` arguments (missing axes: data=1,
    fsdp=-1, tensor=1)."""
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in sizes:
            raise ValueError(f"mesh: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"mesh.{key.strip()}: {value!r} is not an integer") from None
    return sizes


def host_array_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a host array that every process holds in full onto `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_shards(mesh: Mesh, rules: Rules, logical: str = "batch") -> int:
    """How many ways `mesh` splits the rows of a batch (the product of the mesh axes `logical`
    maps to); a global batch is split fully when its rows are a multiple of it."""
    return math.prod(dict(mesh.shape)[a] for a in _as_tuple(dict(rules).get(logical)))


def process_rows(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> slice:
    """The rows (first axis) of a global array of `shape` that this process's devices hold.

    Refuses a layout where they are not one block of `rows / process_count` rows: a batch must be
    split over the processes, not repeated (for example by tensor parallelism across hosts or a
    row count the batch axes do not divide).
    """
    shape = tuple(shape)
    count = jax.process_count()
    held = np.zeros(shape[0], bool)
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = (index[0] if index else slice(None)).indices(shape[0])
        held[start:stop] = True
    rows = np.flatnonzero(held)
    if shape[0] % count or len(rows) != shape[0] // count or rows[-1] - rows[0] + 1 != len(rows):
        raise ValueError(
            f"a batch of {shape[0]} rows is not split into one block per process over {count} processes "
            f"(this process holds rows {rows.tolist()[:8]}{'...' if len(rows) > 8 else ''}); the batch "
            "mesh axes must split it evenly, with no device of another process holding the same rows"
        )
    return slice(int(rows[0]), int(rows[-1]) + 1)


def local_batch_to_global(
    x: np.ndarray, mesh: Mesh, rules: Rules, logical: Sequence[str | None] = ("batch", "act_seq")
) -> jax.Array:
    """Places this process's rows of a batch split over the processes: the global array has
    `process_count` times the rows of `x` and this process's block (`process_rows`) is `x`. In a
    single process, `host_array_to_global` on the batch sharding."""
    x = np.asarray(x)
    count = jax.process_count()
    if count == 1:
        return host_array_to_global(x, logical_sharding(mesh, logical, rules, x.shape))
    shape = (x.shape[0] * count, *x.shape[1:])
    sharding = logical_sharding(mesh, logical, rules, shape)
    process_rows(sharding, shape)
    return jax.make_array_from_process_local_data(sharding, x, shape)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as a numpy array on every process (gathered from the other processes when
    it spans several; all processes must call this together then)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
