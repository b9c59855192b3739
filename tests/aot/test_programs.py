"""The plan compiles what the run runs: on 8 simulated CPU devices, the programs `plan` builds for a
recipe have the same optimized HLO as those one synchronous GRPO step of that recipe runs (the
trainer's and the sampler's), and a change to the trainer's loss shows up in the plan."""

import re

import jax
import pytest

from magistral_jax.aot import programs as A
from magistral_jax.data.sources import make_source
from magistral_jax.rl.pool import RewardPool
from magistral_jax.sampling import sampler
from magistral_jax.train import step as train_step
from magistral_jax.train.build import build_trainer
from magistral_jax.train.config import load_run_config
from magistral_jax.train.sync_grpo import GRPOStep

PROMPT_LEN = 5
RECIPE = [
    "kind=grpo",
    "model=tiny",
    "mesh=data=2,fsdp=2,tensor=2",
    "steps=3",
    "model_overrides.text.n_layers=1",
    "microbatch_tokens=256",  # 4 rows of 64, 6 sequences of 11 tokens a row: 32 sequences, 2 microbatches
    "logprob_chunk=32",
    "grpo.loss=dr_grpo",  # keeps every group
    "grpo.prompts_per_step=4",
    "grpo.group_size=8",
    "grpo.max_new_tokens=6",
    "grpo.reward_workers=0",
    "grpo.eps_high=0.3",
    "optimizer.lr=0.01",
    "optimizer.warmup_steps=2",
    "optimizer.weight_decay=0.1",
    "data.name=random_prompts",
    f"data.min_len={PROMPT_LEN}",
    f"data.max_len={PROMPT_LEN}",
    "reward.name=token_frequency",
    "reward.token=7",
]


def _hlo(compiled):
    """Optimized HLO without source locations (the plan and the run call from different lines):
    the tables of files and stack frames before the computations, and each instruction's metadata."""
    text = re.sub(r"\nFileNames\n.*?\n(?=%|ENTRY)", "\n", compiled.as_text(), flags=re.S)
    return re.sub(r", metadata=\{[^}]*\}", "", text)


class Recorder:
    """Wraps a jitted program: counts its calls and keeps the optimized HLO of the first, compiled
    from the call's own arguments (before the call donates them)."""

    def __init__(self, name, fn, calls):
        self.name, self.fn, self.calls = name, fn, calls

    def __call__(self, *args, **kwargs):
        if self.name not in self.calls:
            self.calls[self.name] = [_hlo(self.fn.lower(*args, **kwargs).compile())]
        else:
            self.calls[self.name].append(None)
        return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return load_run_config(None, [*RECIPE, f"run_dir={tmp_path_factory.mktemp('run')}"])


@pytest.fixture(scope="module")
def one_step(recipe):
    """The programs one synchronous GRPO step of the recipe calls, with their arguments."""
    calls: dict[str, list] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "prefill", Recorder("prefill", sampler.prefill, calls))
        mp.setattr(sampler, "decode", Recorder("decode", sampler.decode, calls))
        mp.setattr(train_step, "microbatch_gradients", Recorder("gradients", train_step.microbatch_gradients, calls))
        mp.setattr(train_step, "accumulate_gradients", Recorder("accumulate", train_step.accumulate_gradients, calls))
        real_update = train_step.update_program
        mp.setattr(train_step, "update_program", lambda *a: Recorder("update", real_update(*a), calls))
        trainer = build_trainer(recipe)
        rewards = RewardPool("token_frequency", {"token": 7}, 0)
        try:
            step = GRPOStep(recipe, trainer, rewards, None)
            metrics = step(make_source(recipe.data, recipe.seed, None), 0)
        finally:
            rewards.close()
    return calls, metrics


def test_plan_compiles_the_programs_a_grpo_step_runs(recipe, one_step):
    calls, metrics = one_step
    assert metrics["updates"] == 1
    step = A.run_programs(recipe, jax.devices(), prompt_len=PROMPT_LEN)
    names = [p.name for p in step.programs]
    assert names == ["prefill", "decode", "gradients", "accumulate", "update"]
    assert set(calls) == set(names)
    # The plan counts a row per sequence (every completion at its budget; 8 microbatches), the
    # step packed 6 to a row.
    assert len(calls["gradients"]) == 2 and step.train.microbatches == 8
    assert step.programs[names.index("decode")].executions == recipe.grpo.max_new_tokens
    assert step.decode_rows == 4 * 8  # the capacity section's compiled rows: prompts x group size
    outputs = {}
    for program in step.programs:
        compiled, outputs[program.name] = A.compile_program(program, outputs)
        assert _hlo(compiled) == calls[program.name][0], program.name


def test_a_change_to_the_trainers_loss_shows_up_in_the_plan(recipe, monkeypatch):
    def gradients_program():
        jax.clear_caches()  # the change is in the code: a new process would trace it afresh
        program = next(p for p in A.run_programs(recipe, jax.devices(), PROMPT_LEN).programs if p.name == "gradients")
        with jax.set_mesh(program.mesh):
            return program.fn.lower(*program.inputs({}), **program.static).as_text()

    before = gradients_program()
    loss = train_step.microbatch_loss
    monkeypatch.setattr(train_step, "microbatch_loss", lambda *a: (3.0 * loss(*a)[0], loss(*a)[1]))
    after = gradients_program()
    assert after != before and "3.000000e+00" in after and "3.000000e+00" not in before
    monkeypatch.undo()
    assert gradients_program() == before
