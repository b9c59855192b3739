"""The training loops end to end: learning, exact resume after SIGKILL, outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from magistral_jax.config import ConfigError
from magistral_jax.train.config import load_run_config
from magistral_jax.train.loop import TIMING_METRICS, run

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
GRPO_TINY = os.path.join(ROOT, "configs", "grpo-tiny.yaml")


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grpo_learns_a_trivial_reward(tmp_path):
    """Reward the token 7: the tiny model's mean reward climbs within a few dozen steps."""
    cfg = load_run_config(GRPO_TINY, [f"run_dir={tmp_path}", "steps=20", "checkpoint_every=20"])
    run(cfg, progress=False)
    rewards = [m["reward_mean"] for m in _metrics(tmp_path)]
    assert len(rewards) == 20
    assert np.mean(rewards[:3]) < 0.05 and np.mean(rewards[-3:]) > 0.3
    assert os.path.isdir(tmp_path / "tb") and os.listdir(tmp_path / "tb")
    row = _metrics(tmp_path)[-1]
    for key in (
        "loss",
        "reward_mean",
        "reward_token_frequency",
        "filtered_groups_frac",
        "completion_len_mean",
        "completion_len_max",
        "entropy",
        "clip_low_frac",
        "clip_high_frac",
        "logprob_drift",
        "grad_norm",
        "tokens_per_s",
        "time_sampling",
        "time_scoring",
        "time_training",
        "padding_saved",
    ):
        assert key in row, key
    # Colocated and on-policy: the trainer recomputes exactly the sampler's log-probabilities (fp32).
    assert max(m.get("logprob_drift", 0.0) for m in _metrics(tmp_path)) < 1e-5


def _train(run_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [
        sys.executable,
        "-m",
        "magistral_jax",
        "train",
        "grpo",
        "--config",
        GRPO_TINY,
        "--quiet",
        f"run_dir={run_dir}",
        "steps=6",
        "checkpoint_every=3",
        "grpo.prompts_per_step=4",
        "model_overrides.text.n_layers=1",
        "reward.tokens=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]",
        *extra,
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_state(run_dir):
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(run_dir, "checkpoints", "6", "state")))


def test_a_killed_run_resumes_exactly(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _train(whole)
    proc = _train(killed)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "3").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train(killed)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    a, b = _metrics(whole), _metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key not in TIMING_METRICS:
                assert x[key] == y[key], (x["step"], key)
    assert any(m["updates"] > 0 for m in a)
    sa, sb = _final_state(whole), _final_state(killed)
    leaves_a, leaves_b = [np.asarray(x) for x in _leaves(sa)], [np.asarray(x) for x in _leaves(sb)]
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_run_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.group_sise: unknown key"):
        load_run_config(GRPO_TINY, ["grpo.group_sise=4"])
    with pytest.raises(ConfigError, match="the config is for 'grpo', the command trains 'sft'"):
        load_run_config(GRPO_TINY, [], kind="sft")
    with pytest.raises(ConfigError, match="steps: a positive integer"):
        load_run_config(GRPO_TINY, ["steps=0"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="KEY=VALUE expected"):
        load_run_config(GRPO_TINY, ["steps"])
