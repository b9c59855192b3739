"""Opening checkpoints of every format, validating them, and streaming their tensors.

Formats:
- `hf`: `config.json` + safetensors (one file, or shards with `model.safetensors.index.json`),
  in the `hf-legacy`, `hf-new` or `hf-text` layout;
- `mistral`: `params.json` + `consolidated*.safetensors`;
- `orbax`: this project's converted checkpoints: `magistral_config.json` + an Orbax checkpoint
  `params/` holding each published tensor as its own leaf (one per layer for stacked parameters).

A source answers `read(key, index)` with a canonical block (numpy), where `key` is
`(parameter path, layer or None)` and `index` a tuple of slices into that tensor's canonical
shape. Loading into devices (`assemble`) builds each device's shard from pieces of at most
`PIECE_BYTES`, written into a preallocated device buffer, so host memory holds one piece at a
time and each device reads only its own slices (the same code runs on every host of a pod).
"""

from __future__ import annotations

import functools
import glob
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from tqdm.auto import tqdm

from magistral_jax.checkpoint.configs import (
    MAGISTRAL_CONFIG,
    checkpoint_format,
    from_architecture_dict,
    from_hf_config,
    from_mistral_params,
)
from magistral_jax.checkpoint.layouts import LAYOUTS, CheckpointError, Index, Layout, TensorEntry, detect_layout, plan
from magistral_jax.checkpoint.safetensors_io import TensorFiles
from magistral_jax.config import ModelConfig
from magistral_jax.model import param_specs
from magistral_jax.model import params as P
from magistral_jax.overrides import ConfigError, load_json
from magistral_jax.sharding import Rules, logical_sharding

PIECE_BYTES = 64 * 2**20
ORBAX_PARAMS = "params"
Key = tuple[tuple[str, ...], int | None]


def entry_key(entry: TensorEntry) -> Key:
    return (entry.path, entry.layer)


@dataclass
class Checkpoint:
    """An opened, validated checkpoint directory."""

    path: str
    format: str  # "hf", "mistral" or "orbax"
    cfg: ModelConfig  # architecture; param_dtype = the dtype of the stored tensors
    layout: Layout | None  # naming scheme of safetensors formats; None for orbax
    files: TensorFiles | None

    def entries(self) -> list[TensorEntry]:
        """The stored tensors, in storage order (orbax: the hf-text/hf-legacy plan's order)."""
        return plan(self.cfg, self.layout or _orbax_layout(self.cfg))

    def source(self) -> SafetensorsSource | OrbaxSource:
        if self.format == "orbax":
            return OrbaxSource(self)
        assert self.files is not None
        return SafetensorsSource(self.files, self.entries())

    def nbytes(self) -> int:
        itemsize = jnp.dtype(self.cfg.param_dtype).itemsize
        return sum(math.prod(e.shape) for e in self.entries()) * itemsize


def _orbax_layout(cfg: ModelConfig) -> Layout:
    # Orbax leaves are keyed by parameter path; any layout gives the same entry order and shapes.
    return LAYOUTS["hf-legacy" if cfg.vision is not None else "hf-text"]


def open_checkpoint(path: str | os.PathLike[str], layout: str | None = None) -> Checkpoint:
    """Opens and validates a checkpoint directory; `layout` forces the format or layout
    (`orbax`, `mistral`, `hf-legacy`, `hf-new`, `hf-text`), otherwise it is detected."""
    # Orbax refuses relative paths ("Checkpoint path should be absolute").
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if layout is not None and layout != "orbax" and layout not in LAYOUTS:
        raise CheckpointError(f"layout {layout!r}: expected orbax, {', '.join(LAYOUTS)}")

    fmt = checkpoint_format(path) if layout is None else layout if layout in ("orbax", "mistral") else "hf"
    if fmt == "orbax":
        return _open_orbax(path)
    if fmt == "mistral":
        return _open_mistral(path)
    if fmt == "hf" and os.path.exists(os.path.join(path, "config.json")):
        return _open_hf(path, layout)
    raise CheckpointError(
        f"{path}: not a checkpoint directory (expected config.json + safetensors, params.json + "
        f"consolidated.safetensors, or a magistral-jax {MAGISTRAL_CONFIG})"
    )


def _config(fn: Callable[[], Any], fname: str) -> Any:
    """Runs a config reader; its `ConfigError` becomes a `CheckpointError` naming `fname`."""
    try:
        return fn()
    except ConfigError as e:
        message = str(e)
        raise CheckpointError(message if fname in message else f"{fname}: {message}") from None


def _open_hf(path: str, layout: str | None) -> Checkpoint:
    d = _config(lambda: load_json(os.path.join(path, "config.json")), "config.json")
    cfg = _config(lambda: from_hf_config(d, name=os.path.basename(os.path.abspath(path))), "config.json")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        files = TensorFiles.from_index(path, "model.safetensors.index.json")
    else:
        names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "model*.safetensors")))
        if not names:
            raise CheckpointError(f"{path}: config.json but no model*.safetensors files")
        files = TensorFiles(path, names)
    try:
        found = LAYOUTS[layout] if layout else detect_layout(files.names())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if found.mistral:
        raise CheckpointError(f"{path}: the mistral layout needs params.json, not config.json")
    ckpt = Checkpoint(path, "hf", cfg, found, files)
    validate(ckpt, "config.json")
    return ckpt


def _open_mistral(path: str) -> Checkpoint:
    params_path = os.path.join(path, "params.json")
    if not os.path.exists(params_path):
        raise CheckpointError(f"{path}: params.json is missing")
    d = _config(lambda: load_json(params_path), "params.json")
    cfg = _config(lambda: from_mistral_params(d, name=os.path.basename(os.path.abspath(path))), "params.json")
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "consolidated*.safetensors")))
    if not names:
        raise CheckpointError(f"{path}: params.json but no consolidated*.safetensors")
    files = TensorFiles(path, names)
    if "tok_embeddings.weight" not in files.names():
        raise CheckpointError(f"tok_embeddings.weight: missing from {names[0]}")
    # params.json has no dtype: the embedding's dtype is the checkpoint's, the others must agree.
    dtype = jnp.dtype(files.dtype("tok_embeddings.weight")).name
    ckpt = Checkpoint(path, "mistral", cfg.replace(param_dtype=dtype), LAYOUTS["mistral"], files)
    validate(ckpt, "tok_embeddings.weight")
    return ckpt


def _open_orbax(path: str) -> Checkpoint:
    d = _config(lambda: load_json(os.path.join(path, MAGISTRAL_CONFIG)), MAGISTRAL_CONFIG)
    cfg = _config(lambda: from_architecture_dict(d), MAGISTRAL_CONFIG)
    params = os.path.join(path, ORBAX_PARAMS)
    if not os.path.isdir(params):
        raise CheckpointError(f"{path}: {MAGISTRAL_CONFIG} but no Orbax checkpoint in {ORBAX_PARAMS}/")
    # TensorStore would block forever on a FIFO among the data files.
    for root, _, fnames in os.walk(params):
        for fname in fnames:
            fpath = os.path.join(root, fname)
            try:
                regular = stat.S_ISREG(os.stat(fpath).st_mode)
            except OSError as e:
                raise CheckpointError(f"{fpath}: {e.strerror}") from None
            if not regular:
                raise CheckpointError(f"{fpath}: not a regular file")
    return Checkpoint(path, "orbax", cfg, None, None)


def validate(ckpt: Checkpoint, dtype_source: str) -> None:
    """Every planned tensor present with its shape and dtype; no tensor left over."""
    files = ckpt.files
    assert files is not None and ckpt.layout is not None
    try:
        entries = ckpt.entries()
    except CheckpointError as e:  # a config with vision over text-only tensors
        raise CheckpointError(f"{ckpt.path}: {e}, but its config describes a vision encoder") from None
    expected_dtype = np.dtype(jnp.dtype(ckpt.cfg.param_dtype))
    for e in entries:
        if e.name not in files.file_of:
            raise CheckpointError(f"{e.name}: missing from the checkpoint in {ckpt.path}")
        got = files.shape(e.name)
        if got != e.torch_shape:
            raise CheckpointError(f"{e.name}: shape {e.torch_shape} expected, {got} in {files.file_of[e.name]}")
        dtype = files.dtype(e.name)
        if dtype != expected_dtype:
            raise CheckpointError(
                f"{e.name}: dtype {dtype.name} in {files.file_of[e.name]} contradicts {expected_dtype.name} "
                f"of {dtype_source}"
            )
    unexpected = sorted(files.names() - {e.name for e in entries})
    if unexpected:
        first = unexpected[0]
        what = "with vision" if ckpt.cfg.vision is not None else "text-only"
        raise CheckpointError(
            f"{first}: unexpected tensor in {files.file_of[first]} for this {what} config in the "
            f"{ckpt.layout.name} layout ({len(unexpected)} unexpected in all)"
        )


# ------------------------------------------------------------------------------------------------
# Sources of canonical blocks
# ------------------------------------------------------------------------------------------------


class SafetensorsSource:
    """Canonical blocks read from safetensors slices."""

    def __init__(self, files: TensorFiles, entries: list[TensorEntry]):
        self.files = files
        self.entries = {entry_key(e): e for e in entries}

    def read(self, key: Key, index: Index) -> np.ndarray:
        e = self.entries[key]
        return e.transform.read_canonical(self.files.reader(e.name), e.shape, index)


def orbax_leaf_path(key: Key) -> tuple[str, ...]:
    path, layer = key
    return path if layer is None else (*path, str(layer))


def _nest(path: tuple[str, ...], value: Any) -> dict:
    for part in reversed(path):
        value = {part: value}
    return value


class OrbaxSource:
    """Canonical blocks of a converted checkpoint, restored one tensor at a time to the host."""

    def __init__(self, ckpt: Checkpoint):
        import orbax.checkpoint.experimental.v1 as ocp

        self._ocp = ocp
        self.path = os.path.join(ckpt.path, ORBAX_PARAMS)
        self.entries = {entry_key(e): e for e in ckpt.entries()}
        self.dtype = jnp.dtype(ckpt.cfg.param_dtype)
        self._cached: tuple[Key, np.ndarray] | None = None
        self._structure: dict = {}
        for key in self.entries:
            set_at(self._structure, orbax_leaf_path(key), None)

    def restore(self, targets: dict[Key, Any]) -> dict[Key, Any]:
        """Restores the given leaves, nothing else: a `jax.ShapeDtypeStruct` target (with a
        sharding) gives a device array, a numpy array target a host array."""
        tree: Any = jax.tree.map(lambda _: self._ocp.PLACEHOLDER, self._structure, is_leaf=lambda x: x is None)
        for key, target in targets.items():
            set_at(tree, orbax_leaf_path(key), target)
        try:
            restored = self._ocp.load(self.path, tree)
        except Exception as e:  # Orbax and TensorStore raise bare `Exception`s for damaged data
            names = ", ".join("/".join(orbax_leaf_path(key)) for key in targets)
            first = str(e).strip().split("\n")[0][:200]
            raise CheckpointError(
                f"{names}: cannot be restored from the Orbax checkpoint in {self.path} (a truncated or damaged "
                f"data file?): {first}"
            ) from None
        out = {}
        for key in targets:
            node = restored
            for part in orbax_leaf_path(key):
                node = node[part]
            out[key] = node
        return out

    def read(self, key: Key, index: Index) -> np.ndarray:
        if self._cached is None or self._cached[0] != key:
            self._cached = None
            # A numpy target restores straight into host memory (tensorstore still stages the
            # stored chunk, so a tensor is briefly held twice).
            self._cached = (key, self.restore({key: np.empty(self.entries[key].shape, self.dtype)})[key])
        return self._cached[1][index]


# ------------------------------------------------------------------------------------------------
# Assembling device arrays from pieces
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnums=0)
def _write_piece(buffer: jax.Array, piece: jax.Array, starts: tuple[jax.Array, ...]) -> jax.Array:
    return jax.lax.dynamic_update_slice(buffer, piece, starts)


def pieces(index: Index, itemsize: int, axes: tuple[int, ...], limit: int = PIECE_BYTES) -> Iterator[Index]:
    """Splits `index` into sub-indices of at most `limit` bytes, cutting along `axes` in order
    (a single unit of the last axis may exceed the limit)."""
    sizes = [s.stop - s.start for s in index]
    total = math.prod(sizes) * itemsize
    if total <= limit or not axes:
        yield index
        return
    axis = axes[0]
    unit = total // max(sizes[axis], 1)
    step = max(1, limit // max(unit, 1))
    start, stop = index[axis].start, index[axis].stop
    for a in range(start, stop, step):
        sub = (*index[:axis], slice(a, min(a + step, stop)), *index[axis + 1 :])
        if unit > limit and len(axes) > 1:
            yield from pieces(sub, itemsize, axes[1:], limit)
        else:
            yield sub


def _normalise(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def assemble(
    shape: tuple[int, ...],
    dtype: Any,
    sharding: Sharding,
    read: Callable[[Index], np.ndarray],
    axes: tuple[int, ...],
) -> jax.Array:
    """A global array whose addressable shards are read piece by piece (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    # Devices holding the same slice (replicas) share one read; slices are not hashable before
    # Python 3.12, so they are keyed by their bounds.
    by_index: dict[tuple[tuple[int, int], ...], tuple[Index, list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = _normalise(index, shape)
        by_index.setdefault(tuple((s.start, s.stop) for s in index), (index, []))[1].append(device)
    shards: dict[jax.Device, jax.Array] = {}
    for index, devices in by_index.values():
        parts = list(pieces(index, dtype.itemsize, axes))
        if len(parts) == 1:
            block = np.asarray(read(index), dtype)
            for device in devices:
                shards[device] = jax.device_put(block, device)
            continue
        shard_shape = tuple(s.stop - s.start for s in index)
        buffers = {d: jnp.zeros(shard_shape, dtype, device=d) for d in devices}
        for part in parts:
            block = np.asarray(read(part), dtype)
            starts = tuple(jnp.int32(p.start - i.start) for p, i in zip(part, index, strict=True))
            for device in devices:
                buffers[device] = _write_piece(buffers[device], jax.device_put(block, device), starts)
            # Bound the pieces in flight: without waiting, reads run ahead of the transfers.
            jax.block_until_ready(list(buffers.values()))
        shards.update(buffers)
    arrays = [shards[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def row_axis(entry: TensorEntry) -> int:
    """The canonical axis that holds the published tensor's rows (cut pieces along it)."""
    t = entry.transform
    return {"copy": 0, "conv": 3}.get(t.kind, t.n_in)


def param_sharding(spec: P.ParamSpec, mesh: Mesh | None, rules: Rules, drop_layers: bool = False) -> Sharding:
    shape, axes = (spec.shape[1:], spec.axes[1:]) if drop_layers else (spec.shape, spec.axes)
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return logical_sharding(mesh, axes, rules, shape)


def _spec_at(specs: P.ParamTree, path: tuple[str, ...]) -> P.ParamSpec:
    node: Any = specs
    for part in path:
        node = node[part]
    return node


def set_at(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Sets `tree[path[0]][path[1]]...` to `value`, creating the nested dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def refuse_nonfinite(params: P.ParamTree, ckpt: Checkpoint) -> None:
    """A `CheckpointError` naming the first published tensor of `ckpt` whose values in `params`
    (as loaded) include NaN or Inf; one compiled reduction over the whole tree."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    layered = {e.path for e in ckpt.entries() if e.layer is not None}
    paths = [tuple(k.key for k in path) for path, _ in leaves]

    def finite(xs: list[jax.Array]) -> list[jax.Array]:
        # Per layer for stacked parameters, so that the error names the layer's tensor.
        return [
            jnp.isfinite(x).all(axis=tuple(range(1 if p in layered else 0, x.ndim)))
            for p, x in zip(paths, xs, strict=True)
        ]

    sharding = leaves[0][1].sharding
    # Replicated flags: every process of a multi-host mesh reads them.
    out = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    flags = jax.jit(finite, out_shardings=out)([x for _, x in leaves])
    for path, ok in zip(paths, flags, strict=True):
        ok = np.asarray(ok).reshape(-1)
        if ok.all():
            continue
        layer = int(np.argmin(ok)) if path in layered else None
        e = next(e for e in ckpt.entries() if e.path == path and e.layer == layer)
        where = ckpt.files.file_of[e.name] if ckpt.files is not None else os.path.join(ckpt.path, ORBAX_PARAMS)
        raise CheckpointError(f"{e.name}: NaN or Inf values in {where}; a checkpoint to train from must be finite")


def load_params(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> P.ParamTree:
    """Every parameter of `cfg` from `ckpt`, in `cfg.param_dtype`, in its sharding on `mesh`;
    with `check_finite`, NaN or Inf values are refused (`refuse_nonfinite`)."""
    specs = param_specs(cfg)
    P.warn_undivided(specs, mesh, cfg.rules, cfg.param_dtype)
    by_path: dict[tuple[str, ...], list[TensorEntry]] = {}
    for e in ckpt.entries():
        by_path.setdefault(e.path, []).append(e)
    out: dict = {}
    bar = tqdm(total=ckpt.nbytes(), desc="loading", unit="B", unit_scale=True, disable=not progress)
    if ckpt.format == "orbax":
        source = OrbaxSource(ckpt)
        for path, entries in by_path.items():
            spec = _spec_at(specs, path)
            layer_sharding = param_sharding(spec, mesh, cfg.rules, drop_layers=entries[0].layer is not None)
            targets = {
                entry_key(e): jax.ShapeDtypeStruct(e.shape, cfg.param_dtype, sharding=layer_sharding) for e in entries
            }
            leaves = source.restore(targets)
            if entries[0].layer is None:
                value = leaves[entry_key(entries[0])]
            else:
                value = _stack([leaves.pop(entry_key(e)) for e in entries], param_sharding(spec, mesh, cfg.rules))
            set_at(out, path, value)
            bar.update(sum(math.prod(e.shape) for e in entries) * jnp.dtype(ckpt.cfg.param_dtype).itemsize)
    else:
        source = ckpt.source()
        for path, entries in by_path.items():
            spec = _spec_at(specs, path)
            layered = entries[0].layer is not None
            axis = row_axis(entries[0])

            def read(index: Index, entries=entries, layered=layered) -> np.ndarray:
                if not layered:
                    return source.read(entry_key(entries[0]), index)
                layers = range(index[0].start, index[0].stop)
                return np.stack([source.read(entry_key(entries[i]), index[1:]) for i in layers])

            axes = (0, axis + 1) if layered else (axis,)
            value = assemble(spec.shape, cfg.param_dtype, param_sharding(spec, mesh, cfg.rules), read, axes)
            set_at(out, path, value)
            bar.update(sum(ckpt.files.nbytes(e.name) for e in entries))
    bar.close()
    if check_finite:
        refuse_nonfinite(out, ckpt)
    return out


def _stack(layers: list[jax.Array], sharding: Sharding) -> jax.Array:
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*layers)
