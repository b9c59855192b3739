"""Plans: a step's programs compiled ahead of time for a TPU slice, with memory, FLOPs, HBM traffic,
collectives and a roofline time.

`plan_run(run, "v5p-128")` plans the step a run config trains (`aot.programs.run_programs`);
`plan(cfg, "v5p-64", "grpo", batch=32, seq_len=32768)` the train step or the sampler of a model
for a quick question. Both compile from `jax.ShapeDtypeStruct`s with their `NamedSharding`s on
libtpu's compile-only devices (`aot.topologies`); no parameter is ever allocated.

Per program and chip: memory from XLA's `memory_analysis()` (arguments, outputs, temporaries,
peak), plus the buffers the step keeps alive beside it (the optimizer state while gradients are
computed, say: `Program.resident`), against the chip's HBM; FLOPs and HBM traffic counted from
the optimized HLO with every loop unrolled (`aot.hlo_costs`; XLA's `cost_analysis()`, which
counts each loop body once, is reported beside); the collectives.

Times are a roofline estimate: per execution of a program, max(FLOPs / peak FLOP/s, HBM bytes /
HBM bandwidth) per chip at the published peaks (`aot.topologies.CHIPS`), times its executions
per step. Communication, latency and imperfect overlap are not in it; a real step is slower.
MFU: model FLOPs (6 x N x trained tokens for training, 2 x N x processed tokens for sampling; N:
the parameters a token's matmuls use, the input embedding table excluded) over chips x peak x
estimated time.

Needs libtpu (`pip install -e '.[tpu]'`); it runs on a CPU-only machine, preferably with
`JAX_PLATFORMS=cpu` (the `magistral-jax plan` command sets it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from magistral_jax.aot.capacity import Capacity, CapacityOptions
from magistral_jax.aot.hlo_costs import HloCosts, hlo_costs
from magistral_jax.aot.topologies import Topology, topology, topology_devices

if TYPE_CHECKING:
    from magistral_jax.aot.programs import Program
    from magistral_jax.config import ModelConfig
    from magistral_jax.train.config import RunConfig

TASKS = ("grpo", "sample")
DEFAULT_PROMPT_LEN = 1024
LOGPROB_CHUNK = 512  # the 24B recipes' head chunk (`logprob_chunk`)
NO_REMAT = "-"  # sampling: no backward pass, nothing to rematerialise


@dataclass(kw_only=True)
class ProgramResult(HloCosts):
    """One compiled program: its costs per execution per chip (`HloCosts`: FLOPs, HBM traffic,
    collectives, loops, kernels), memory in bytes per chip, `executions` per step, and
    `resident_bytes`: what the step keeps alive beside the program's own buffers, added to XLA's
    peak in `step_peak_bytes`."""

    name: str
    phase: str
    chips: int
    compile_s: float
    fits: bool
    error: str | None = None
    required_bytes: int | None = None  # from XLA's out-of-memory message, when it has one
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    resident_bytes: int = 0
    step_peak_bytes: int = 0
    xla_flops: float = 0.0
    xla_bytes_accessed: float = 0.0
    executions: float = 1.0
    compute_s: float = 0.0  # per execution
    memory_s: float = 0.0
    note: str = ""

    @property
    def time_s(self) -> float:
        """Estimated time per step: executions x max(compute, HBM) per execution."""
        return self.executions * max(self.compute_s, self.memory_s)


@dataclass
class PhaseResult:
    """The programs of one part of the step (`train` or `sample`) together: per chip, summed over
    their executions; `model_flops` over all chips."""

    name: str
    chips: int
    tokens: int  # trained tokens (train), generated tokens (sample)
    model_flops: float
    flops: float
    hbm_bytes: float
    compute_s: float
    memory_s: float
    time_s: float
    bound: str
    mfu: float
    tokens_per_s: float


@dataclass
class PlanResult:
    """What a plan found. Bytes and FLOPs are per chip unless named `model_`; times in seconds,
    roofline estimates (see the module docstring), not measurements. `flops`, `hbm_bytes`,
    `compute_s` and `memory_s` add up every program's executions in a step; `step_s` adds the
    phases (synchronous runs) or takes the longer (asynchronous: generation beside training)."""

    config: str
    task: str  # grpo, sft (a run's step) or sample
    source: str  # `flags` or the run config's path
    topology: str
    libtpu_topology: str
    chip: str
    chips: int
    mesh: dict[str, int]
    batch: int  # rows of a microbatch (train), prompts (sample)
    seq_len: int  # tokens per row (train), cache slots (sample)
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
    phases: list[PhaseResult]
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
    capacity: Capacity | None = None  # the sampler's, contiguous vs paged cache (`aot.capacity`)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _required_bytes(message: str) -> int | None:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)", message) or re.search(
        r"Used ([\d.]+)([KMGT]?)i?B? of", message
    )
    return int(float(m.group(1)) * units[m.group(2)]) if m else None


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a pytree of sharded `jax.ShapeDtypeStruct`s (the largest shard)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize  # a PRNG key's dtype has one too (its key data)
    return total


def hlo_text(compiled: Any) -> str:
    """The optimized HLO of a compiled program with its integer constants printed in full (the
    splash kernel's block masks are constants; `compiled.as_text()` elides large ones as `{...}`,
    and `hlo_costs` then counts every block of such a kernel)."""
    try:
        from jax._src.lib import hlo  # not public API: fall back to the elided text without it

        options = hlo.HloPrintOptions()
        options.print_large_constants = True
        return compiled.runtime_executable().hlo_modules()[0].to_string(options)
    except (ImportError, AttributeError, IndexError):
        return compiled.as_text()


def compile_program(
    program: Program, outputs: dict[str, Any], topo: Topology, dump_hlo: str | None = None
) -> tuple[ProgramResult, Any]:
    """Compiles one `aot.programs.Program` (see `aot.programs.compile_program`) and measures it;
    returns its result and its abstract outputs (None when XLA refuses it for want of memory)."""
    from magistral_jax.aot import programs as A

    chips = program.mesh.devices.size
    start = time.perf_counter()
    try:
        compiled, out = A.compile_program(program, outputs)
    except Exception as e:  # XLA reports running out of HBM as an error at compile time
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        result = ProgramResult(
            name=program.name,
            phase=program.phase,
            chips=chips,
            compile_s=time.perf_counter() - start,
            fits=False,
            error=message.strip().splitlines()[0],
            required_bytes=_required_bytes(message),
            executions=program.executions,
            note=program.note,
        )
        return result, None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else (xla or {})
    text = hlo_text(compiled)
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{program.name}.hlo.txt"), "w") as f:
            f.write(text)
    costs = hlo_costs(text, program.loop_trips)
    resident = per_chip_bytes(program.resident({**outputs, program.name: out}))
    peak = int(mem.peak_memory_in_bytes)
    result = ProgramResult(
        **dataclasses.asdict(costs),
        name=program.name,
        phase=program.phase,
        chips=chips,
        compile_s=seconds,
        fits=peak + resident <= topo.chip.hbm_bytes,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=peak,
        resident_bytes=resident,
        step_peak_bytes=peak + resident,
        xla_flops=float(xla.get("flops", 0.0)),
        xla_bytes_accessed=float(xla.get("bytes accessed", 0.0)),
        executions=program.executions,
        compute_s=costs.flops / topo.chip.peak_flops,
        memory_s=costs.hbm_bytes / topo.chip.hbm_bandwidth,
        note=program.note,
    )
    return result, out


def _phase(name: str, results: list[ProgramResult], tokens: int, model_flops: float, peak: float) -> PhaseResult:
    chips = max(r.chips for r in results)
    flops = sum(r.flops * r.executions for r in results)
    traffic = sum(r.hbm_bytes * r.executions for r in results)
    compute = sum(r.compute_s * r.executions for r in results)
    memory = sum(r.memory_s * r.executions for r in results)
    seconds = sum(r.time_s for r in results)
    return PhaseResult(
        name,
        chips,
        tokens,
        model_flops,
        flops,
        traffic,
        compute,
        memory,
        seconds,
        "compute" if compute >= memory else "memory",
        model_flops / (chips * peak * seconds) if seconds else 0.0,
        tokens / seconds if seconds else 0.0,
    )


def _compile_all(
    programs: list[Program], topo: Topology, dump_hlo: str | None
) -> tuple[list[ProgramResult], list[str], dict[str, Any]]:
    """Compiles the programs in order; one that takes the outputs of a program that did not fit
    is skipped (and said so). Returns their results, notes and abstract outputs by name."""
    results, outputs, notes = [], {}, []
    for program in programs:
        try:
            program.inputs(outputs)
        except KeyError as e:
            notes.append(f"{program.name}: not compiled: it takes the outputs of {e.args[0]}, which does not fit")
            continue
        result, out = compile_program(program, outputs, topo, dump_hlo)
        results.append(result)
        if out is not None:
            outputs[program.name] = out
    for r in results:
        if r.note:
            notes.append(r.note)
        if r.unknown_trip_loops:
            notes.append(f"{r.name}: {r.unknown_trip_loops} loop(s) with a data-dependent trip count, counted once")
        if r.uncounted_kernels:
            notes.append(f"{r.name}: {r.uncounted_kernels} Pallas kernel(s) whose FLOPs are not counted")
        if r.dense_kernel_masks:
            notes.append(f"{r.name}: {r.dense_kernel_masks} splash kernel(s) counted at every block (mask not read)")
    return results, notes, outputs


def _result(
    cfg: ModelConfig,
    task: str,
    source: str,
    topo: Topology,
    mesh: dict[str, int],
    batch: int,
    seq_len: int,
    prompt_len: int | None,
    remat: str,
    results: list[ProgramResult],
    planned: list[str],
    train: tuple[int, float] | None,
    sample: tuple[int, float] | None,
    overlapped: bool,
    notes: list[str],
) -> PlanResult:
    """Assembles a plan from compiled programs; `train` / `sample`: (tokens, model FLOPs) of each
    phase: trained tokens and 6 N of them; generated tokens and 2 N x the prompt and generated ones."""
    from magistral_jax.aot.programs import param_counts

    total_params, matmul_params = param_counts(cfg)
    fits = len(results) == len(planned) and all(r.fits for r in results)
    phases = []
    for name, figures in (("sample", sample), ("train", train)):
        mine = [r for r in results if r.phase == name]
        # A phase is estimated when every one of its programs compiled and fits.
        whole = len(mine) == sum(1 for p in planned if p == name) and all(r.fits for r in mine)
        if figures is not None and mine and whole:
            phases.append(_phase(name, mine, figures[0], figures[1], topo.chip.peak_flops))
    times = [p.time_s for p in phases]
    step_s = (max(times) if overlapped else sum(times)) if fits and times else 0.0
    compute = sum(p.compute_s for p in phases)
    memory = sum(p.memory_s for p in phases)
    model_flops = sum(p.model_flops for p in phases)
    tokens = sum(p.tokens for p in phases if p.name == "train") or sum(p.tokens for p in phases)
    used_chips = topo.chips if overlapped else max((p.chips for p in phases), default=topo.chips)
    if cfg.attention == "auto":
        notes = ["attention auto is the splash kernel on a TPU (cached attention when decoding)", *notes]
    return PlanResult(
        config=cfg.name,
        task=task,
        source=source,
        topology=topo.name,
        libtpu_topology=topo.libtpu_name,
        chip=topo.chip.name,
        chips=topo.chips,
        mesh=mesh,
        batch=batch,
        seq_len=seq_len,
        prompt_len=prompt_len,
        remat=remat,
        attention=cfg.attention,
        attention_block=cfg.attention_block,
        param_dtype=cfg.param_dtype,
        dtype=cfg.dtype,
        params=total_params,
        matmul_params=matmul_params,
        hbm_capacity_bytes=topo.chip.hbm_bytes,
        peak_flops=topo.chip.peak_flops,
        hbm_bandwidth=topo.chip.hbm_bandwidth,
        programs=results,
        phases=phases,
        fits=fits,
        peak_bytes=max((r.step_peak_bytes or r.required_bytes or 0) for r in results),
        tokens=tokens,
        flops=sum(p.flops for p in phases),
        hbm_bytes=sum(p.hbm_bytes for p in phases),
        model_flops=model_flops,
        compute_s=compute if fits else 0.0,
        memory_s=memory if fits else 0.0,
        step_s=step_s,
        bound=("compute" if compute >= memory else "memory") if fits else "",
        mfu=model_flops / (used_chips * topo.chip.peak_flops * step_s) if step_s else 0.0,
        tokens_per_s=tokens / step_s if step_s else 0.0,
        notes=notes,
    )


def _capacity(
    cfg: ModelConfig,
    topo: Topology,
    mesh: dict[str, int],
    results: list[ProgramResult],
    outputs: dict[str, Any],
    rows: int,
    prompt_len: int,
    budget: int,
    options: CapacityOptions,
    group_size: int,
    reserve: int,
) -> tuple[Capacity | None, list[str]]:
    """The capacity section from the compiled decode program (`aot.capacity.capacity`), or why not:
    its per-chip peak, and its state's keys and values and the rest, as its shardings place them."""
    import jax.numpy as jnp

    from magistral_jax.aot import capacity as C
    from magistral_jax.aot.programs import param_counts

    lengths = C.parse_lengths(options.lengths, budget)  # refuses a bad spec even when nothing fits
    decode = next((r for r in results if r.name == "decode"), None)
    if decode is None or not decode.fits:
        return None, ["capacity: the decode program does not fit, so nothing grounds a capacity figure"]
    state = outputs["decode"]  # the decode state it hands back: the one it took, donated
    kv = per_chip_bytes((state.cache.k, state.cache.v))
    t = cfg.text
    result = C.capacity(
        lengths=lengths,
        prompt_len=prompt_len,
        n_layers=t.n_layers,
        n_kv_heads=t.n_kv_heads,
        head_dim=t.head_dim,
        cache_itemsize=jnp.dtype(cfg.dtype).itemsize,
        weight_bytes=param_counts(cfg)[1] * jnp.dtype(cfg.param_dtype).itemsize,
        rules=cfg.rules,
        mesh=mesh,
        hbm_bytes=topo.chip.hbm_bytes,
        hbm_bandwidth=topo.chip.hbm_bandwidth,
        decode_rows=rows,
        decode_peak_bytes=decode.step_peak_bytes,
        decode_cache_bytes=kv,
        decode_row_bytes=per_chip_bytes(state) - kv,
        attention_block=cfg.attention_block,
        page_size=options.page_size,
        group_size=group_size,
        reserve=reserve,
    )
    return result, []


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
    capacity: CapacityOptions | None = None,
) -> PlanResult:
    """Compiles `task` (`grpo`: one train step on one microbatch of `batch` sequences of `seq_len`
    tokens, with a default run config's objective and optimizer; `sample`: prefill and decode of
    `batch` prompts into a `seq_len`-slot KV cache, Magistral sampling) for `cfg` on the named TPU
    slice, from abstract shapes, and returns its memory, costs and roofline step time.

    Args:
      mesh: `data=..,fsdp=..,tensor=..` (or a dict); default: every chip on `fsdp`.
      remat: rematerialisation policy of the train step (default: the config's).
      param_dtype: parameter (and optimizer state) dtype; default float32 master weights for
        `grpo` (as the training configs), bfloat16 for `sample` (as `load_model`).
      attention: attention implementation (default `chunked`; `splash` is the TPU kernel; `xla`
        materialises the whole score matrix; `auto` resolves for the TPU: splash).
      attention_block: block of the chunked attention and of splash (default: the config's).
      prompt_len: `sample` only: prompt tokens (default min(1024, seq_len / 2)).
      chunk: `grpo` only: sequence chunk of the log-probability head.
      dump_hlo: a directory to write each program's optimized HLO to (`<program>.hlo.txt`).
      capacity: `sample` only: the capacity section's length distribution, page size, group
        size and reserve (`aot.capacity`; default: its defaults).
    """
    from magistral_jax.aot import capacity as C
    from magistral_jax.aot import programs as A
    from magistral_jax.config import REMAT_POLICIES
    from magistral_jax.sampling.strategies import MAGISTRAL
    from magistral_jax.sharding import make_mesh
    from magistral_jax.train.config import RunConfig
    from magistral_jax.train.step import objective_of

    if task not in TASKS:
        raise ValueError(f"task: {task!r}; expected one of {TASKS}")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch and seq_len must be positive (seq_len >= 2), got {batch} and {seq_len}")
    if remat is not None and remat not in REMAT_POLICIES:
        raise ValueError(f"remat: {remat!r}; expected one of {REMAT_POLICIES}")
    topo = topology(topology_name)
    sizes = _mesh_sizes(mesh, topo.chips)
    jmesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=list(topology_devices(topology_name)))
    changes: dict[str, Any] = {"attention": attention}
    if attention_block is not None:
        changes["attention_block"] = attention_block
    if remat is not None:
        changes["remat"] = remat
    changes["param_dtype"] = param_dtype or ("float32" if task == "grpo" else "bfloat16")
    cfg = cfg.replace(**changes)
    _, matmul_params = A.param_counts(cfg)
    train = sample = None
    notes = []
    if task == "grpo":
        if seq_len > cfg.text.max_position_embeddings:
            raise ValueError(f"seq_len {seq_len} exceeds the model's context of {cfg.text.max_position_embeddings}")
        run = RunConfig(kind="grpo", microbatch_tokens=batch * seq_len, row_len=seq_len, logprob_chunk=chunk)
        programs, _, _ = A.train_programs(
            cfg, jmesh, objective_of(run), run.optimizer, run.steps, chunk, A.TrainShape(batch, seq_len)
        )
        train = (batch * seq_len, 6.0 * matmul_params * batch * seq_len)
        prompt = None
        notes.append("objective and optimizer: a default GRPO run config's")
    else:
        prompt = prompt_len if prompt_len is not None else min(DEFAULT_PROMPT_LEN, seq_len // 2)
        if not 1 <= prompt < seq_len:
            raise ValueError(f"prompt_len: {prompt} must lie in [1, {seq_len}) (the cache holds prompt and completion)")
        programs = A.sampler_programs(
            cfg, jmesh, A.abstract_params(cfg, jmesh), batch, prompt, seq_len - prompt, 1, MAGISTRAL, (2,)
        )
        sample = (batch * (seq_len - prompt), 2.0 * matmul_params * batch * seq_len)
    results, compile_notes, outputs = _compile_all(programs, topo, dump_hlo)
    cap = None
    if task == "sample":
        options = capacity or CapacityOptions()
        cap, cap_notes = _capacity(
            cfg,
            topo,
            sizes,
            results,
            outputs,
            batch,
            prompt,
            seq_len - prompt,
            options,
            C.DEFAULT_GROUP_SIZE if options.group_size is None else options.group_size,
            C.DEFAULT_RESERVE if options.reserve is None else options.reserve,
        )
        compile_notes += cap_notes
    result = _result(
        cfg,
        task,
        "flags",
        topo,
        sizes,
        batch,
        seq_len,
        prompt,
        cfg.remat if task == "grpo" else NO_REMAT,
        results,
        [p.phase for p in programs],
        train,
        sample,
        False,
        notes + compile_notes,
    )
    result.capacity = cap
    return result


def plan_run(
    run: RunConfig,
    topology_name: str,
    *,
    source: str = "",
    prompt_len: int | None = None,
    dump_hlo: str | None = None,
    capacity: CapacityOptions | None = None,
) -> PlanResult:
    """Plans one step of the run config `run` (a `train.config.RunConfig`) on the named TPU slice:
    the programs `train` would compile for it (`aot.programs.run_programs`), on the slice's
    chips split as the run's mesh. `prompt_len`: the longest GRPO prompt to assume (default the
    run's `async_rl.max_prompt_len`). A GRPO run's plan has a capacity section (`capacity`: its
    length distribution and page size; group size and reserve default to the run's `group_size`
    and `async_rl.chunk`)."""
    from magistral_jax.aot.programs import param_counts, run_programs

    topo = topology(topology_name)
    step = run_programs(run, topology_devices(topology_name), prompt_len)
    _, matmul_params = param_counts(step.cfg)
    results, notes, outputs = _compile_all(step.programs, topo, dump_hlo)
    train = step.programs[-1].mesh
    mesh = {a: int(train.shape.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    trained = step.train.tokens
    sample = (step.generated_tokens, 2.0 * matmul_params * step.processed_tokens) if step.generated_tokens else None
    cap = None
    if run.kind == "grpo":
        options = capacity or CapacityOptions()
        decode = next(p for p in step.programs if p.name == "decode")
        cap, cap_notes = _capacity(
            step.cfg,
            topo,
            {a: int(decode.mesh.shape.get(a, 1)) for a in ("data", "fsdp", "tensor")},
            results,
            outputs,
            step.decode_rows,
            prompt_len or run.async_rl.max_prompt_len,
            run.grpo.max_new_tokens,
            options,
            run.grpo.group_size if options.group_size is None else options.group_size,
            run.async_rl.chunk if options.reserve is None else options.reserve,
        )
        notes += cap_notes
    result = _result(
        step.cfg,
        run.kind,
        source,
        topo,
        mesh,
        step.train.rows,
        step.train.row_len,
        prompt_len or (run.async_rl.max_prompt_len if run.kind == "grpo" else None),
        step.cfg.remat,
        results,
        [p.phase for p in step.programs],
        (trained, 6.0 * matmul_params * trained),
        sample,
        step.overlapped,
        step.notes + notes,
    )
    result.capacity = cap
    return result
