"""Helpers shared by the command-line tests."""

import os
import subprocess
import sys


def run_cli(*args, timeout=300):
    """`python -m magistral_jax ARGS` in a fresh process, as a user runs it (one CPU device)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "magistral_jax", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
