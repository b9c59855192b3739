"""Ahead-of-time planning on TPU topologies: compile a train step or the sampler for a pod that is
not here, from abstract shapes only, and read off memory, FLOPs, collectives and a roofline time.

`plan(cfg, "v5p-64", "grpo", batch=32, seq_len=32768)` builds `jax.ShapeDtypeStruct`s with their
`NamedSharding`s on a compile-only TPU topology from libtpu (`jax.experimental.topologies`); no
parameter is ever allocated. It lowers and compiles:

- `grpo`: one GRPO train step: `value_and_grad` of `train.step.microbatch_loss` (the clipped
  policy-gradient objective) on one packed microbatch of `batch` rows of `seq_len` tokens, then
  the trainer's guarded AdamW update (gradient clipping, skip on a non-finite loss or gradient),
  parameters and optimizer state donated, in one program;
- `sample`: the sampler's two programs: the prefill of `batch` prompts into a KV cache of
  `seq_len` slots (`sampling.sampler._prefill`) and the decode loop (`_decode`, state donated).

From the compiled executable it reports, per chip: memory (`memory_analysis()`: arguments,
outputs, temporaries, peak) against the chip's HBM; FLOPs; HBM traffic; the collectives in the
HLO. XLA's `cost_analysis()` counts the body of every loop once (a 40-layer scan as one layer), so
FLOPs and traffic are counted here from the optimized HLO itself (`hlo_costs`), each loop body
multiplied by its trip count (read from the loop's condition, initial value and increment) and
each conditional at its costliest branch: FLOPs of the matmuls (dot and convolution instructions),
and HBM traffic as the bytes each top-level instruction reads and writes in HBM (buffers XLA placed
in on-chip memory excluded, slices counted at their size). XLA's own figures are reported beside.

The step time is a roofline estimate: max(matmul FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth)
per chip, at the published peaks of `CHIPS`. Communication, latency and imperfect overlap are not
in it; a real step is slower. MFU is the model FLOPs (6 x parameters x tokens for a train step,
2 x parameters x tokens for sampling; parameters: those a token's matmuls use, the input embedding
table excluded) over chips x peak x estimated step time.

Needs libtpu (`pip install -e '.[tpu]'`); it runs on a CPU-only machine, preferably with
`JAX_PLATFORMS=cpu` (the `magistral-jax plan` command sets it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magistral_jax.config import ModelConfig

GiB = 2**30
TASKS = ("grpo", "sample")


# --------------------------------------------------------------------------------------------
# Chips and topologies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    """Published per-chip figures of one TPU generation."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


# Source: Google Cloud TPU documentation, "System architecture" table of each generation, read on
# 2026-11-29: https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps),
# https://cloud.google.com/tpu/docs/v5e (197 TFLOPs; 16 GB, 819 GBps),
# https://cloud.google.com/tpu/docs/v5p (459 TFLOPs; 95 GiB, 2765 GBps),
# https://cloud.google.com/tpu/docs/v6e (918 TFLOPs; 32 GB, 1638 GBps).
# Capacities are taken as GiB (what the chips carry; XLA's own out-of-memory check on v5p allows
# 95.74 GiB).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9),
}

# Slice name -> chip grid, as Cloud TPU names them (v4-N / v5p-N: N TensorCores = N/2 chips;
# v5e-N / v6e-N: N chips).
_GRIDS: dict[str, dict[int, str]] = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
TOPOLOGIES: dict[str, str] = {
    f"{gen}-{n}": f"{gen}:{grid}" for gen, grids in _GRIDS.items() for n, grid in grids.items()
}


@dataclass(frozen=True)
class Topology:
    name: str  # e.g. v5p-64
    libtpu_name: str  # e.g. v5p:2x4x4
    chip: Chip
    chips: int


def topology(name: str) -> Topology:
    """The named slice (`v5p-64`, `v5e-8`, ...); an unknown name raises ValueError listing the known ones."""
    if name not in TOPOLOGIES:
        known = ", ".join(TOPOLOGIES)
        raise ValueError(f"topology: unknown TPU slice {name!r}; known: {known}")
    gen = name.split("-")[0]
    grid = TOPOLOGIES[name].split(":")[1]
    return Topology(name, TOPOLOGIES[name], CHIPS[gen], math.prod(int(d) for d in grid.split("x")))


def _quiet_libtpu(name: str) -> None:
    # Several processes may compile at once (pytest -n 2): without this libtpu refuses a second
    # load over its lock file. Off a TPU VM, these stop libtpu's start-up probes and warnings.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@functools.cache
def topology_devices(name: str) -> tuple:
    """Compile-only devices of the named slice, one per chip."""
    from jax.experimental import topologies

    topo = topology(name)
    if not libtpu_available():
        raise ValueError("plan: TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'")
    _quiet_libtpu(name)
    kwargs: dict[str, Any] = {}
    if topo.chip.name in ("v4", "v5p"):
        kwargs["chip_config_name"] = "megacore"  # one device per chip, both TensorCores
    if topo.chips == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    devices = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu", **kwargs).devices
    if len(devices) != topo.chips:
        raise ValueError(f"topology {name}: libtpu gave {len(devices)} devices for {topo.chips} chips")
    return tuple(devices)


# --------------------------------------------------------------------------------------------
# HLO costs with loop trip counts
# --------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (or whose work is counted where it happens).
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "iota",
    "copy-done",
    "async-done",
    "async-update",
    "send-done",
    "recv-done",
    *(f"{c}-done" for c in COLLECTIVES),
}


@dataclass
class _Instr:
    name: str
    shape: str
    op: str
    args: str  # the text between the opcode's parentheses
    operands: list[str]
    attrs: str
    root: bool


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start` (any of (), {}, [])."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("HLO text: unbalanced brackets")


def _parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """Computations (name -> instructions) of an HLO module's text, and the entry's name."""
    comps: dict[str, list[_Instr]] = {}
    entry = ""
    current: list[_Instr] | None = None
    for line in text.splitlines():
        if not line.startswith(" "):
            if line.endswith("{") and (line.startswith("%") or line.startswith("ENTRY")):
                words = line.split()
                name = words[1 if words[0] == "ENTRY" else 0].lstrip("%")
                current = comps.setdefault(name, [])
                if words[0] == "ENTRY":
                    entry = name
            elif line.startswith("}"):
                current = None
            continue
        if current is None:
            continue
        s = line.strip()
        root = s.startswith("ROOT ")
        if root:
            s = s[5:]
        eq = s.find(" = ")
        if not s.startswith("%") or eq < 0:
            continue
        name, rest = s[1:eq], s[eq + 3 :]
        if rest.startswith("("):
            end = _closing(rest, 0)
            shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        paren = rest.find("(")
        if paren < 0:
            continue
        end = _closing(rest, paren)
        args = rest[paren + 1 : end]
        current.append(_Instr(name, shape, rest[:paren], args, re.findall(r"%([\w.\-]+)", args), rest[end + 1 :], root))
    return comps, entry


def _arrays(shape: str) -> list[tuple[str, list[int], str]]:
    return [
        (m.group(1), [int(d) for d in m.group(2).split(",") if d], m.group(3) or "") for m in _ARRAY.finditer(shape)
    ]


def _bytes(shape: str, hbm_only: bool = True) -> int:
    """Bytes of a shape (tuples summed); with `hbm_only`, arrays placed in another memory space
    than HBM (layout `S(n)`, n > 0: on-chip memory) count zero."""
    total = 0
    for dtype, dims, layout in _arrays(shape):
        if hbm_only and re.search(r"S\([1-9]", layout):
            continue
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(dims)
    return total


def _dims(shape: str) -> list[int]:
    arrays = _arrays(shape)
    return arrays[0][1] if arrays else []


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=", attrs)
    if not m:
        return None
    start = m.end()
    if start < len(attrs) and attrs[start] == "{":
        return attrs[start + 1 : _closing(attrs, start)]
    end = start
    while end < len(attrs) and attrs[end] not in ", ":
        end += 1
    return attrs[start:end]


def _called(attrs: str, key: str) -> list[str]:
    value = _attr(attrs, key)
    return re.findall(r"%?([\w.\-]+)", value) if value else []


@dataclass
class HloCosts:
    """Per-chip costs of one execution of a compiled program.

    Attributes:
      flops: matmul FLOPs (dot and convolution instructions, 2 per multiply-add); elementwise
        work is left out (it is small beside the matmuls and runs on other units).
      hbm_bytes: bytes read and written in HBM by the top-level instructions (fusions, copies,
        collectives, ...), slices counted at the size of the slice.
      collectives: per kind: `ops` (instructions in the HLO), `executed` (executions, loops
        unrolled) and `bytes` (their output bytes, executed).
      loops: while loops in the program; `unknown_trip_loops`: those whose trip count could not be
        read (a data-dependent loop), counted at the trip count `hlo_costs` was told or once.
      custom_calls: TPU kernels written in Pallas/Mosaic (`tpu_custom_call`), whose FLOPs are not
        counted.
    """

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)
    loops: int = 0
    unknown_trip_loops: int = 0
    custom_calls: int = 0

    def add(self, other: HloCosts, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, c in other.collectives.items():
            mine = self.collectives.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})
            mine["executed"] += times * c["executed"]
            mine["bytes"] += times * c["bytes"]


def _collective_kind(i: _Instr) -> str | None:
    return next((c for c in COLLECTIVES if i.op in (c, f"{c}-start")), None)


def _count_collective(into: dict[str, dict[str, float]], i: _Instr) -> None:
    kind = _collective_kind(i)
    if kind is None:
        return
    c = into.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})
    c["executed"] += 1
    arrays = _arrays(i.shape)
    if i.op.endswith("-start") and len(arrays) > 1:  # (operands..., results...): count the largest
        c["bytes"] += max(_DTYPE_BYTES.get(d, 4) * math.prod(dims) for d, dims, _ in arrays)
    else:
        c["bytes"] += _bytes(i.shape, hbm_only=False)


class _Module:
    def __init__(self, text: str, unknown_trips: Callable[[str], float] | None):
        self.comps, self.entry = _parse_hlo(text)
        self.instr = {i.name: i for comp in self.comps.values() for i in comp}
        self.users: dict[str, list[_Instr]] = {}
        for comp in self.comps.values():
            for i in comp:
                for o in i.operands:
                    self.users.setdefault(o, []).append(i)
        self.unknown_trips = unknown_trips
        self.loops = 0
        self.unknown = 0
        self._memo: dict[str, HloCosts] = {}
        self._flops_memo: dict[str, float] = {}
        self._fused_collectives_memo: dict[str, dict[str, dict[str, float]]] = {}

    # -- values ------------------------------------------------------------------------------

    def _source(self, name: str) -> _Instr | None:
        i = self.instr.get(name)
        hops = 0
        while i is not None and i.op in ("copy", "bitcast", "convert", "reshape") and i.operands and hops < 16:
            i = self.instr.get(i.operands[0])
            hops += 1
        return i

    def _const(self, name: str) -> int | None:
        i = self._source(name)
        if i is not None and i.op == "constant":
            m = re.fullmatch(r"\s*(-?\d+)\s*", i.args)
            if m:
                return int(m.group(1))
        return None

    def _tuple_index(self, name: str) -> int | None:
        """k when `name` is element k of its computation's (tuple) parameter."""
        i = self._source(name)
        if i is not None and i.op == "get-tuple-element" and i.operands:
            src = self.instr.get(i.operands[0])
            if src is not None and src.op == "parameter":
                m = re.search(r"index=(\d+)", i.attrs)
                return int(m.group(1)) if m else None
        return None

    def _compare(self, comp: str) -> tuple[str, list[str]] | None:
        """(direction, operand names in `comp`) of the comparison a loop condition returns."""
        root = next((i for i in self.comps.get(comp, []) if i.root), None)
        if root is None:
            return None
        if root.op == "compare":
            return _attr(root.attrs, "direction") or "", root.operands
        if root.op == "fusion":
            inner = _called(root.attrs, "calls")
            inner_root = next((i for i in self.comps.get(inner[0], []) if i.root), None) if inner else None
            if inner_root is None or inner_root.op != "compare":
                return None
            mapped = []
            for o in inner_root.operands:
                p = self.instr.get(o)
                m = re.fullmatch(r"\s*(\d+)\s*", p.args) if p is not None and p.op == "parameter" else None
                if m is None:
                    return None
                mapped.append(root.operands[int(m.group(1))])
            return _attr(inner_root.attrs, "direction") or "", mapped
        return None

    def trip_count(self, loop: _Instr) -> float | None:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
        if known:
            return float(known.group(1))
        cond, body = _called(loop.attrs, "condition"), _called(loop.attrs, "body")
        cmp_ = self._compare(cond[0]) if cond else None
        if cmp_ is None or len(cmp_[1]) != 2 or not body:
            return None
        direction, (a, b) = cmp_
        index, bound = self._tuple_index(a), self._const(b)
        if index is None or bound is None:
            index, bound = self._tuple_index(b), self._const(a)
            direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
        if index is None or bound is None:
            return None
        init_tuple = self.instr.get(loop.operands[0]) if loop.operands else None
        if init_tuple is None or init_tuple.op != "tuple" or index >= len(init_tuple.operands):
            return None
        init = self._const(init_tuple.operands[index])
        body_root = next((i for i in self.comps.get(body[0], []) if i.root), None)
        if init is None or body_root is None or body_root.op != "tuple":
            return None
        step_instr = self._source(body_root.operands[index])
        step = None
        if step_instr is not None and step_instr.op in ("add", "subtract") and len(step_instr.operands) == 2:
            x, y = step_instr.operands
            if self._tuple_index(x) == index and self._const(y) is not None:
                step = self._const(y) * (1 if step_instr.op == "add" else -1)
        if not step:
            return None
        if direction == "LT":
            return float(max(0, math.ceil((bound - init) / step)))
        if direction == "LE":
            return float(max(0, (bound - init) // step + 1))
        if direction == "GT":
            return float(max(0, math.ceil((init - bound) / -step)))
        if direction == "GE":
            return float(max(0, (init - bound) // -step + 1))
        if direction == "NE" and (bound - init) % step == 0:
            return float(max(0, (bound - init) // step))
        return None

    # -- FLOPs -------------------------------------------------------------------------------

    def _dot_flops(self, i: _Instr) -> float:
        lhs = self.instr.get(i.operands[0]) if i.operands else None
        if lhs is None:
            return 0.0
        dims = _dims(lhs.shape)
        contracting = [int(d) for d in (_attr(i.attrs, "lhs_contracting_dims") or "").split(",") if d.strip()]
        k = math.prod(dims[d] for d in contracting if d < len(dims))
        return 2.0 * math.prod(_dims(i.shape)) * k

    def _conv_flops(self, i: _Instr) -> float:
        # As XLA's HloCostAnalysis: 2 x output features x input features per group x batch per
        # group x, per spatial dimension, the (output, kernel) position pairs that read a real
        # (not padding, not dilation hole) input element.
        if len(i.operands) < 2:
            return 0.0
        lhs, rhs = self.instr.get(i.operands[0]), self.instr.get(i.operands[1])
        labels = _attr(i.attrs, "dim_labels")
        if lhs is None or rhs is None or not labels or "->" not in labels:
            return 0.0
        lhs_l, rest = labels.split("_", 1)
        rhs_l, out_l = rest.split("->")
        in_dims, k_dims, out_dims = _dims(lhs.shape), _dims(rhs.shape), _dims(i.shape)
        if len(in_dims) != len(lhs_l) or len(k_dims) != len(rhs_l) or len(out_dims) != len(out_l):
            return 0.0
        groups = int(_attr(i.attrs, "feature_group_count") or 1)
        batch_groups = int(_attr(i.attrs, "batch_group_count") or 1)
        in_feature = in_dims[lhs_l.index("f")]
        out_feature = out_dims[out_l.index("f")]
        batch = in_dims[lhs_l.index("b")]
        window = _attr(i.attrs, "window") or ""
        w = dict(re.findall(r"(\w+)=([\w_x\-]+)", window))

        def per_dim(key: str, n: int, default: str) -> list[str]:
            return w[key].split("x") if key in w else [default] * n

        spatial = sorted(c for c in lhs_l if c.isdigit())
        n = len(spatial)
        strides = [int(s) for s in per_dim("stride", n, "1")]
        pads = [tuple(int(p) for p in s.split("_")) for s in per_dim("pad", n, "0_0")]
        lhs_dil = [int(s) for s in per_dim("lhs_dilate", n, "1")]
        rhs_dil = [int(s) for s in per_dim("rhs_dilate", n, "1")]
        valid = 1
        for d, c in enumerate(spatial):
            size_in = in_dims[lhs_l.index(c)]
            size_k = k_dims[rhs_l.index(c)]
            size_out = out_dims[out_l.index(c)]
            count = 0
            for o in range(size_out):
                for kk in range(size_k):
                    x = o * strides[d] - pads[d][0] + kk * rhs_dil[d]
                    if x >= 0 and x % lhs_dil[d] == 0 and x // lhs_dil[d] < size_in:
                        count += 1
            valid *= count
        return 2.0 * (in_feature // groups) * out_feature * (batch // batch_groups) * valid

    def _flops_of(self, comp: str) -> float:
        """Matmul FLOPs inside a fused (or async) computation, nested ones included."""
        if comp in self._flops_memo:
            return self._flops_memo[comp]
        total = 0.0
        for i in self.comps.get(comp, []):
            if i.op == "dot":
                total += self._dot_flops(i)
            elif i.op == "convolution":
                total += self._conv_flops(i)
            for callee in _called(i.attrs, "calls"):
                total += self._flops_of(callee)
        self._flops_memo[comp] = total
        return total

    def _fused_collectives(self, comp: str) -> dict[str, dict[str, float]]:
        """Collectives inside a fused (or async) computation, nested ones included."""
        if comp in self._fused_collectives_memo:
            return self._fused_collectives_memo[comp]
        out: dict[str, dict[str, float]] = {}
        for i in self.comps.get(comp, []):
            _count_collective(out, i)
            for callee in _called(i.attrs, "calls"):
                for kind, c in self._fused_collectives(callee).items():
                    mine = out.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})
                    mine["executed"] += c["executed"]
                    mine["bytes"] += c["bytes"]
        self._fused_collectives_memo[comp] = out
        return out

    # -- bytes -------------------------------------------------------------------------------

    def _read_bytes(self, name: str, shape: str) -> float:
        """Bytes a fused computation reads of its value `name`: the slices taken of it when it is
        only sliced (or written in place), the whole value otherwise."""
        users = self.users.get(name, [])
        if not users:
            return 0.0
        total = 0.0
        for u in users:
            if u.op in ("dynamic-slice", "slice") and u.operands[0] == name:
                total += _bytes(u.shape)
            elif u.op == "dynamic-update-slice" and u.operands[0] == name:
                continue  # updated in place
            elif u.op in ("bitcast", "reshape"):
                total += self._read_bytes(u.name, u.shape)
            elif u.op == "fusion" and _called(u.attrs, "calls"):
                # A nested fusion: what it reads of the parameters it receives this value as.
                params = self._params(_called(u.attrs, "calls")[0])
                total += sum(
                    self._read_bytes(params[k].name, params[k].shape) if k in params else _bytes(shape)
                    for k, o in enumerate(u.operands)
                    if o == name
                )
            else:
                return float(_bytes(shape))
        return min(total, float(_bytes(shape)))

    def _written_bytes(self, root: _Instr | None, shape: str) -> float:
        if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
            update = self.instr.get(root.operands[1])
            return float(_bytes(update.shape)) if update is not None else 0.0
        if root is not None and root.op == "tuple":
            return sum(self._written_bytes(self.instr.get(o), self.instr[o].shape) for o in root.operands)
        return float(_bytes(shape))

    def _params(self, comp: str) -> dict[int, _Instr]:
        params = {}
        for p in self.comps.get(comp, []):
            if p.op == "parameter":
                m = re.fullmatch(r"\s*(\d+)\s*", p.args)
                if m:
                    params[int(m.group(1))] = p
        return params

    def _fusion_bytes(self, i: _Instr) -> float:
        callee = _called(i.attrs, "calls")
        body = self.comps.get(callee[0], []) if callee else []
        params = self._params(callee[0]) if callee else {}
        total = 0.0
        for k, o in enumerate(i.operands):
            operand = self.instr.get(o)
            if operand is None:
                continue
            if k in params:
                full = _bytes(operand.shape)
                total += min(float(full), self._read_bytes(params[k].name, params[k].shape)) if full else 0.0
            else:
                total += _bytes(operand.shape)
        root = next((x for x in body if x.root), None)
        if _bytes(i.shape) == 0:
            return total
        return total + self._written_bytes(root, i.shape)

    def _instr_bytes(self, i: _Instr) -> float:
        if i.op in _NO_TRAFFIC:
            return 0.0
        if i.op == "fusion":
            return self._fusion_bytes(i)
        if i.op == "dynamic-slice":
            return 2.0 * _bytes(i.shape)
        if i.op == "dynamic-update-slice" and len(i.operands) > 1:
            update = self.instr.get(i.operands[1])
            return 2.0 * _bytes(update.shape) if update is not None else 0.0
        operands = sum(_bytes(self.instr[o].shape) for o in i.operands if o in self.instr)
        return float(operands + _bytes(i.shape))

    # -- traversal ---------------------------------------------------------------------------

    def costs(self, comp: str) -> HloCosts:
        """Costs of one execution of a control-flow computation (the entry, a loop body, a branch)."""
        if comp in self._memo:
            return self._memo[comp]
        out = HloCosts()
        for i in self.comps.get(comp, []):
            _count_collective(out.collectives, i)
            if i.op == "while":
                self.loops += 1
                trips = self.trip_count(i)
                if trips is None:
                    self.unknown += 1
                    op_name = _attr(i.attrs, "metadata") or ""
                    trips = self.unknown_trips(op_name) if self.unknown_trips else 1.0
                for callee in _called(i.attrs, "body"):
                    out.add(self.costs(callee), trips)
                continue
            if i.op == "conditional":
                branches = _called(i.attrs, "branch_computations") or (
                    _called(i.attrs, "true_computation") + _called(i.attrs, "false_computation")
                )
                costly = max((self.costs(b) for b in branches), key=lambda c: (c.flops, c.hbm_bytes), default=None)
                if costly is not None:
                    out.add(costly)
                continue
            if i.op in ("call", "async-start"):
                for callee in _called(i.attrs, "to_apply") + _called(i.attrs, "calls"):
                    out.add(self.costs(callee))
                continue
            if i.op == "dot":
                out.flops += self._dot_flops(i)
            elif i.op == "convolution":
                out.flops += self._conv_flops(i)
            elif i.op == "fusion":
                for callee in _called(i.attrs, "calls"):
                    out.flops += self._flops_of(callee)
                    out.add(HloCosts(collectives=self._fused_collectives(callee)))
            out.hbm_bytes += self._instr_bytes(i)
        self._memo[comp] = out
        return out


def hlo_costs(text: str, unknown_trips: Callable[[str], float] | None = None) -> HloCosts:
    """Per-chip FLOPs, HBM traffic and collectives of one execution of an optimized HLO module
    (`compiled.as_text()`), loops unrolled (see `HloCosts`). `unknown_trips(metadata)` gives the
    trip count to assume for a loop whose count is data-dependent (default: once)."""
    module = _Module(text, unknown_trips)
    out = HloCosts()
    out.add(module.costs(module.entry))
    out.custom_calls = sum(
        1 for comp in module.comps.values() for i in comp if 'custom_call_target="tpu_custom_call"' in i.attrs
    )
    for comp in module.comps.values():
        for i in comp:
            kind = _collective_kind(i)
            if kind is not None:
                out.collectives.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})["ops"] += 1
    out.loops, out.unknown_trip_loops = module.loops, module.unknown
    return out


# --------------------------------------------------------------------------------------------
# Programs from abstract shapes
# --------------------------------------------------------------------------------------------

# What the train step is compiled with (configs/grpo-magistral-small.yaml): the objective and
# optimizer settings change no shape, only the chunk of the log-probability head does.
GRPO_OBJECTIVE = dict(kind="pg", eps_low=0.2, eps_high=0.3, kl_coef=0.0, temperature=1.0)
LOGPROB_CHUNK = 512


DEFAULT_PROMPT_LEN = 1024
STOP_IDS = (2,)


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(every parameter, the parameters of a token's matmuls: the text decoder without its input
    embedding table, which is a lookup)."""
    from magistral_jax.model import decoder, param_specs
    from magistral_jax.model import params as P

    text = P.count(decoder.param_specs(cfg.text))
    return P.count(param_specs(cfg)), text - cfg.text.vocab_size * cfg.text.dim


def _abstract_params(cfg: ModelConfig, mesh):
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P

    specs = param_specs(cfg)
    return P.abstract(specs, cfg.param_dtype, mesh, cfg.rules), P.shardings(specs, mesh, cfg.rules)


def grpo_step_program(cfg: ModelConfig, mesh, batch: int, seq_len: int, chunk: int = LOGPROB_CHUNK):
    """(jitted step, abstract arguments, static keywords) of one GRPO train step on a packed [batch, seq_len]
    microbatch: loss and gradients, then the trainer's update, as `Trainer.train_step` does (there
    in two programs, here fused), parameters and optimizer state donated."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from magistral_jax.sharding import logical_sharding
    from magistral_jax.train.packing import FIELDS
    from magistral_jax.train.step import Objective, OptimizerConfig, guarded_update, make_optimizer, microbatch_loss

    params, shardings = _abstract_params(cfg, mesh)
    tx, _ = make_optimizer(OptimizerConfig(lr=1e-6, weight_decay=0.1, b2=0.95, grad_clip=1.0), total_steps=1000)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = optax.tree_map_params(
        tx,
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        shardings,
        transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    )
    rows = logical_sharding(mesh, ("batch", "act_seq"), cfg.rules, (batch, seq_len))
    mb = {n: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows) for n in ("tokens", "targets")}
    mb |= {n: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows) for n in ("segment_ids", "positions")}
    mb |= {n: jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=rows) for n in FIELDS}
    loss_and_grads = jax.value_and_grad(
        functools.partial(microbatch_loss, cfg=cfg, objective=Objective(**GRPO_OBJECTIVE), chunk=chunk), has_aux=True
    )

    def step(params, opt_state, mb):
        (loss, stats), grads = loss_and_grads(params, mb)
        params, opt_state, _, grad_norm = guarded_update(tx, params, opt_state, grads, loss)
        return params, opt_state, loss, stats, grad_norm

    out_shardings = (shardings, jax.tree.map(lambda x: x.sharding, state), None, None, None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings), (params, state, mb), {}


def prefill_program(cfg: ModelConfig, mesh, batch: int, cache_len: int, prompt_len: int):
    """(jitted prefill, abstract arguments, static keywords): `batch` prompts of `prompt_len` tokens into a KV
    cache of `cache_len` slots, one sample each (`sampling.sampler._prefill`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from magistral_jax.sampling.sampler import _prefill
    from magistral_jax.sharding import logical_sharding

    params, _ = _abstract_params(cfg, mesh)
    prompts = jax.ShapeDtypeStruct(
        (batch, prompt_len),
        jnp.int32,
        sharding=logical_sharding(mesh, ("batch", "act_seq"), cfg.rules, (batch, prompt_len)),
    )
    lengths = jax.ShapeDtypeStruct(
        (batch,), jnp.int32, sharding=logical_sharding(mesh, ("batch",), cfg.rules, (batch,))
    )
    key_type = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_type.shape, key_type.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    static = dict(cfg=cfg, n=1, cache_len=cache_len, max_new=cache_len - prompt_len)
    return _prefill, (params, prompts, lengths, key, None), static


def decode_program(cfg: ModelConfig, mesh, state):
    """(jitted decode loop, abstract arguments, static keywords) over the prefill's `state` (ShapeDtypeStructs with
    shardings), Magistral sampling (temperature 0.7, top-p 0.95), state donated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from magistral_jax.sampling.sampler import _decode
    from magistral_jax.sampling.strategies import MAGISTRAL

    params, _ = _abstract_params(cfg, mesh)
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return _decode, (params, state, limit), dict(cfg=cfg, sampling=MAGISTRAL, stop_ids=STOP_IDS)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ProgramResult:
    """One compiled program. Memory in bytes per chip; `flops` and `hbm_bytes` per execution
    per chip (see `HloCosts`); `executions` per step (the decode step runs once per new token)."""

    name: str
    compile_s: float
    fits: bool
    error: str | None = None
    required_bytes: int | None = None  # from XLA's out-of-memory message, when it has one
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    xla_flops: float = 0.0
    xla_bytes_accessed: float = 0.0
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)
    loops: int = 0
    unknown_trip_loops: int = 0
    custom_calls: int = 0
    executions: float = 1.0


@dataclass
class PlanResult:
    """What `plan` found. Bytes and FLOPs are per chip unless named `model_`; times in seconds.
    The step time is a roofline estimate (see the module docstring), not a measurement. `tokens`:
    trained tokens of a train step, generated tokens of a sampler run (prefill and every decode
    step); `flops` and `hbm_bytes` add up every program's executions in that step or run."""

    config: str
    task: str
    topology: str
    libtpu_topology: str
    chip: str
    chips: int
    mesh: dict[str, int]
    batch: int
    seq_len: int
    prompt_len: int | None
    remat: str
    attention: str
    attention_block: int
    param_dtype: str
    dtype: str
    params: int
    matmul_params: int
    hbm_capacity_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    programs: list[ProgramResult]
    fits: bool
    peak_bytes: int
    tokens: int
    flops: float
    hbm_bytes: float
    model_flops: float
    compute_s: float
    memory_s: float
    step_s: float
    bound: str
    mfu: float
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _required_bytes(message: str) -> int | None:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)", message) or re.search(
        r"Used ([\d.]+)([KMGT]?)i?B? of", message
    )
    return int(float(m.group(1)) * units[m.group(2)]) if m else None


def _compile(
    name: str, program, mesh, hbm: int, unknown_trips=None, dump_hlo: str | None = None
) -> tuple[ProgramResult, Any]:
    """Lowers and compiles `program` = (jitted function, abstract arguments, static keywords)."""
    import jax

    jitted, args, static = program
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args, **static)
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA reports running out of HBM as an error at compile time
            message = str(e)
            if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
                raise
            first = message.strip().splitlines()[0]
            return ProgramResult(name, time.perf_counter() - start, False, first, _required_bytes(message)), None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else (xla or {})
    text = compiled.as_text()
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    costs = hlo_costs(text, unknown_trips)
    result = ProgramResult(
        name,
        seconds,
        fits=int(mem.peak_memory_in_bytes) <= hbm,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=int(mem.peak_memory_in_bytes),
        flops=costs.flops,
        hbm_bytes=costs.hbm_bytes,
        xla_flops=float(xla.get("flops", 0.0)),
        xla_bytes_accessed=float(xla.get("bytes accessed", 0.0)),
        collectives=costs.collectives,
        loops=costs.loops,
        unknown_trip_loops=costs.unknown_trip_loops,
        custom_calls=costs.custom_calls,
    )
    return result, compiled


def _mesh_sizes(mesh: str | dict[str, int] | None, chips: int) -> dict[str, int]:
    from magistral_jax.sharding import parse_mesh

    given = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh or {})
    unknown = set(given) - {"data", "fsdp", "tensor"}
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are data, fsdp and tensor")
    sizes = {"data": 1, "fsdp": -1, "tensor": 1} | given
    free = [k for k, v in sizes.items() if v == -1]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: {sizes}: positive sizes expected (one may be -1)")
    if free:
        if chips % fixed:
            raise ValueError(f"mesh: {chips} chips cannot be split as {sizes}")
        sizes[free[0]] = chips // fixed
    if math.prod(sizes.values()) != chips:
        raise ValueError(
            f"mesh: data x fsdp x tensor = {math.prod(sizes.values())}, but the topology has {chips} chips"
        )
    return {a: int(sizes.get(a, 1)) for a in ("data", "fsdp", "tensor")}


def plan(
    cfg: ModelConfig,
    topology_name: str,
    task: str,
    batch: int,
    seq_len: int,
    *,
    mesh: str | dict[str, int] | None = None,
    remat: str | None = None,
    param_dtype: str | None = None,
    attention: str = "chunked",
    attention_block: int | None = None,
    prompt_len: int | None = None,
    chunk: int = LOGPROB_CHUNK,
    dump_hlo: str | None = None,
) -> PlanResult:
    """Compiles `task` (`grpo`: one train step on `batch` sequences of `seq_len` tokens; `sample`:
    prefill and decode of `batch` prompts with a `seq_len`-slot KV cache) for `cfg` on the named
    TPU slice, from abstract shapes, and returns its memory, costs and roofline step time.

    Args:
      mesh: `data=..,fsdp=..,tensor=..` (or a dict); default: every chip on `fsdp`.
      remat: rematerialisation policy of the train step (default: the config's).
      param_dtype: parameter (and optimizer state) dtype; default float32 master weights for
        `grpo` (as the training configs), bfloat16 for `sample` (as `load_model`).
      attention: attention implementation (default `chunked`, whose memory grows linearly with
        the sequence; `xla` materialises the whole score matrix). `splash` is refused off a TPU
        host: there the model runs the Pallas kernel in its interpreter, not what a TPU would run.
      attention_block: block of the chunked attention (default: the config's).
      prompt_len: `sample` only: prompt tokens (default min(1024, seq_len / 2)).
      chunk: `grpo` only: sequence chunk of the log-probability head.
      dump_hlo: a directory to write each program's optimized HLO to (`<program>.hlo.txt`).
    """
    import jax

    from magistral_jax.config import REMAT_POLICIES
    from magistral_jax.sharding import make_mesh

    if task not in TASKS:
        raise ValueError(f"task: {task!r}; expected one of {TASKS}")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch and seq_len must be positive (seq_len >= 2), got {batch} and {seq_len}")
    if remat is not None and remat not in REMAT_POLICIES:
        raise ValueError(f"remat: {remat!r}; expected one of {REMAT_POLICIES}")
    topo = topology(topology_name)
    sizes = _mesh_sizes(mesh, topo.chips)
    devices = topology_devices(topology_name)
    jmesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=list(devices))
    if attention in ("splash", "auto") and jax.default_backend() != "tpu":
        raise ValueError(
            f"attention: {attention!r} resolves off a TPU host to a different program than a TPU runs "
            "(splash's Pallas interpreter); plan with chunked or xla"
        )
    changes: dict[str, Any] = {"attention": attention}
    if attention_block is not None:
        changes["attention_block"] = attention_block
    if remat is not None:
        changes["remat"] = remat
    changes["param_dtype"] = param_dtype or ("float32" if task == "grpo" else "bfloat16")
    cfg = cfg.replace(**changes)
    total_params, matmul_params = param_counts(cfg)
    hbm = topo.chip.hbm_bytes
    notes: list[str] = []
    programs: list[ProgramResult] = []
    if task == "grpo":
        if seq_len > cfg.text.max_position_embeddings:
            raise ValueError(f"seq_len {seq_len} exceeds the model's context of {cfg.text.max_position_embeddings}")
        result, _ = _compile(
            "train_step", grpo_step_program(cfg, jmesh, batch, seq_len, chunk), jmesh, hbm, dump_hlo=dump_hlo
        )
        programs.append(result)
        prompt = None
        tokens = batch * seq_len
        model_flops = 6.0 * matmul_params * tokens
    else:
        prompt = prompt_len if prompt_len is not None else min(DEFAULT_PROMPT_LEN, seq_len // 2)
        if not 1 <= prompt < seq_len:
            raise ValueError(f"prompt_len: {prompt} must lie in [1, {seq_len}) (the cache holds prompt and completion)")
        new = seq_len - prompt
        block = cfg.attention_block
        # The cached attention loops over the filled key blocks only (a data-dependent count): the
        # prompt's in the prefill; in a decode step, on average the prompt and half the new tokens.
        prefill_blocks = math.ceil(prompt / block)
        mean_blocks = math.ceil((prompt + new / 2) / block)
        guessed: list[str] = []

        def trips(blocks: int, outer: str | None = None) -> Callable[[str], float]:
            def count(metadata: str) -> float:
                if "/attention/while" in metadata:
                    return float(blocks)
                if outer is not None and f"{outer}/while" in metadata:
                    return 1.0
                guessed.append(metadata)
                return 1.0

            return count

        prefill = prefill_program(cfg, jmesh, batch, seq_len, prompt)
        result, compiled = _compile("prefill", prefill, jmesh, hbm, trips(prefill_blocks), dump_hlo)
        programs.append(result)
        if compiled is not None:
            fn, args, static = prefill
            with jax.set_mesh(jmesh):
                shapes = jax.eval_shape(functools.partial(fn, **static), *args)
            state = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, compiled.output_shardings
            )
            decode = decode_program(cfg, jmesh, state)
            dresult, _ = _compile("decode_step", decode, jmesh, hbm, trips(mean_blocks, outer="jit(_decode)"), dump_hlo)
            dresult.executions = float(new)
            programs.append(dresult)
            notes.append(
                f"decode_step: one step of the decode loop, run once per new token ({new}); the cached "
                f"attention reads the filled key blocks only: counted at {prefill_blocks} block(s) of "
                f"{block} in the prefill and {mean_blocks} (the mean filled cache) per decode step"
            )
        if guessed:
            notes.append(f"{len(guessed)} loop(s) with a data-dependent trip count were counted once")
        tokens = batch * new  # generated
        model_flops = 2.0 * matmul_params * batch * seq_len
    fits = all(p.fits for p in programs) and len(programs) == (1 if task == "grpo" else 2)
    flops = sum(p.flops * p.executions for p in programs)
    traffic = sum(p.hbm_bytes * p.executions for p in programs)
    compute_s = flops / topo.chip.peak_flops
    memory_s = traffic / topo.chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    if task == "grpo" and any(p.unknown_trip_loops for p in programs):
        notes.append("some loops have data-dependent trip counts and were counted once")
    if any(p.custom_calls for p in programs):
        notes.append("the HLO calls Pallas (Mosaic) kernels; their FLOPs and traffic are not counted")
    return PlanResult(
        config=cfg.name,
        task=task,
        topology=topo.name,
        libtpu_topology=topo.libtpu_name,
        chip=topo.chip.name,
        chips=topo.chips,
        mesh=sizes,
        batch=batch,
        seq_len=seq_len,
        prompt_len=prompt,
        remat=cfg.remat if task == "grpo" else NO_REMAT,
        attention=cfg.attention,
        attention_block=cfg.attention_block,
        param_dtype=cfg.param_dtype,
        dtype=cfg.dtype,
        params=total_params,
        matmul_params=matmul_params,
        hbm_capacity_bytes=hbm,
        peak_flops=topo.chip.peak_flops,
        hbm_bandwidth=topo.chip.hbm_bandwidth,
        programs=programs,
        fits=fits,
        peak_bytes=max((p.peak_bytes or p.required_bytes or 0) for p in programs),
        tokens=tokens,
        flops=flops,
        hbm_bytes=traffic,
        model_flops=model_flops,
        compute_s=compute_s if fits else 0.0,
        memory_s=memory_s if fits else 0.0,
        step_s=step_s if fits else 0.0,
        bound=("compute" if compute_s >= memory_s else "memory") if fits else "",
        mfu=model_flops / (topo.chips * topo.chip.peak_flops * step_s) if fits and step_s else 0.0,
        tokens_per_s=tokens / step_s if fits and step_s else 0.0,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------

# From the least memory to the most: if one does not fit, the later ones do not either.
REMAT_ORDER = ("full", "save_qkv", "save_matmuls", "none")
SEARCH_TENSOR = (1, 2, 4, 8)
NO_REMAT = "-"  # sampling: no backward pass, nothing to rematerialise


@dataclass
class Candidate:
    """One (mesh, remat) tried by `search`: its plan, or why it was skipped without compiling."""

    mesh: dict[str, int]
    remat: str
    result: PlanResult | None = None
    skipped: str | None = None

    @property
    def fits(self) -> bool:
        return self.result is not None and self.result.fits


def search_space(chips: int, task: str, tensor: Sequence[int] = SEARCH_TENSOR) -> list[tuple[dict[str, int], str]]:
    """Every split of `chips` over data x fsdp x tensor (tensor in `tensor`, data a power of two),
    with every remat policy for a train step (sampling has no backward pass: `NO_REMAT`)."""
    remats = REMAT_ORDER if task == "grpo" else (NO_REMAT,)
    space = []
    for t in tensor:
        if chips % t:
            continue
        rest = chips // t
        data = 1
        while data <= rest:
            if rest % data == 0:
                space.extend(({"data": data, "fsdp": rest // data, "tensor": t}, remat) for remat in remats)
            data *= 2
    return space


def _rank(remat: str) -> int:
    return REMAT_ORDER.index(remat) if remat in REMAT_ORDER else 0


def search(
    cfg: ModelConfig,
    topology_name: str,
    task: str,
    batch: int,
    seq_len: int,
    *,
    tensor: Sequence[int] = SEARCH_TENSOR,
    progress: Callable[[Candidate], None] | None = None,
    **kwargs: Any,
) -> tuple[list[Candidate], Candidate | None]:
    """Plans the candidates of `search_space` and returns them all and the fastest (by the
    roofline estimate) that fits, or None. `kwargs` go to `plan`.

    Candidates that cannot win are skipped without compiling: one that needs at least the memory
    of one that did not fit (a remat policy that saves more on the same mesh, or more data
    replicas on the same tensor split), and every data > 1 split: against data=1 with the same
    tensor split, data replicas hold more of the parameters and optimizer state per chip and do
    the same matmuls, and the estimate does not model the communication they would save.
    """
    topo = topology(topology_name)
    candidates: list[Candidate] = []
    failed: list[Candidate] = []
    for mesh, remat in search_space(topo.chips, task, tensor):
        cand = Candidate(mesh, remat)
        worse_than = next(
            (
                f
                for f in failed
                if f.mesh["tensor"] == mesh["tensor"]
                and f.mesh["data"] <= mesh["data"]
                and _rank(f.remat) <= _rank(remat)
            ),
            None,
        )
        if worse_than is not None:
            m = worse_than.mesh
            cand.skipped = f"needs more memory than data={m['data']},tensor={m['tensor']} remat {worse_than.remat}"
        elif mesh["data"] > 1:
            cand.skipped = f"data replicas: more memory, same estimate or worse than data=1,tensor={mesh['tensor']}"
        else:
            cand.result = plan(
                cfg,
                topology_name,
                task,
                batch,
                seq_len,
                mesh=mesh,
                remat=remat if task == "grpo" else None,
                **kwargs,
            )
            if not cand.result.fits:
                failed.append(cand)
        candidates.append(cand)
        if progress is not None:
            progress(cand)
    fitting = [c for c in candidates if c.fits and c.result is not None]
    best = min(fitting, key=lambda c: (c.result.step_s, c.result.peak_bytes)) if fitting else None  # type: ignore[union-attr]
    return candidates, best


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={mesh[a]}" for a in ("data", "fsdp", "tensor"))


def format_plan(r: PlanResult) -> str:
    """The human-readable report of a plan."""
    what = "GRPO train step" if r.task == "grpo" else "sampler (prefill + decode loop)"
    shape = (
        f"{r.batch} sequences x {r.seq_len} tokens"
        if r.task == "grpo"
        else f"{r.batch} prompts of {r.prompt_len} tokens, KV cache of {r.seq_len} slots"
    )
    lines = [
        f"{r.config}: {what}, {shape}",
        f"topology {r.topology}: {r.chips} x TPU {r.chip} (libtpu {r.libtpu_topology}); mesh {mesh_text(r.mesh)}",
        (f"remat {r.remat}; " if r.task == "grpo" else "")
        + f"attention {r.attention} (block {r.attention_block}); parameters {r.param_dtype}, compute {r.dtype}",
        f"parameters: {_count(r.params)} ({_count(r.matmul_params)} in each token's matmuls)",
        f"chip: {r.peak_flops / 1e12:.0f} TFLOP/s bf16, {_gib(r.hbm_capacity_bytes)} GiB HBM at "
        f"{r.hbm_bandwidth / 1e9:.0f} GB/s",
    ]
    for p in r.programs:
        lines.append(f"[{p.name}] compiled in {p.compile_s:.1f} s")
        if p.error is not None:
            need = f" (needs {_gib(p.required_bytes)} GiB)" if p.required_bytes else ""
            lines.append(f"  DOES NOT FIT: XLA: {p.error}{need}")
            continue
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(
            f"  memory per chip (GiB): arguments {_gib(p.argument_bytes)}, outputs {_gib(p.output_bytes)} "
            f"({_gib(p.alias_bytes)} aliased to donated arguments), temporaries {_gib(p.temp_bytes)}; "
            f"peak {_gib(p.peak_bytes)} of {_gib(r.hbm_capacity_bytes)} -> {verdict}"
        )
        times = f" x {p.executions:.0f} executions" if p.executions != 1 else ""
        lines.append(
            f"  per chip per execution{times}: {_si(p.flops, 'FLOP')} (matmuls, loops unrolled), "
            f"HBM traffic {_si(p.hbm_bytes, 'B')}; XLA cost_analysis (each loop body once): "
            f"{_si(p.xla_flops, 'FLOP')}, {_si(p.xla_bytes_accessed, 'B')} accessed"
        )
        coll = ", ".join(
            f"{kind} {int(c['ops'])} ops ({c['executed']:.0f} executed, {_si(c['bytes'], 'B')})"
            for kind, c in sorted(p.collectives.items())
        )
        lines.append(f"  collectives in the HLO: {coll or 'none'}")
    if not r.fits:
        lines.append(f"result: does not fit in {_gib(r.hbm_capacity_bytes)} GiB per chip on {r.topology}")
    else:
        model = "6" if r.task == "grpo" else "2"
        ratio = r.flops * r.chips / r.model_flops if r.model_flops else 0.0
        lines.append(
            f"step FLOPs: {_si(r.flops, 'FLOP')} per chip, x {r.chips} chips = {ratio:.2f} x the model's "
            f"{model}·N·tokens = {_si(r.model_flops, 'FLOP')} (N = {_count(r.matmul_params)})"
        )
        lines.append(
            f"roofline estimate (peak FLOP/s and HBM bandwidth; communication and overheads not modelled): "
            f"compute {r.compute_s:.3g} s, HBM {r.memory_s:.3g} s -> {r.step_s:.3g} s per "
            f"{'step' if r.task == 'grpo' else 'sampler run'} ({r.bound}-bound), "
            f"{r.tokens_per_s:,.0f} {'trained' if r.task == 'grpo' else 'generated'} tokens/s, MFU {100 * r.mfu:.1f}%"
        )
        lines.append(f"result: fits, peak {_gib(r.peak_bytes)} of {_gib(r.hbm_capacity_bytes)} GiB per chip")
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)


def format_search(candidates: list[Candidate], best: Candidate | None) -> str:
    """A table of every candidate and the verdict."""
    lines = [f"{'mesh':<26} {'remat':<13} {'fits':<5} {'peak GiB':>9} {'est. step s':>12} {'MFU':>6}  note"]
    for c in candidates:
        r = c.result
        if r is None:
            lines.append(f"{mesh_text(c.mesh):<26} {c.remat:<13} {'-':<5} {'':>9} {'':>12} {'':>6}  {c.skipped}")
            continue
        compiled = f"compiled in {sum(p.compile_s for p in r.programs):.0f} s"
        if r.fits:
            row = f"{'yes':<5} {_gib(r.peak_bytes):>9} {r.step_s:>12.3g} {100 * r.mfu:>5.1f}%"
        else:
            peak = _gib(r.peak_bytes) if r.peak_bytes else "?"
            row = f"{'no':<5} {peak:>9} {'':>12} {'':>6}"
        lines.append(f"{mesh_text(c.mesh):<26} {c.remat:<13} {row}  {compiled}")
    if best is None or best.result is None:
        lines.append("no candidate fits")
    else:
        lines.append(
            f"fastest that fits (roofline estimate): mesh {mesh_text(best.mesh)}, remat {best.remat}: "
            f"{best.result.step_s:.3g} s, MFU {100 * best.result.mfu:.1f}%, peak {_gib(best.result.peak_bytes)} GiB"
        )
    return "\n".join(lines)
