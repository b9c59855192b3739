"""`magistral-jax plan`: will it fit, and how fast might it run, on a TPU slice that is not here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

DESCRIPTION = """\
Compiles, ahead of time and from abstract shapes only (no parameter is allocated), the GRPO train
step or the sampler of a model for a named TPU slice, with libtpu's compile-only TPU devices on
this (CPU) machine, and reports per chip: memory (arguments, outputs, temporaries, peak, from
XLA's memory analysis) against the chip's HBM; the FLOPs of the compiled program (matmuls, every
loop unrolled: XLA's own cost_analysis counts each loop body once and is shown beside it) against
6·N·tokens (2·N·tokens for sampling; N = the parameters of a token's matmuls); HBM traffic; the
collectives in the HLO (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute);
and an estimated time and MFU.

The time is a ROOFLINE ESTIMATE, not a measurement: max(FLOPs / peak bf16 FLOP/s, HBM bytes /
HBM bandwidth) per chip, at the chip's published figures (v4 275 TFLOP/s, 32 GiB, 1200 GB/s; v5e
197, 16 GiB, 819 GB/s; v5p 459, 95 GiB, 2765 GB/s; v6e 918, 32 GiB, 1638 GB/s). Communication,
latency and imperfect overlap are not in it.

A plan that does not fit says so and exits 0; --search exits 1 when no candidate fits. Needs
libtpu (pip install -e '.[tpu]'). A 24B compile takes minutes on a small machine.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from magistral_jax.plan import DEFAULT_PROMPT_LEN, TOPOLOGIES

    p = sub.add_parser(
        "plan",
        help="compile a train step or the sampler for a TPU slice ahead of time: memory, FLOPs, roofline time",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="a preset (e.g. magistral-small-2509), a model config file (configs/*.yaml, config.json, "
        "params.json) or a checkpoint directory",
    )
    p.add_argument(
        "--topology",
        required=True,
        metavar="NAME",
        help=f"the TPU slice, named as Cloud TPU names them (v4-N and v5p-N count TensorCores, two per chip; "
        f"v5e-N and v6e-N count chips); known: {', '.join(TOPOLOGIES)}",
    )
    p.add_argument(
        "--task",
        required=True,
        choices=("grpo", "sample"),
        help="grpo: one GRPO train step (loss, gradients, clipped AdamW update; float32 master weights and "
        "optimizer state) on a packed batch; sample: the sampler's prefill and decode loop (bfloat16 weights)",
    )
    p.add_argument("--batch", type=int, required=True, help="grpo: sequences per step; sample: prompts")
    p.add_argument(
        "--seq-len",
        type=int,
        required=True,
        help="grpo: tokens per sequence; sample: KV-cache length (prompt plus generated tokens)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        help=f"sample only: prompt tokens; the rest of the cache is generated (default: min({DEFAULT_PROMPT_LEN}, "
        "seq-len / 2))",
    )
    p.add_argument(
        "--mesh",
        help="how the chips split over the mesh axes, e.g. data=1,fsdp=16,tensor=4 (one axis may be -1 for the "
        "rest; default: every chip on fsdp)",
    )
    p.add_argument(
        "--remat",
        choices=("none", "full", "save_matmuls", "save_qkv"),
        help="grpo only: rematerialisation of each layer in the backward pass: none (keep all activations), full "
        "(keep nothing inside a layer), save_matmuls (keep every projection's output), save_qkv (keep q, k, v); "
        "default: the config's",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        help="dtype of the parameters (and optimizer state); default float32 for grpo, bfloat16 for sample",
    )
    p.add_argument(
        "--attention",
        default="chunked",
        choices=("chunked", "xla"),
        help="attention implementation: chunked (default: blockwise online softmax, memory linear in the "
        "sequence), xla (the whole score matrix: memory quadratic in the sequence)",
    )
    p.add_argument(
        "--attention-block",
        type=int,
        help="query and key block of the chunked attention (default: the config's)",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="instead of one plan, try every split of the chips over data/fsdp/tensor (tensor 1, 2, 4, 8; data a "
        "power of two) and, for grpo, every remat policy; print them all and the fastest estimate that fits "
        "(skipping those that need more memory than one that did not fit); exit 1 if none fits",
    )
    p.add_argument("--dump-hlo", metavar="DIR", help="write each compiled program's optimized HLO text to DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes, FLOPs, seconds) instead of text")
    p.set_defaults(run=run)


def _load_config(name: str):
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

    from magistral_jax import plan as P

    P.topology(args.topology)  # refuses an unknown name before anything is compiled
    cfg = _load_config(args.config)
    kwargs = dict(
        param_dtype=args.param_dtype,
        attention=args.attention,
        attention_block=args.attention_block,
        prompt_len=args.prompt_len,
        dump_hlo=args.dump_hlo,
    )
    if args.search:
        if args.mesh or args.remat:
            raise ValueError("--search chooses the mesh and remat itself: drop --mesh and --remat")

        def progress(c: P.Candidate) -> None:
            if not args.json:
                state = c.skipped or ("fits" if c.fits else "does not fit")
                print(f"  tried mesh {P.mesh_text(c.mesh)} remat {c.remat}: {state}", file=sys.stderr, flush=True)

        candidates, best = P.search(
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
            print(P.format_search(candidates, best))
            if best is not None and best.result is not None:
                print()
                print(P.format_plan(best.result))
        return 0 if best is not None else 1
    result = P.plan(cfg, args.topology, args.task, args.batch, args.seq_len, mesh=args.mesh, remat=args.remat, **kwargs)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        print(P.format_plan(result))
    return 0
