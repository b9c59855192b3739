"""The `magistral-jax` command line: one entry point, a subcommand per capability."""

from __future__ import annotations

import argparse
import sys

from magistral_jax.cli import demo

_COMMANDS = (demo,)


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
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
