"""The `magistral-jax` command line: one entry point, a subcommand per capability."""

from __future__ import annotations

import argparse
import sys

from magistral_jax.cli import bench, convert, demo, generate

_COMMANDS = (demo, convert, generate, bench)


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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from magistral_jax.checkpoint import CheckpointError
    from magistral_jax.config import ConfigError

    try:
        return int(args.run(args) or 0)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"magistral-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
