"""Helpers shared by the command-line tests."""

import contextlib
import os
import signal
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


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


class Block(NamedTuple):
    """A fenced code block of the README: the heading it stands under, its language, its text."""

    section: str
    language: str
    text: str


def readme_blocks(language: str | None = None, section: str | None = None) -> list[Block]:
    """The README's fenced code blocks in order; only those of `language` (`bash`, `python`, ...)
    and only those directly under the heading `section` (a whole heading line, e.g.
    `### Converting`) when given. A `#` line inside a block is a shell comment, not a heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    blocks, heading, fence = [], "", None
    for line in lines:
        if fence is None and line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif fence is not None and line.startswith("```"):
            blocks.append(Block(heading, fence[0], "".join(fence[1])))
            fence = None
        elif fence is not None:
            fence[1].append(line)
        elif line.startswith("#"):
            heading = line.strip()
    assert fence is None, "README.md: a code block is not closed"
    return [b for b in blocks if language in (None, b.language) and section in (None, b.section)]


# The published schemas of the paper's benchmarks, as tests write them.
GPQA_HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Explanation", "Record ID", "High-level domain"]  # fmt: skip


def lcb_compressed(tests) -> str:
    """LiveCodeBench's private tests as published: base64 of zlib of a pickled JSON string."""
    import base64
    import json
    import pickle
    import zlib

    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
