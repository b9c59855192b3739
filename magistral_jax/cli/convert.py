"""`magistral-jax convert`: checkpoints between the published layouts and Orbax."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a plain number of bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    value, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(value) * base ** " KMGT".index(unit.upper() or " "))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face, Mistral and Orbax formats",
        description=(
            "Converts SRC (a Hugging Face directory with config.json, a Mistral directory with "
            "params.json + consolidated.safetensors, or a magistral-jax Orbax conversion) into DST. "
            "Tensors stream one piece at a time, so the host never holds the model; without --dtype "
            "the weights are copied bit for bit. DST must not exist: it is written beside itself "
            "and renamed at the end, so a failed conversion leaves nothing behind."
        ),
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST", help="directory to create")
    p.add_argument("--to", required=True, choices=["orbax", "hf", "mistral"], help="output format")
    p.add_argument(
        "--from",
        dest="from_layout",
        choices=["orbax", "mistral", "hf-legacy", "hf-new", "hf-text"],
        help="force the source's format or layout instead of detecting it",
    )
    add_output_options(
        p,
        mesh_help="devices that assemble each tensor for --to orbax, e.g. fsdp=8 (its shards become the stored "
        "chunks); default: all devices on fsdp",
    )
    p.set_defaults(run=run)


def add_output_options(p: argparse.ArgumentParser, mesh_help: str) -> None:
    """The options of a command that writes a checkpoint (`convert`, `export`)."""
    p.add_argument("--dtype", choices=["bf16", "fp32", "bfloat16", "float32"], help="cast the weights")
    p.add_argument("--mesh", default="", help=mesh_help)
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="size limit of each safetensors file for --to hf (default 5GB)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from magistral_jax.checkpoint import convert
    from magistral_jax.sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.to == "orbax" else None
    convert(
        args.src,
        args.dst,
        args.to,
        dtype=args.dtype,
        from_layout=args.from_layout,
        mesh=mesh,
        max_shard_bytes=args.max_shard_size,
        progress=not args.quiet,
    )
    print(f"wrote {args.dst} ({args.to})")
    return 0
