"""Helpers shared by the command-line tests."""

import contextlib
import os
import signal
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


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fails the test (TimeoutError) when the block takes longer than `seconds`: a blocking `open`
    of a FIFO is interrupted instead of hanging the suite."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
