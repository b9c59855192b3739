"""Per-chip costs of a compiled XLA program, read from its optimized HLO text, with every loop
unrolled. This module imports no JAX: it reads text (`compiled.as_text()` or a dump).

XLA's own `cost_analysis()` counts the body of every loop once (a 40-layer scan as one layer).
Here each `while` body is multiplied by its trip count (XLA's `known_trip_count`, else read from
the loop's condition, the induction variable's initial value and its increment, following values
through the loop's tuple and into the computation that calls it) and each conditional is counted
at its costliest branch. Counted:

- FLOPs of the matmuls: `dot` and `convolution` instructions, 2 per multiply-add, and the Pallas
  (Mosaic) splash-attention kernels (see `splash_kernel_costs`); elementwise work is left out.
- HBM traffic: the bytes each top-level instruction reads and writes in HBM (buffers XLA placed
  in on-chip memory, layout `S(n)` with n > 0, excluded; slices counted at their size).
- Collectives: instructions, executions and bytes per kind.

The text format: one instruction per statement, `%name = shape opcode(operands), attributes`,
computations as `%name (params) -> shape { ... }`. A statement may span several lines: Pallas
kernels carry attributes (`frontend_attributes`, `backend_config`) with quoted strings and
newlines in them, so statements are split at newlines outside brackets and strings only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
_FLOAT_TYPES = ("f8e4m3fn", "f8e5m2", "f16", "bf16", "f32", "f64")
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
# Instructions through which a value passes unchanged (for following constants and loop bounds).
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape", "copy-start", "copy-done")


@dataclass
class Instr:
    """One HLO instruction: `name = shape op(args), attrs`."""

    name: str
    shape: str
    op: str
    args: str  # the text between the opcode's parentheses
    operands: list[str]
    attrs: str
    root: bool


def _scan(text: str, start: int = 0, depth: int = 0, quoted: bool = False, stop: bool = False):
    """Walks `text` from `start`, counting brackets (any of (), {}, []) from `depth`, those inside
    double-quoted strings (backslash escapes included) ignored. With `stop`, returns at the
    bracket that brings the depth back to 0; else at the end. Returns (index of that bracket or
    -1, depth, whether the walk ends inside a string)."""
    i = start
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if stop and depth == 0:
                return i, depth, quoted
        i += 1
    return -1, depth, quoted


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    end, _, _ = _scan(text, start, stop=True)
    if end < 0:
        raise ValueError("HLO text: unbalanced brackets")
    return end


def _statements(text: str) -> Iterator[str]:
    """The module's lines, with each instruction that spans several lines joined into one: an
    indented line continues while a bracket or a string it opened is still open."""
    pending: list[str] = []
    depth = 0
    quoted = False
    for line in text.splitlines():
        if not pending and not line.startswith(" "):
            yield line  # a computation's header or closing brace, module-level text
            continue
        pending.append(line)
        _, depth, quoted = _scan(line, 0, depth, quoted)
        if depth <= 0 and not quoted:
            yield "\n".join(pending)
            pending, depth = [], 0
    if pending:
        yield "\n".join(pending)


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations (name -> instructions) of an HLO module's text, and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    entry = ""
    current: list[Instr] | None = None
    for line in _statements(text):
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
        current.append(Instr(name, shape, rest[:paren], args, re.findall(r"%([\w.\-]+)", args), rest[end + 1 :], root))
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


def _literal(args: str) -> list[int] | None:
    """The integers of a constant's literal (`{ {0, 1}, {2, 3} }`, `5`), None when XLA elided it
    (`{...}`) or it is not integral."""
    if "..." in args:
        return None
    values = re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?|true|false", args)
    try:
        return [1 if v == "true" else 0 if v == "false" else int(v) for v in values]
    except ValueError:
        return None


@dataclass
class HloCosts:
    """Per-chip costs of one execution of a compiled program.

    Attributes:
      flops: matmul FLOPs (dot and convolution instructions and splash-attention kernels, 2 per
        multiply-add); elementwise work is left out (small beside the matmuls, other units).
      hbm_bytes: bytes read and written in HBM by the top-level instructions (fusions, copies,
        collectives, kernels, ...), slices counted at the size of the slice.
      collectives: per kind: `ops` (instructions in the HLO), `executed` (executions, loops
        unrolled) and `bytes` (their output bytes, executed).
      loops: while loops in the program; `unknown_trip_loops`: those whose trip count could not be
        read (a data-dependent loop) and that `hlo_costs`' `unknown_trips` did not know either,
        counted once.
      custom_calls: TPU kernels written in Pallas/Mosaic (`tpu_custom_call`) in the HLO;
        `uncounted_kernels`: those whose FLOPs are not counted (not a splash-attention kernel);
        `dense_kernel_masks`: splash kernels whose block mask XLA elided from the text, counted
        at every block of their grid (an upper bound).
    """

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)
    loops: int = 0
    unknown_trip_loops: int = 0
    custom_calls: int = 0
    uncounted_kernels: int = 0
    dense_kernel_masks: int = 0

    def add(self, other: HloCosts, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, c in other.collectives.items():
            mine = self.collectives.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})
            mine["executed"] += times * c["executed"]
            mine["bytes"] += times * c["bytes"]


def _collective_kind(i: Instr) -> str | None:
    return next((c for c in COLLECTIVES if i.op in (c, f"{c}-start")), None)


def _count_collective(into: dict[str, dict[str, float]], i: Instr) -> None:
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


def _is_pallas(i: Instr) -> bool:
    return i.op == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attrs


# Matmuls of [block_q, K] x [K, block_kv] per computed block, by splash kernel phase: forward
# (scores, probabilities x values), dq (scores again, dO x V^T, dS x K), dkv (scores again,
# dO x V^T, P^T x dO, dS^T x Q).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_NAME = re.compile(r"splash_(?:mqa|mha)_(fwd|dq|dkv)")


@dataclass(frozen=True)
class KernelCosts:
    flops: float
    hbm_bytes: float
    dense_mask: bool  # the block mask was not in the text: every block of the grid counted


def splash_kernel_costs(
    phase: str,
    floats: list[tuple[str, list[int]]],
    once_bytes: int,
    block_q: int,
    block_kv: int,
    block_mask: tuple[list[int], list[int]] | None,
) -> KernelCosts:
    """FLOPs and HBM bytes of one splash-attention kernel call (`jax.experimental.pallas.ops.tpu.
    splash_attention`), from its shapes, block sizes and block mask.

    The kernel walks a grid of (head, query block, key block) (for `dkv`: key block outer, query
    block inner) and skips the blocks its mask marks 0 (a causal mask: those above the diagonal);
    every other block costs `SPLASH_MATMULS[phase]` matmuls of [block_q, K] x [K, block_kv]. Its
    pipeline fetches the inner side's blocks at every computed grid step (keys and values for `fwd`
    and `dq`; queries, output gradients and softmax statistics for `dkv`) and reads the outer
    side's operands once.

    Args:
      floats: (dtype, dims) of the floating-point operands in call order: queries [..., T, K]
        (the leading dims are heads and vmapped batch dims, each a pass over the grid), keys
        [..., S, K], values, then the backward's softmax statistics and output gradients.
      once_bytes: bytes read or written once: the outputs and the integer operands (segment ids).
      block_mask: (dims, values) of the kernel's block mask [heads or 1, outer, inner], None when
        the text elides it (then every block of the grid is counted).
    """
    q, k = floats[0][1], floats[1][1]
    t, d, s = q[-2], q[-1], k[-2]
    heads = math.prod(q[:-2])
    if block_mask is not None:
        dims, values = block_mask
        computed = sum(1 for v in values if v) * heads / (dims[0] if len(dims) == 3 else 1)
    else:
        computed = heads * math.ceil(t / block_q) * math.ceil(s / block_kv)
    flops = 2.0 * SPLASH_MATMULS[phase] * block_q * block_kv * d * computed
    # The inner side: its sequence length and block, and its operands.
    inner_len, inner_block = (t, block_q) if phase == "dkv" else (s, block_kv)
    streamed = {0, *range(3, len(floats))} if phase == "dkv" else {1, 2}
    traffic = float(once_bytes)
    for n, (dtype, dims) in enumerate(floats):
        size = _DTYPE_BYTES.get(dtype, 4) * math.prod(dims)
        if n in streamed:
            # One fetch: `inner_block` of the inner_len positions of one head's slice (the dims
            # before the last two index heads; the sequence is either of the last two: [S, K]
            # keys, or [8, T] statistics broadcast over sublanes).
            traffic += computed * size / math.prod(dims[:-2]) * inner_block / inner_len
        else:
            traffic += size
    return KernelCosts(flops, traffic, block_mask is None)


class Module:
    """A parsed HLO module and the costs of its computations."""

    def __init__(self, text: str, unknown_trips: Callable[[str], float | None] | None = None):
        self.comps, self.entry = parse_hlo(text)
        self.instr = {i.name: i for comp in self.comps.values() for i in comp}
        self.users: dict[str, list[Instr]] = {}
        self.computation_of: dict[str, str] = {}
        self.callers: dict[str, list[Instr]] = {}  # loop body / condition -> its while instructions
        for comp_name, comp in self.comps.items():
            for i in comp:
                self.computation_of[i.name] = comp_name
                for o in i.operands:
                    self.users.setdefault(o, []).append(i)
                if i.op == "while":
                    for callee in _called(i.attrs, "body") + _called(i.attrs, "condition"):
                        self.callers.setdefault(callee, []).append(i)
        self.unknown_trips = unknown_trips
        self.loops = 0
        self.unknown = 0
        self.dense_masks = 0
        self._memo: dict[str, HloCosts] = {}
        self._flops_memo: dict[str, float] = {}
        self._fused_collectives_memo: dict[str, dict[str, dict[str, float]]] = {}

    # -- values ------------------------------------------------------------------------------

    def _source(self, name: str, hops: int = 0) -> Instr | None:
        """The instruction that produces `name`'s value: through copies and reshapes, and through
        a loop's tuple parameter to the value the loop started with when the loop passes that
        element through unchanged."""
        i = self.instr.get(name)
        while i is not None and i.op in _PASS_THROUGH and i.operands and hops < 32:
            i = self.instr.get(i.operands[0])
            hops += 1
        if i is None or hops >= 32:
            return i
        if i.op == "get-tuple-element" and i.operands and self.instr.get(i.operands[0], i).op == "while":
            # An element of a loop's result that the loop passes through: its initial value.
            m = re.search(r"index=(\d+)", i.attrs)
            k, loops = (int(m.group(1)), [self.instr[i.operands[0]]]) if m else (None, [])
        else:
            k = self._tuple_index(i.name)
            loops = self.callers.get(self.computation_of.get(i.name, ""), [])
        if k is None or len(loops) != 1 or not self._invariant(loops[0], k):
            return i
        init = self.instr.get(loops[0].operands[0]) if loops[0].operands else None
        if init is None or init.op != "tuple" or k >= len(init.operands):
            return i
        return self._source(init.operands[k], hops + 1)

    def _invariant(self, loop: Instr, k: int) -> bool:
        """Whether the loop's body returns element k of its parameter unchanged."""
        body = _called(loop.attrs, "body")
        root = next((i for i in self.comps.get(body[0], []) if i.root), None) if body else None
        if root is None or root.op != "tuple" or k >= len(root.operands):
            return False
        i = self.instr.get(root.operands[k])
        while i is not None and i.op in _PASS_THROUGH and i.operands:
            i = self.instr.get(i.operands[0])
        return i is not None and self._tuple_index(i.name) == k

    def _tuple_index(self, name: str) -> int | None:
        """k when `name` is element k of its computation's (tuple) parameter."""
        i = self.instr.get(name)
        while i is not None and i.op in _PASS_THROUGH and i.operands:
            i = self.instr.get(i.operands[0])
        if i is not None and i.op == "get-tuple-element" and i.operands:
            src = self.instr.get(i.operands[0])
            if src is not None and src.op == "parameter":
                m = re.search(r"index=(\d+)", i.attrs)
                return int(m.group(1)) if m else None
        return None

    def _const(self, name: str) -> int | None:
        i = self._source(name)
        if i is not None and i.op == "constant":
            m = re.fullmatch(r"\s*(-?\d+)\s*", i.args)
            if m:
                return int(m.group(1))
        return None

    def const_array(self, name: str) -> tuple[list[int], list[int]] | None:
        """(dims, values) of the integer constant array that `name` holds, if the text prints it."""
        i = self._source(name)
        if i is None or i.op != "constant":
            return None
        values = _literal(i.args)
        dims = _dims(i.shape)
        return (dims, values) if values is not None and len(values) == math.prod(dims) else None

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

    def trip_count(self, loop: Instr) -> float | None:
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
        step = self._increment(body_root.operands[index], index)
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

    def _increment(self, name: str, index: int) -> int | None:
        """The constant a loop body adds to its induction variable (element `index`): an add or
        subtract, possibly inside a fusion."""
        i = self.instr.get(name)
        while i is not None and i.op in _PASS_THROUGH and i.operands:
            i = self.instr.get(i.operands[0])
        if i is None:
            return None
        if i.op == "fusion":
            inner = _called(i.attrs, "calls")
            root = next((x for x in self.comps.get(inner[0], []) if x.root), None) if inner else None
            if root is None or root.op not in ("add", "subtract") or len(root.operands) != 2:
                return None
            params = {}
            for p in self.comps.get(inner[0], []):
                m = re.fullmatch(r"\s*(\d+)\s*", p.args) if p.op == "parameter" else None
                if m:
                    params[p.name] = int(m.group(1))
            x, y = root.operands
            if params.get(x) is None or self._tuple_index(i.operands[params[x]]) != index:
                return None
            c = self._const(i.operands[params[y]]) if y in params else self._const(y)
            return None if c is None else c * (1 if root.op == "add" else -1)
        if i.op in ("add", "subtract") and len(i.operands) == 2:
            x, y = i.operands
            if self._tuple_index(x) == index and self._const(y) is not None:
                return self._const(y) * (1 if i.op == "add" else -1)  # type: ignore[operator]
        return None

    # -- FLOPs -------------------------------------------------------------------------------

    def _dot_flops(self, i: Instr) -> float:
        lhs = self.instr.get(i.operands[0]) if i.operands else None
        if lhs is None:
            return 0.0
        dims = _dims(lhs.shape)
        contracting = [int(d) for d in (_attr(i.attrs, "lhs_contracting_dims") or "").split(",") if d.strip()]
        k = math.prod(dims[d] for d in contracting if d < len(dims))
        return 2.0 * math.prod(_dims(i.shape)) * k

    def _conv_flops(self, i: Instr) -> float:
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

    def kernel_costs(self, i: Instr) -> KernelCosts | None:
        """Costs of a Pallas kernel this model knows (splash attention), else None."""
        m = _SPLASH_NAME.search(i.name) or _SPLASH_NAME.search(_attr(i.attrs, "metadata") or "")
        if m is None:
            return None
        phase = m.group(1)
        arrays = [_arrays(self.instr[o].shape) for o in i.operands if o in self.instr]
        first_float = next((n for n, a in enumerate(arrays) if len(a) == 1 and a[0][0] in _FLOAT_TYPES), None)
        if first_float is None:
            return None
        # Before the queries: the scalar-prefetch operands, in the kernel's order: the next data
        # block, the block mask (0 skip, 1 partial, 2 full), the next partial-mask block.
        prefetch = i.operands[:first_float]
        floats = [(a[0][0], a[0][1]) for a in arrays[first_float:] if len(a) == 1 and a[0][0] in _FLOAT_TYPES]
        if len(floats) < 3:
            return None
        others = sum(
            _DTYPE_BYTES.get(a[0][0], 4) * math.prod(a[0][1])
            for a in arrays[first_float:]
            if len(a) == 1 and a[0][0] not in _FLOAT_TYPES
        )
        # The block sizes, from the kernel's `xprof_metadata` (JSON inside a string: escaped quotes).
        blocks = {key: int(v) for key, v in re.findall(r'\\?"(block_[a-z_]+)\\?":\s*(\d+)', i.attrs)}
        suffix = "" if phase == "fwd" else f"_{phase}"
        block_q = blocks.get(f"block_q{suffix}", floats[0][1][-2])
        block_kv = blocks.get(f"block_kv{suffix}", floats[1][1][-2])
        mask = self.const_array(prefetch[1]) if len(prefetch) >= 2 else None
        return splash_kernel_costs(phase, floats, others + _bytes(i.shape, hbm_only=False), block_q, block_kv, mask)

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

    def _written_bytes(self, root: Instr | None, shape: str) -> float:
        if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
            update = self.instr.get(root.operands[1])
            return float(_bytes(update.shape)) if update is not None else 0.0
        if root is not None and root.op == "tuple":
            return sum(self._written_bytes(self.instr.get(o), self.instr[o].shape) for o in root.operands)
        return float(_bytes(shape))

    def _params(self, comp: str) -> dict[int, Instr]:
        params = {}
        for p in self.comps.get(comp, []):
            if p.op == "parameter":
                m = re.fullmatch(r"\s*(\d+)\s*", p.args)
                if m:
                    params[int(m.group(1))] = p
        return params

    def _fusion_bytes(self, i: Instr) -> float:
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

    def _instr_bytes(self, i: Instr) -> float:
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
                if trips is None and self.unknown_trips is not None:
                    trips = self.unknown_trips(_attr(i.attrs, "metadata") or "")
                if trips is None:
                    self.unknown += 1
                    trips = 1.0
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
            elif _is_pallas(i):
                kernel = self.kernel_costs(i)
                if kernel is not None:
                    out.flops += kernel.flops
                    out.hbm_bytes += kernel.hbm_bytes
                    self.dense_masks += kernel.dense_mask
                    continue
            out.hbm_bytes += self._instr_bytes(i)
        self._memo[comp] = out
        return out


def hlo_costs(text: str, unknown_trips: Callable[[str], float | None] | None = None) -> HloCosts:
    """Per-chip FLOPs, HBM traffic and collectives of one execution of an optimized HLO module
    (`compiled.as_text()`), loops unrolled (see `HloCosts`). `unknown_trips(metadata)` gives the
    trip count to assume for a loop whose count is data-dependent, None if it does not know the
    loop (then: once)."""
    module = Module(text, unknown_trips)
    out = HloCosts()
    out.add(module.costs(module.entry))
    kernels = [i for comp in module.comps.values() for i in comp if _is_pallas(i)]
    out.custom_calls = len(kernels)
    out.uncounted_kernels = sum(1 for i in kernels if module.kernel_costs(i) is None)
    for comp in module.comps.values():
        for i in comp:
            kind = _collective_kind(i)
            if kind is not None:
                out.collectives.setdefault(kind, {"ops": 0, "executed": 0.0, "bytes": 0.0})["ops"] += 1
    out.loops, out.unknown_trip_loops, out.dense_kernel_masks = module.loops, module.unknown, module.dense_masks
    return out
