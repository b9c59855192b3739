"""Rewards and data sources named by import path, resolved in the spawned reward workers too, from a
module on PYTHONPATH and a working directory that is not the repository's."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from magistral_jax.plugins import load_object
from magistral_jax.train.config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REWARDS = '''
import os

from magistral_jax.rl.rewards import RewardOutput

IMPORTED_IN = os.getpid()  # the process that imported this module


def by_length(prompts, completions, *, scale=1.0, answer=None, **_):
    """scale x the completion's length, and where it was scored."""
    rewards = [scale * len(c) for c in completions]
    return RewardOutput(rewards, {"length": rewards, "imported_in": [float(IMPORTED_IN)] * len(rewards)})
'''
DATA = '''
from magistral_jax.data.procedural import Example


class Countdown:
    """Prompts [start, start - 1, ...] with the answer in the fields; the state is the position."""

    def __init__(self, seed, start=5, tokenizer=None):
        self.position, self.start, self.seed = 0, start, seed

    def next(self, n):
        out = [Example([self.start - self.position - i], None, {"answer": str(self.seed)}) for i in range(n)]
        self.position += n
        return out

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]
'''
SCRIPT = """
import json, os, sys
from magistral_jax.data.sources import make_source
from magistral_jax.rl.rewards import RewardPool
from magistral_jax.train.config import load_run_config

cfg = load_run_config(None, ["kind=grpo", "reward.name=myplugins.rewards:by_length", "reward.scale=0.5",
                             "data.name=myplugins.data:Countdown", "data.start=9"])
with RewardPool(cfg.reward["name"], {k: v for k, v in cfg.reward.items() if k != "name"}, workers=1) as pool:
    out = pool(["p"] * 4, ["a", "bb", "ccc", "dddd"], answer=["1"] * 4)
source = make_source(cfg.data, seed=3)
examples = source.next(2)
print(json.dumps({"parent": os.getpid(), "rewards": out.rewards, "imported_in": out.components["imported_in"],
                  "prompts": [e.prompt for e in examples], "fields": examples[0].fields, "state": source.state()}))
"""


@pytest.fixture
def plugins(tmp_path):
    package = tmp_path / "site" / "myplugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(REWARDS)
    (package / "data.py").write_text(DATA)
    return tmp_path / "site"


def test_a_reward_and_a_data_source_by_import_path_from_another_directory(plugins, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{ROOT}", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["rewards"] == [0.5, 1.0, 1.5, 2.0]
    # the workers imported the module themselves (spawned processes inherit no imports)
    workers = {int(pid) for pid in out["imported_in"]}
    assert workers and out["parent"] not in workers
    assert out["prompts"] == [[9], [8]] and out["fields"] == {"answer": "3"} and out["state"] == {"position": 2}


def test_import_paths_that_do_not_resolve_are_one_line_errors(plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(plugins))
    assert load_object("myplugins.rewards:by_length", "reward.name").__name__ == "by_length"
    for path, message in [
        (
            "nosuch.module:fn",
            r"reward.name: cannot import 'nosuch.module' \(No module named 'nosuch'\); is it on PYTHONPATH",
        ),
        ("myplugins.rewards:missing", r"reward.name: 'myplugins.rewards' has no attribute 'missing'"),
        ("myplugins.rewards:IMPORTED_IN", r"reward.name: 'myplugins.rewards:IMPORTED_IN' is a int, not a function"),
        ("myplugins.rewards:", r"is not an import path; expected package.module:function"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_object(path, "reward.name")
    from magistral_jax.data.sources import make_source

    with pytest.raises(ValueError, match=r"data \(myplugins.data:Countdown\): .*unexpected keyword argument 'low'"):
        make_source(
            load_run_config(None, ["kind=grpo", "data.name=myplugins.data:Countdown", "data.low=1"]).data, seed=0
        )
