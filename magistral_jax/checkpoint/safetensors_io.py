"""Safetensors reading by slices and streaming writing, with no framework but numpy.

`TensorFiles` maps tensor names to their file and reads exact slices with `pread`, so a reader
touches only the bytes it needs and holds none of them after use (a memory map would leave every
page read resident in the process). `SafetensorsWriter` writes tensors whose
names, dtypes and shapes are known in advance: it writes each file's header first and then the
tensors' bytes piece by piece, so no tensor, let alone a file, is ever held in memory whole.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from magistral_jax.checkpoint.layouts import CheckpointError
from magistral_jax.overrides import ConfigError, load_json, open_regular_file

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


MAX_HEADER_BYTES = 100 * 2**20
MAX_DIMS = 8  # model weights have at most 4; numpy refuses more than 64


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entry(name: str, info: Any, fname: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype code, shape, (begin, end)) of one header entry, each checked for its JSON type: a
    hostile header may hold lists, strings or floats anywhere."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{name}: its safetensors header entry in {fname} needs dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str):
        raise CheckpointError(f"{name}: dtype in {fname} is not a string")
    if code not in DTYPES:
        raise CheckpointError(f"{name}: dtype {code[:20]} in {fname} is not a supported float type")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{name}: shape in {fname} is not a list of at most {MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{name}: data_offsets in {fname} are not two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{name}: data_offsets [{begin}, {end}] in {fname} are not an increasing range")
    return code, tuple(shape), (begin, end)


class SafetensorsFile:
    """One safetensors file: its header, validated against the file's size, and exact slice reads
    with `pread` (no memory map, so pages read do not stay in the process's resident memory)."""

    def __init__(self, path: str):
        self.path = path
        self.fname = os.path.basename(path)
        self._fd = open_regular_file(path, CheckpointError)
        try:
            self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{self.fname}: cannot read the safetensors header (its length field says {n} bytes, "
                f"the file has {size})"
            )
        try:
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # also UnicodeDecodeError and integers of more than 4300 digits
            raise CheckpointError(f"{self.fname}: cannot read the safetensors header ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{self.fname}: cannot read the safetensors header (nested too deeply)") from None
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.fname}: __metadata__ of the safetensors header is not a mapping")
        self.metadata = metadata
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        ranges = []
        for name, info in header.items():
            code, shape, (begin, end) = _header_entry(name, info, self.fname)
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            if end - begin != nbytes:
                raise CheckpointError(f"{name}: its byte range in {self.fname} does not match shape {shape}")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.fname}: truncated: {name} ends at byte {self.data_start + end}, the file has {size}"
                )
            self.entries[name] = (DTYPES[code], shape, self.data_start + begin)
            if nbytes:
                ranges.append((begin, end, name))
        # Tensors sharing bytes would alias each other (a write to one is a write to both).
        ranges.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(ranges):
            if begin < end:
                raise CheckpointError(f"{other}: its byte range overlaps {name}'s in {self.fname}")

    def close(self) -> None:
        os.close(self._fd)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The slice `index` (one slice per dim, step 1) of tensor `name`."""
        dtype, shape, offset = self.entries[name]
        if index is None:
            index = tuple(slice(0, d) for d in shape)
        bounds = [s.indices(d)[:2] for s, d in zip(index, shape, strict=True)]
        out_shape = tuple(b - a for a, b in bounds)
        out = np.empty(out_shape, dtype)
        if out.size == 0:
            return out
        # The trailing dims read whole form one contiguous run per combination of the others.
        k = len(shape)
        while k > 0 and bounds[k - 1] == (0, shape[k - 1]):
            k -= 1
        split = max(k - 1, 0)
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        run_elems = math.prod(out_shape[split:])
        flat = out.reshape(-1).view(np.uint8)
        run_bytes = run_elems * dtype.itemsize
        for j, outer in enumerate(np.ndindex(*out_shape[:split])):
            start = sum((a + o) * st for (a, _), o, st in zip(bounds[:split], outer, strides, strict=False))
            start += sum(a * st for (a, _), st in zip(bounds[split:], strides[split:], strict=False))
            got = os.preadv(self._fd, [flat[j * run_bytes : (j + 1) * run_bytes]], offset + start * dtype.itemsize)
            if got != run_bytes:
                raise CheckpointError(f"{name}: short read from {self.fname}")
        return out


class _Slice:
    """`tensor[index]` reads that slice (the protocol the layout transforms use)."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.file.read(self.name, index)


class TensorFiles:
    """The tensors of a set of safetensors files in one directory, by name."""

    def __init__(self, directory: str, files: Sequence[str], index: dict[str, str] | None = None):
        self.directory = directory
        self.file_of: dict[str, str] = {}
        self._files: dict[str, SafetensorsFile] = {}
        try:
            self._open(files, index)
        except BaseException:
            self.close()
            raise

    def _open(self, files: Sequence[str], index: dict[str, str] | None) -> None:
        for fname in files:
            fpath = os.path.join(self.directory, fname)
            if not os.path.exists(fpath):
                where = "model.safetensors.index.json" if index is not None else "the file list"
                raise CheckpointError(f"{fname}: listed in {where} but missing from {self.directory}")
            self._files[fname] = SafetensorsFile(fpath)
            for name in self._files[fname].entries:
                if name in self.file_of:
                    raise CheckpointError(f"{name}: present in both {self.file_of[name]} and {fname}")
                self.file_of[name] = fname
        if index is not None:
            for name, fname in index.items():
                if self.file_of.get(name) != fname:
                    raise CheckpointError(f"{name}: listed in the index under {fname} but not found there")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @classmethod
    def from_index(cls, directory: str, index_file: str) -> TensorFiles:
        try:
            weight_map = load_json(os.path.join(directory, index_file)).get("weight_map")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_file}: weight_map is not a mapping of tensor names to file names")
        for fname in set(weight_map.values()):
            if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
                raise CheckpointError(f"{index_file}: {fname[:80]!r} is not a safetensors file name in its directory")
        return cls(directory, sorted(set(weight_map.values())), weight_map)

    def names(self) -> set[str]:
        return set(self.file_of)

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
        if name not in self.file_of:
            raise CheckpointError(f"{name}: missing from the checkpoint in {self.directory}")
        return self._files[self.file_of[name]].entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def reader(self, name: str) -> _Slice:
        """A slice reader: `reader[index]` returns that slice as numpy."""
        self._entry(name)
        return _Slice(self._files[self.file_of[name]], name)

    def nbytes(self, name: str) -> int:
        dtype, shape, _ = self._entry(name)
        return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def split_files(tensors: Sequence[TensorInfo], max_bytes: int | None, stem: str) -> list[tuple[str, list[TensorInfo]]]:
    """Groups tensors, in order, into files of at most `max_bytes` (one file when None):
    `{stem}.safetensors`, or `{stem}-00001-of-0000N.safetensors` for several."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if max_bytes is not None and groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class SafetensorsWriter:
    """Streams tensors into safetensors files planned in advance.

    Tensors must be written in plan order, each as one or more consecutive blocks of rows
    (C-contiguous, the planned dtype); `close()` checks that every byte was written and, for
    several files, writes the `{stem}.safetensors.index.json`.
    """

    def __init__(self, directory: str, files: list[tuple[str, list[TensorInfo]]], index_name: str | None):
        self.directory = directory
        self.files = files
        self.index_name = index_name
        self._order = [(fname, t) for fname, group in files for t in group]
        self._pos = 0  # index in _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._fh = None
        self._open_file = None

    def _start_file(self, fname: str) -> None:
        if self._fh is not None:
            self._fh.close()
        group = next(g for f, g in self.files if f == fname)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in group:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(os.path.join(self.directory, fname), "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._open_file = fname

    def write(self, name: str, block: np.ndarray) -> None:
        if self._pos >= len(self._order):
            raise ValueError(f"{name}: every planned tensor has been written already")
        fname, info = self._order[self._pos]
        if name != info.name:
            raise ValueError(f"{name}: written out of order, {info.name} expected next")
        if block.dtype != info.dtype:
            raise ValueError(f"{name}: dtype {block.dtype} written, {info.dtype} planned")
        if self._open_file != fname:
            self._start_file(fname)
        data = np.ascontiguousarray(block)
        if self._written + data.nbytes > info.nbytes:
            raise ValueError(f"{name}: more bytes written than its shape {info.shape} holds")
        self._fh.write(data.reshape(-1).view(np.uint8))
        self._written += data.nbytes
        if self._written == info.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._order):
            missing = self._order[self._pos][1].name
            raise ValueError(f"{missing}: planned but not (completely) written")
        if self.index_name is not None and len(self.files) > 1:
            weight_map = {t.name: fname for fname, group in self.files for t in group}
            total = sum(t.nbytes for _, group in self.files for t in group)
            with open(os.path.join(self.directory, self.index_name), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
