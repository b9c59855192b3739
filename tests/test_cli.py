"""The `magistral-jax` entry point and the demo, run as a user would (fresh processes)."""

import json
import os
import subprocess
import sys

import pytest

from magistral_jax.cli import build_parser


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "magistral_jax", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_the_commands():
    out = _run("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout
    sub = _run("demo", "--help")
    assert sub.returncode == 0 and "--steps" in sub.stdout and "simulated CPU devices" in sub.stdout


def test_no_command_prints_help_and_fails():
    out = _run()
    assert out.returncode == 2 and "usage: magistral-jax" in out.stdout


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--steps", "many"])
    out = _run("demo", "--steps", "0")
    assert out.returncode != 0 and "must be positive" in out.stderr


def test_demo_learns_and_writes_its_outputs(tmp_path):
    out = _run("demo", "--steps", "150", "--batch", "32", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "of 8 cpu devices" in out.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 150
    # Uniform guessing over the 256-token vocabulary costs ln(256) = 5.55 nats per answer token;
    # after 150 steps the model must have learnt most of the structure.
    assert sum(losses[:10]) / 10 > 4.0
    assert sum(losses[-10:]) / 10 < 1.5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # The sampler's log-probabilities must be those of a teacher-forced forward.
    line = next(s for s in out.stdout.splitlines() if "sampler vs teacher-forced forward" in s)
    assert float(line.rsplit("=", 1)[1]) < 1e-3
