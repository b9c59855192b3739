"""Writing checkpoints: conversion between formats and export of an in-memory model.

Every writer consumes a source of canonical blocks (`reader.SafetensorsSource`,
`reader.OrbaxSource`, or `ModelSource` for parameters in device memory) one published tensor at a
time, in pieces:

- `hf` / `mistral`: published rows are produced piece by piece and streamed into safetensors files
  whose headers were planned in advance (HF: `model-0000k-of-0000n.safetensors` at a size limit +
  index + `config.json`; Mistral: `consolidated.safetensors` + `params.json`);
- `orbax`: each tensor becomes its own Orbax leaf (one per layer), assembled in its sharding on the
  conversion mesh and saved, uncompressed, in groups of about one tensor's size; the stored chunks
  are the conversion mesh's shards, so a mesh restores only the chunks its devices overlap.

A destination is written into a temporary directory beside it and renamed at the end: a failed
conversion leaves nothing at the destination, and one killed outright leaves a directory named
`.DST.partial-HOST-PID-XXXXXXXX`, which the next conversion into the same directory removes once
that process is gone. Output directories and files are created with the process's umask. NaN or
Inf values are copied as they are, with a `NonFiniteWarning` naming the tensors that hold them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from magistral_jax.checkpoint.configs import MAGISTRAL_CONFIG, architecture_dict, to_hf_config, to_mistral_params
from magistral_jax.checkpoint.layouts import (
    LAYOUTS,
    CheckpointError,
    Index,
    Layout,
    NonFiniteWarning,
    TensorEntry,
    plan,
)
from magistral_jax.checkpoint.reader import (
    ORBAX_PARAMS,
    PIECE_BYTES,
    Key,
    assemble,
    entry_key,
    open_checkpoint,
    orbax_leaf_path,
    param_sharding,
    row_axis,
    set_at,
)
from magistral_jax.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, split_files
from magistral_jax.config import ModelConfig, canonical_dtype
from magistral_jax.model import param_specs
from magistral_jax.model import params as P
from magistral_jax.overrides import open_regular_file
from magistral_jax.sharding import to_host

FORMATS = ("orbax", "hf", "mistral")
DEFAULT_SHARD_BYTES = 5 * 10**9
# Tokenizer and generation files that travel with the weights.
SIDE_FILES = (
    "tekken.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "SYSTEM_PROMPT.txt",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
SIDE_PREFIXES = ("tokenizer.model",)


def output_layout(cfg: ModelConfig, to: str) -> Layout:
    """HF exports use the layout transformers itself writes; Mistral its consolidated names."""
    if to == "mistral":
        return LAYOUTS["mistral"]
    return LAYOUTS["hf-legacy" if cfg.vision is not None else "hf-text"]


class ModelSource:
    """Canonical blocks of parameters held in device memory."""

    def __init__(self, params: P.ParamTree):
        self.params = params

    def read(self, key: Key, index: Index) -> np.ndarray:
        path, layer = key
        node: Any = self.params
        for part in path:
            node = node[part]
        full = index if layer is None else (layer, *index)
        return to_host(node[full])


# A destination is written into `.NAME.partial-HOST-PID-XXXXXXXX` beside it: a conversion killed
# outright (SIGKILL, a lost machine) leaves that directory, which the next conversion into the same
# parent directory removes once its process is gone.
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<host>[A-Za-z0-9.-]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_partials(parent: str) -> list[str]:
    """Removes the partial destinations in `parent` left by conversions of this host whose process
    is gone (never one of a live process, nor another host's: its pids mean nothing here);
    returns their paths."""
    removed = []
    host = _host()
    for entry in sorted(os.listdir(parent)):
        m = _PARTIAL.fullmatch(entry)
        path = os.path.join(parent, entry)
        if m is None or m["host"] != host or _alive(int(m["pid"])) or not os.path.isdir(path) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def check_destination(dst: str | os.PathLike[str]) -> str:
    """`dst` as an absolute path, refused (`CheckpointError`) when it exists, is a dangling
    symbolic link or a symbolic link loop, or lies below one: checked before any work."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst):
        if os.path.islink(dst) and not os.path.exists(dst):
            try:
                os.stat(dst)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CheckpointError(f"{dst}: destination is a symbolic link loop") from None
            raise CheckpointError(f"{dst}: destination is a dangling symbolic link (to {os.readlink(dst)})")
        raise CheckpointError(f"{dst}: destination exists; remove it or choose another path")
    parent = dst
    while True:
        parent = os.path.dirname(parent)
        try:
            os.stat(parent)
            break
        except FileNotFoundError:
            if os.path.islink(parent):
                raise CheckpointError(f"{dst}: {parent} is a dangling symbolic link") from None
        except OSError as e:
            raise CheckpointError(f"{dst}: {parent}: {e.strerror}") from None
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: {parent} is not a directory")
    return dst


@contextlib.contextmanager
def staging(dst: str) -> Iterator[str]:
    """A temporary directory beside `dst`, renamed to `dst` on success and removed on failure.

    Created with the process's umask, as `os.makedirs` would create `dst` itself (a temporary
    directory from `tempfile` would be private, 0700, and stay so after the rename)."""
    dst = check_destination(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    for path in remove_stale_partials(parent):
        print(f"removed {path}: a partial conversion of a process that no longer runs", file=sys.stderr)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# 16-bit floats: their exponent bits, all set in a NaN or an Inf.
_EXPONENT_BITS = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00}


def count_nonfinite(block: np.ndarray) -> int:
    """The number of NaN and Inf values in `block`, with a fast pass for the usual case of none
    (a maximum over exponent bits for 16-bit floats, a sum for wider ones: 2-4x `np.isfinite`)."""
    bits = _EXPONENT_BITS.get(block.dtype)
    if bits is not None:
        if np.max(block.view(np.uint16) & np.uint16(bits), initial=0) != bits:
            return 0
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.sum(block)):  # a sum that overflows falls through to the count
                return 0
    return block.size - int(np.count_nonzero(np.isfinite(block)))


class _FiniteCheck:
    """Passes a source's blocks through, counting the NaN / Inf values of each tensor."""

    def __init__(self, source, names: dict[Key, str]):
        self.source, self.names = source, names
        self.bad: dict[str, int] = {}

    def read(self, key: Key, index: Index) -> np.ndarray:
        block = self.source.read(key, index)
        n = count_nonfinite(block)
        if n:
            name = self.names[key]
            self.bad[name] = self.bad.get(name, 0) + n
        return block

    def warn(self, dst: str) -> None:
        if not self.bad:
            return
        listed = ", ".join(f"{name} ({n} values)" for name, n in list(self.bad.items())[:5])
        more = f" and {len(self.bad) - 5} more" if len(self.bad) > 5 else ""
        warnings.warn(
            NonFiniteWarning(f"{dst}: NaN or Inf in {len(self.bad)} tensors, copied as they are: {listed}{more}"),
            stacklevel=3,
        )


def _copy_regular(src: str, dst: str) -> None:
    # A side file that is a FIFO would block a plain copy forever.
    with os.fdopen(open_regular_file(src, CheckpointError), "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def row_pieces(entry: TensorEntry, itemsize: int) -> Iterator[tuple[int, int]]:
    """Ranges `[start, stop)` of `entry`'s published rows, whole row groups (`Transform.row_unit`)
    of about `PIECE_BYTES` at `itemsize` bytes per value: the pieces a writer streams."""
    rows = entry.torch_shape[0]
    unit = entry.transform.row_unit(entry.shape)
    row_bytes = math.prod(entry.torch_shape[1:]) * itemsize
    step = max(unit, (PIECE_BYTES // max(row_bytes, 1)) // unit * unit)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _write_safetensors(source, cfg: ModelConfig, dst: str, to: str, max_shard_bytes: int | None, bar) -> None:
    layout = output_layout(cfg, to)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    entries = plan(cfg, layout)
    infos = [TensorInfo(e.name, dtype, e.torch_shape) for e in entries]
    if to == "hf":
        files = split_files(infos, max_shard_bytes, "model")
        writer = SafetensorsWriter(dst, files, "model.safetensors.index.json")
    else:
        writer = SafetensorsWriter(dst, split_files(infos, None, "consolidated"), None)
    for e in entries:
        for start, stop in row_pieces(e, max(dtype.itemsize, 4)):
            block = np.asarray(source.read(entry_key(e), e.transform.rows_index(e.shape, start, stop)), dtype)
            writer.write(e.name, e.transform.to_torch_rows(block))
            bar.update(block.nbytes)
        bar.tensor_done()
    writer.close()
    name, content = ("config.json", to_hf_config(cfg)) if to == "hf" else ("params.json", to_mistral_params(cfg))
    with open(os.path.join(dst, name), "w") as f:
        json.dump(content, f, indent=2)


def _orbax_context(largest_shard_bytes: int):
    import orbax.checkpoint.experimental.v1 as ocp

    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    # Device-to-host copies for writing proceed a few shards at a time, not all at once.
    ctx.memory.transfer_concurrent_bytes = max(4 * PIECE_BYTES, largest_shard_bytes)
    return ctx


def _write_orbax(source, cfg: ModelConfig, dst: str, mesh: Mesh | None, bar) -> None:
    from orbax.checkpoint.experimental.v1 import partial

    specs = param_specs(cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    entries = plan(cfg, output_layout(cfg, "hf"))
    sizes = [math.prod(e.shape) * dtype.itemsize for e in entries]
    # Each partial save rereads what the previous ones wrote, so saves are grouped; a group holds
    # about as many bytes as the largest tensor, which bounds the memory in use.
    budget = max(max(sizes), PIECE_BYTES * 4)
    path = os.path.join(dst, ORBAX_PARAMS)
    group: dict = {}
    group_bytes = 0
    largest_shard = 0

    def save() -> None:
        with _orbax_context(largest_shard):
            partial.save(path, group)

    for e, size in zip(entries, sizes, strict=True):
        if group and group_bytes + size > budget:
            save()
            group, group_bytes, largest_shard = {}, 0, 0
        node: Any = specs
        for part in e.path:
            node = node[part]
        sharding = param_sharding(node, mesh, cfg.rules, drop_layers=e.layer is not None)
        key = entry_key(e)
        value = assemble(e.shape, dtype, sharding, lambda index, key=key: source.read(key, index), (row_axis(e),))
        largest_shard = max(largest_shard, math.prod(sharding.shard_shape(e.shape)) * dtype.itemsize)
        set_at(group, orbax_leaf_path(key), value)
        group_bytes += size
        bar.update(size)
        bar.tensor_done()
    if group:
        save()
    partial.finalize(path)
    with open(os.path.join(dst, MAGISTRAL_CONFIG), "w") as f:
        json.dump(architecture_dict(cfg), f, indent=2)


class _Progress(tqdm):
    """A progress bar over bytes that also counts tensors."""

    def __init__(self, total_bytes: int, n_tensors: int, desc: str, enabled: bool):
        super().__init__(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled)
        self.n_tensors, self.tensors = n_tensors, 0

    def tensor_done(self) -> None:
        self.tensors += 1
        self.set_postfix_str(f"{self.tensors}/{self.n_tensors} tensors", refresh=False)


def write_checkpoint(
    source,
    cfg: ModelConfig,
    dst: str,
    to: str,
    *,
    mesh: Mesh | None = None,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    side_files_from: str | None = None,
) -> None:
    """Writes the tensors of `source` (architecture `cfg`, stored as `cfg.param_dtype`) to `dst`."""
    if to not in FORMATS:
        raise CheckpointError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    entries = plan(cfg, output_layout(cfg, "hf"))
    total = sum(math.prod(e.shape) for e in entries) * jnp.dtype(cfg.param_dtype).itemsize
    checked = _FiniteCheck(source, {entry_key(e): e.name for e in entries})
    with staging(dst) as tmp:
        with _Progress(total, len(entries), f"writing {to}", progress) as bar:
            if to == "orbax":
                _write_orbax(checked, cfg, tmp, mesh, bar)
            else:
                _write_safetensors(checked, cfg, tmp, to, max_shard_bytes, bar)
        if side_files_from is not None:
            for fname in sorted(os.listdir(side_files_from)):
                if fname in SIDE_FILES or fname.startswith(SIDE_PREFIXES):
                    _copy_regular(os.path.join(side_files_from, fname), os.path.join(tmp, fname))
    checked.warn(dst)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    dtype: str | None = None,
    from_layout: str | None = None,
    mesh: Mesh | None = None,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Converts the checkpoint at `src` into format `to` (orbax, hf, mistral) at `dst`.

    Args:
      dtype: cast the weights (`bfloat16`, `float32`); None keeps them bit for bit.
      from_layout: force the source's format or layout instead of detecting it.
      mesh: where orbax conversion assembles each tensor (its shards become the stored chunks).
      max_shard_bytes: size limit of each HF safetensors file.
    """
    check_destination(dst)
    ckpt = open_checkpoint(src, from_layout)
    cfg = ckpt.cfg if dtype is None else ckpt.cfg.replace(param_dtype=canonical_dtype(dtype))
    write_checkpoint(
        ckpt.source(),
        cfg,
        os.fspath(dst),
        to,
        mesh=mesh,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        side_files_from=ckpt.path,
    )


def save_model(model, dst: str | os.PathLike[str], to: str, *, dtype: str | None = None, **kw: Any) -> None:
    """Exports a `Model`'s parameters to `dst` in format `to`, streaming tensor by tensor."""
    cfg = model.cfg.replace(param_dtype=canonical_dtype(dtype)) if dtype else model.cfg
    write_checkpoint(ModelSource(model.params), cfg, os.fspath(dst), to, mesh=model.mesh, **kw)
