"""`magistral-jax plan`: will it fit, and how fast might it run, on a TPU slice that is not here."""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = """\
Compiles, ahead of time and from abstract shapes only (no parameter is allocated), the programs
of a training step for a named TPU slice, with libtpu's compile-only TPU devices on this (CPU)
machine, and reports per chip and per program: memory (arguments, outputs, temporaries, peak, from
XLA's memory analysis, plus what the step keeps alive beside the program) against the chip's HBM;
the FLOPs of the compiled program (matmuls and splash-attention kernels, every loop unrolled: XLA's
own cost_analysis counts each loop body once and is shown beside it); HBM traffic; the collectives
in the HLO; and an estimated time and MFU (6·N·tokens for training, 2·N·tokens for sampling; N =
the parameters of a token's matmuls).

Two forms:
  magistral-jax plan --config RECIPE.yaml --topology v5p-128 [KEY=VALUE ...]
    plans the step `magistral-jax train` would run from that run config: its model (read from
    init_from when that checkpoint is here, else from its `model:` field), mesh, microbatches,
    remat, attention and sequence length (GRPO: the longest prompt, assumed async_rl.max_prompt_len
    or --prompt-len, plus grpo.max_new_tokens; or row_len), the sampler's batch (prompts_per_step x
    group_size, or the asynchronous generator's slots), and reports every program the step runs
    (sampling: prefill and decode; training: per-microbatch gradients, accumulation, the update)
    and the peak over them. KEY=VALUE overrides the run config as for `train`.
  magistral-jax plan --config PRESET --topology v5p-64 --task grpo --batch 32 --seq-len 32768
    a quick question: one train step on one microbatch (a default run config's objective and
    optimizer), or the sampler (--task sample).

For the sampler (--task sample, and a GRPO recipe's generator) a capacity section says how many
sequences the generator holds at once with today's contiguous KV cache (every slot reserves the
padded prompt plus the whole budget) and with a paged one (pages held as the tokens grow, a
group's prompt pages shared, freed when a sequence ends), for completion lengths drawn from a
distribution (--lengths) over the budget (--seq-len minus --prompt-len; a recipe's
grpo.max_new_tokens): expected pages per sequence in flight, counted length-biased (long
sequences are in flight longer), exact sums, no sampling. The HBM free for the rows is every
chip's minus what the compiled decode program needs besides its rows' state (its cache, logits,
output buffers; a row takes its keys and values plus the rest of that state). It also gives each
cache's decode-step HBM traffic (weights once plus the keys and values read; the contiguous cache
reads every row up to the longest) and the tokens/s it implies at the chips' HBM bandwidth (a
roofline estimate).

The time is a ROOFLINE ESTIMATE, not a measurement: per program, max(FLOPs / peak bf16 FLOP/s,
HBM bytes / HBM bandwidth) per chip at the chip's published figures (v4 275 TFLOP/s, 32 GiB,
1200 GB/s; v5e 197, 16 GiB, 819 GB/s; v5p 459, 95 GiB, 2765 GB/s; v6e 918, 32 GiB, 1638 GB/s),
times its executions per step. Communication, latency and imperfect overlap are not in it.

A plan that does not fit says so and exits 0; --search exits 1 when no candidate fits. Needs
libtpu (pip install -e '.[tpu]'). A 24B compile takes minutes on a small machine.
"""

GiB = 2**30


def register(sub: argparse._SubParsersAction) -> None:
    from magistral_jax.aot import capacity as C
    from magistral_jax.aot.planner import DEFAULT_PROMPT_LEN
    from magistral_jax.aot.topologies import TOPOLOGIES

    p = sub.add_parser(
        "plan",
        help="compile a run's step (or a train step / the sampler) for a TPU slice ahead of time: memory, FLOPs, "
        "roofline time",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="a run config (configs/grpo-*.yaml, configs/sft-*.yaml: the recipe form), or a preset (e.g. "
        "magistral-small-2509), a model config file (configs/tiny.yaml, config.json, params.json) or a checkpoint "
        "directory (with --task)",
    )
    p.add_argument(
        "--topology",
        required=True,
        metavar="NAME",
        help=f"the TPU slice, named as Cloud TPU names them (v4-N and v5p-N count TensorCores, two per chip; "
        f"v5e-N and v6e-N count chips); known: {', '.join(TOPOLOGIES)}",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe form: run config overrides")
    p.add_argument(
        "--prompt-len",
        type=int,
        help="the longest prompt in tokens: recipe form, GRPO (default: the run's async_rl.max_prompt_len); "
        f"--task sample: prompt tokens, the rest of the cache is generated (default: min({DEFAULT_PROMPT_LEN}, "
        "seq-len / 2))",
    )
    q = p.add_argument_group("a model and flags (instead of a run config)")
    q.add_argument(
        "--task",
        choices=("grpo", "sample"),
        help="grpo: one GRPO train step (loss and gradients of one microbatch, clipped AdamW update; float32 master "
        "weights and optimizer state); sample: the sampler's prefill and decode loop (bfloat16 weights)",
    )
    q.add_argument("--batch", type=int, help="grpo: sequences per step; sample: prompts")
    q.add_argument(
        "--seq-len", type=int, help="grpo: tokens per sequence; sample: KV-cache length (prompt plus generated tokens)"
    )
    q.add_argument(
        "--mesh",
        help="how the chips split over the mesh axes, e.g. data=1,fsdp=16,tensor=4 (one axis may be -1 for the "
        "rest; default: every chip on fsdp)",
    )
    q.add_argument(
        "--remat",
        choices=("none", "full", "save_matmuls", "save_qkv"),
        help="grpo only: rematerialisation of each layer in the backward pass: none (keep all activations), full "
        "(keep nothing inside a layer), save_matmuls (keep every projection's output), save_qkv (keep q, k, v); "
        "default: the config's",
    )
    q.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        help="dtype of the parameters (and optimizer state); default float32 for grpo, bfloat16 for sample",
    )
    q.add_argument(
        "--attention",
        default="chunked",
        choices=("chunked", "splash", "xla", "auto"),
        help="attention implementation: chunked (default: blockwise online softmax in JAX, memory linear in the "
        "sequence), splash (TPU splash-attention kernel), xla (the whole score matrix: memory quadratic in the "
        "sequence), auto (splash on a TPU)",
    )
    q.add_argument(
        "--attention-block",
        type=int,
        help="query and key block of the chunked and splash attention (default: the config's)",
    )
    q.add_argument(
        "--search",
        action="store_true",
        help="instead of one plan, try every split of the chips over data/fsdp/tensor (tensor 1, 2, 4, 8; data a "
        "power of two) and, for grpo, every remat policy; print them all and the fastest estimate that fits "
        "(skipping those that need more memory than one that did not fit); exit 1 if none fits",
    )
    c = p.add_argument_group("the capacity section (--task sample, a GRPO recipe)")
    families = "; ".join(f"{name}: {f.help} (default mean {f.default_fraction:.3g})" for name, f in C.LENGTHS.items())
    c.add_argument(
        "--lengths",
        metavar="NAME[:MEAN_FRACTION]",
        help=f"the completion lengths, over 1..budget, with their mean as a fraction of the budget; "
        f"default {C.DEFAULT_LENGTHS} (a mean of a third of the budget, the paper's 5x spread); {families}",
    )
    c.add_argument(
        "--page-size",
        type=int,
        default=C.DEFAULT_PAGE_SIZE,
        help="tokens per page of the paged cache (default %(default)s)",
    )
    c.add_argument(
        "--group-size",
        type=int,
        help=f"samples per prompt sharing its full prompt pages (default: a recipe's grpo.group_size, else "
        f"{C.DEFAULT_GROUP_SIZE})",
    )
    c.add_argument(
        "--reserve",
        type=int,
        help=f"tokens of headroom a sequence is admitted with and holds, in whole pages (default: a recipe's "
        f"async_rl.chunk, else {C.DEFAULT_RESERVE}: one decode chunk)",
    )
    p.add_argument("--dump-hlo", metavar="DIR", help="write each compiled program's optimized HLO text to DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes, FLOPs, seconds) instead of text")
    p.set_defaults(run=run)


def is_run_config(path: str) -> bool:
    """Whether `path` is a YAML run config (a mapping with `kind`), not a model config."""
    import yaml

    if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
        return False
    with open(path) as f:
        d = yaml.safe_load(f)
    return isinstance(d, dict) and "kind" in d


def _load_model_config(name: str):
    from magistral_jax.checkpoint.configs import read_config
    from magistral_jax.config import get_preset

    if os.path.exists(name):
        return read_config(name)
    return get_preset(name)


def run(args: argparse.Namespace) -> int:
    # Compilation targets the TPU topology; the local backend only needs to be the CPU (and libtpu
    # must not try to claim a TPU of this machine).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if os.environ["JAX_PLATFORMS"] == "cpu":
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:
            pass  # backends already initialised: keep them

    from magistral_jax.aot import planner, search
    from magistral_jax.aot.capacity import CapacityOptions
    from magistral_jax.aot.topologies import topology

    topology(args.topology)  # refuses an unknown name before anything is compiled
    capacity = CapacityOptions(args.lengths, args.page_size, args.group_size, args.reserve)
    if is_run_config(args.config):
        flags = [f"--{n.replace('_', '-')}" for n in ("task", "batch", "seq_len", "mesh", "remat", "param_dtype")]
        given = [f for f in flags if getattr(args, f[2:].replace("-", "_")) is not None]
        given += ["--attention"] * (args.attention != "chunked") + ["--search"] * args.search
        given += ["--attention-block"] * (args.attention_block is not None)
        if given:
            raise ValueError(
                f"{args.config} is a run config: {', '.join(given)} belong to the model-and-flags form; "
                "override the run config with KEY=VALUE (e.g. model_overrides.remat=save_qkv)"
            )
        from magistral_jax.train.config import load_run_config

        recipe = load_run_config(args.config, args.overrides)
        result = planner.plan_run(
            recipe,
            args.topology,
            source=args.config,
            prompt_len=args.prompt_len,
            dump_hlo=args.dump_hlo,
            capacity=capacity,
        )
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
        return 0
    if args.overrides:
        raise ValueError(f"KEY=VALUE overrides ({' '.join(args.overrides)}) need a run config as --config")
    missing = [f"--{n.replace('_', '-')}" for n in ("task", "batch", "seq_len") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"{args.config} is not a run config: {', '.join(missing)} required")
    cfg = _load_model_config(args.config)
    kwargs = dict(
        param_dtype=args.param_dtype,
        attention=args.attention,
        attention_block=args.attention_block,
        prompt_len=args.prompt_len,
        dump_hlo=args.dump_hlo,
        capacity=capacity,
    )
    if args.search:
        if args.mesh or args.remat:
            raise ValueError("--search chooses the mesh and remat itself: drop --mesh and --remat")

        def progress(c: search.Candidate) -> None:
            if not args.json:
                state = c.skipped or ("fits" if c.fits else "does not fit")
                print(f"  tried mesh {mesh_text(c.mesh)} remat {c.remat}: {state}", file=sys.stderr, flush=True)

        candidates, best = search.search(
            cfg, args.topology, args.task, args.batch, args.seq_len, progress=progress, **kwargs
        )
        if args.json:
            out = {
                "candidates": [
                    {
                        "mesh": c.mesh,
                        "remat": c.remat,
                        "fits": c.fits,
                        "skipped": c.skipped,
                        "plan": None if c.result is None else c.result.to_dict(),
                    }
                    for c in candidates
                ],
                "best": None if best is None else {"mesh": best.mesh, "remat": best.remat},
            }
            print(json.dumps(out, indent=2))
        else:
            print(format_search(candidates, best))
            if best is not None and best.result is not None:
                print()
                print(format_plan(best.result))
        return 0 if best is not None else 1
    result = planner.plan(
        cfg, args.topology, args.task, args.batch, args.seq_len, mesh=args.mesh, remat=args.remat, **kwargs
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0


# ------------------------------------------------------------------------------------------------
# The text report
# ------------------------------------------------------------------------------------------------


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


def _seconds(x: float) -> str:
    return f"{x:.3g} s" if x >= 0.01 else f"{1000 * x:.3g} ms"


def format_plan(r) -> str:
    """The human-readable report of a plan (`aot.planner.PlanResult`)."""
    if r.source == "flags":
        what = "GRPO train step" if r.task == "grpo" else "sampler (prefill + decode loop)"
        shape = (
            f"{r.batch} sequences x {r.seq_len} tokens"
            if r.task == "grpo"
            else f"{r.batch} prompts of {r.prompt_len} tokens, KV cache of {r.seq_len} slots"
        )
        title = f"{r.config}: {what}, {shape}"
    else:
        title = f"{r.source}: one {r.task.upper()} step of {r.config}, microbatches of {r.batch} x {r.seq_len} tokens"
    lines = [
        title,
        f"topology {r.topology}: {r.chips} x TPU {r.chip} (libtpu {r.libtpu_topology}); mesh {mesh_text(r.mesh)}",
        (f"remat {r.remat}; " if r.remat != "-" else "")
        + f"attention {r.attention} (block {r.attention_block}); parameters {r.param_dtype}, compute {r.dtype}",
        f"parameters: {_count(r.params)} ({_count(r.matmul_params)} in each token's matmuls)",
        f"chip: {r.peak_flops / 1e12:.0f} TFLOP/s bf16, {_gib(r.hbm_capacity_bytes)} GiB HBM at "
        f"{r.hbm_bandwidth / 1e9:.0f} GB/s",
    ]
    for p in r.programs:
        times = f", x {p.executions:,.0f} per step" if p.executions != 1 else ""
        lines.append(f"[{p.phase}: {p.name}] on {p.chips} chips{times}; compiled in {p.compile_s:.1f} s")
        if p.error is not None:
            need = f" (needs {_gib(p.required_bytes)} GiB)" if p.required_bytes else ""
            lines.append(f"  DOES NOT FIT: XLA: {p.error}{need}")
            continue
        verdict = "fits" if p.fits else "DOES NOT FIT"
        beside = f" + {_gib(p.resident_bytes)} kept alive beside it" if p.resident_bytes else ""
        lines.append(
            f"  memory per chip (GiB): arguments {_gib(p.argument_bytes)}, outputs {_gib(p.output_bytes)} "
            f"({_gib(p.alias_bytes)} aliased to donated arguments), temporaries {_gib(p.temp_bytes)}; "
            f"peak {_gib(p.peak_bytes)}{beside} = {_gib(p.step_peak_bytes)} of {_gib(r.hbm_capacity_bytes)} "
            f"-> {verdict}"
        )
        lines.append(
            f"  per chip per execution: {_si(p.flops, 'FLOP')} (matmuls and kernels, loops unrolled), "
            f"HBM traffic {_si(p.hbm_bytes, 'B')} -> {_seconds(max(p.compute_s, p.memory_s))} "
            f"({'compute' if p.compute_s >= p.memory_s else 'HBM'}-bound); XLA cost_analysis (each loop body "
            f"once): {_si(p.xla_flops, 'FLOP')}, {_si(p.xla_bytes_accessed, 'B')} accessed"
        )
        coll = ", ".join(
            f"{kind} {int(c['ops'])} ops ({c['executed']:.0f} executed, {_si(c['bytes'], 'B')})"
            for kind, c in sorted(p.collectives.items())
        )
        lines.append(f"  collectives in the HLO: {coll or 'none'}")
    for ph in r.phases:
        ratio = ph.flops * ph.chips / ph.model_flops if ph.model_flops else 0.0
        model = (
            f"{ratio:.2f} x 6·N·tokens ({ph.tokens:,} trained tokens"
            if ph.name == "train"
            else f"{ratio:.2f} x 2·N·tokens (prompt and generated; {ph.tokens:,} generated tokens"
        )
        lines.append(
            f"{ph.name}: {_si(ph.flops, 'FLOP')} per chip x {ph.chips} chips = {model}, N = "
            f"{_count(r.matmul_params)}); roofline: compute {_seconds(ph.compute_s)}, HBM {_seconds(ph.memory_s)} -> "
            f"{_seconds(ph.time_s)} ({ph.bound}-bound), {ph.tokens_per_s:,.0f} tokens/s, MFU {100 * ph.mfu:.1f}%"
        )
    if not r.fits:
        lines.append(f"result: does not fit in {_gib(r.hbm_capacity_bytes)} GiB per chip on {r.topology}")
    else:
        if len(r.phases) > 1:
            lines.append(
                f"step (roofline estimate; communication and overheads not modelled): {_seconds(r.step_s)}, "
                f"MFU {100 * r.mfu:.1f}% over the whole step"
            )
        else:
            lines.append(
                f"roofline estimate (peak FLOP/s and HBM bandwidth; communication and overheads not modelled): "
                f"{_seconds(r.step_s)} per {'step' if r.task != 'sample' else 'sampler run'} ({r.bound}-bound), "
                f"{r.tokens_per_s:,.0f} tokens/s, MFU {100 * r.mfu:.1f}%"
            )
        lines.append(f"result: fits, peak {_gib(r.peak_bytes)} of {_gib(r.hbm_capacity_bytes)} GiB per chip")
    if r.capacity is not None:
        lines.extend(format_capacity(r.capacity))
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)


def format_capacity(c) -> list[str]:
    """The capacity section (`aot.capacity.Capacity`) of the text report."""
    ratio = f"{c.ratio:.2f}x" if c.ratio is not None else "no contiguous sequence fits"
    lines = [
        f"capacity (sequences at once on the {c.chips} generator chips, mesh {mesh_text(c.mesh)}): completions "
        f"{c.lengths} of a {c.budget:,}-token budget (mean {c.mean_length:,.0f} tokens, {c.mean_fraction:.3f} of "
        f"it), prompts of {c.prompt_len:,}; paged: pages of {c.page_size}, groups of {c.group_size} sharing their "
        f"prompt pages, a reserve of {c.reserve} tokens",
        f"  KV cache {c.kv_bytes_per_token / 1024:,.1f} KiB per token, each byte on {c.cache_replication} chip(s), "
        f"and {_si(c.row_bytes, 'B')} of other state per row; free for the rows: {_gib(c.free_bytes)} GiB (every "
        f"chip's HBM minus the decode program's "
        f"{_gib(c.decode_peak_bytes - c.decode_cache_bytes - c.decode_row_bytes)} GiB per chip besides its rows' "
        f"state, compiled for {c.decode_rows} rows)",
    ]
    for name, k, what in (
        ("contiguous", c.contiguous, "slots reserved"),
        ("paged", c.paged, "tokens' pages held on average in flight"),
    ):
        lines.append(
            f"  {name}: {k.tokens_per_sequence:,.0f} {what} = {_gib(k.bytes_per_sequence)} GiB per sequence -> "
            f"{k.sequences:,} sequences; decode step reads {_si(k.step_bytes, 'B')} (weights "
            f"{_si(c.weight_bytes, 'B')}, KV {_si(k.kv_read_bytes, 'B')}) -> {k.tokens_per_s:,.0f} tokens/s "
            "(roofline estimate)"
        )
    lines.append(f"  paged / contiguous: {ratio} the sequences at once")
    return lines


def format_search(candidates, best) -> str:
    """A table of every candidate (`aot.search.Candidate`) and the verdict."""
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
