"""The `magistral-jax` command line: one entry point, a subcommand per capability."""

from __future__ import annotations

import argparse
import sys

from magistral_jax.cli import bench, convert, demo, evaluate, export, generate, plan, score, train

_COMMANDS = (demo, convert, generate, train, export, score, evaluate, bench, plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magistral-jax",
        description="Magistral / Mistral Small 24B in pure JAX. Run a subcommand with --help for its options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may follow options (`train grpo --config f.yaml steps=10`).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    from magistral_jax.checkpoint import CheckpointError
    from magistral_jax.config import ConfigError
    from magistral_jax.train.step import TrainingError

    try:
        return int(args.run(args) or 0)
    except (CheckpointError, ConfigError, TrainingError, ValueError, OSError) as e:
        print(f"magistral-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
