"""`magistral-jax export`: the parameters of a training run, as a checkpoint others can load."""

from __future__ import annotations

import argparse

from magistral_jax.cli.convert import add_output_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a training run's parameters as a Hugging Face, Mistral or Orbax checkpoint",
        description=(
            "Writes the parameters of one checkpoint of RUN_DIR (a `magistral-jax train` run directory) to DST "
            "in the chosen format, with the tokenizer and system prompt the run trained with. Only the "
            "parameters are read (never the optimizer state), straight into their shards on --mesh, and the "
            "output is what `magistral-jax convert` writes for the same weights: HF output loads in "
            "transformers and vLLM, Mistral output is consolidated.safetensors + params.json. Without --dtype "
            "the weights keep the run's parameter dtype (its float32 master weights, usually); --dtype bf16 "
            "halves them for serving. DST must not exist."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    p.add_argument("dst", metavar="DST", help="directory to create")
    p.add_argument("--to", required=True, choices=["hf", "mistral", "orbax"], help="output format")
    p.add_argument(
        "--step",
        default="best",
        help="best (the best evaluated checkpoint, else the latest), latest, or a step number (default best)",
    )
    add_output_options(
        p,
        mesh_help="devices that hold the parameters while they are written, e.g. fsdp=8 (default: all devices on fsdp)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from magistral_jax import load_model
    from magistral_jax.checkpoint import save_model
    from magistral_jax.checkpoint.runs import FILES, is_run_dir
    from magistral_jax.config import ConfigError
    from magistral_jax.sharding import make_mesh, parse_mesh

    if not is_run_dir(args.run_dir):
        raise ConfigError(f"{args.run_dir}: not a training run directory (config.yaml and checkpoints/ expected)")
    mesh = make_mesh(**parse_mesh(args.mesh))
    model = load_model(args.run_dir, mesh=mesh, dtype=None, step=args.step, progress=not args.quiet)
    files = os.path.join(args.run_dir, FILES)
    save_model(
        model,
        args.dst,
        args.to,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
        progress=not args.quiet,
        side_files_from=files if os.path.isdir(files) else None,
    )
    print(f"wrote {args.dst} ({args.to}) from {args.run_dir}")
    return 0
