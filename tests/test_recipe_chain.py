"""The Magistral recipe as one chain, as a user runs it, at tiny dimensions on 8 simulated CPU devices.

A published-layout HF checkpoint (Mistral3, with tekken.json) -> `convert` to Orbax -> `train sft`
from the 24B SFT recipe file on a data x fsdp x tensor mesh, evaluated every few steps -> `train
grpo` from the 24B GRPO recipe file, `init_from` the SFT run (its best checkpoint), with the
Magistral reward on the bundled math problems, synchronously and asynchronously -> `export` to HF
and Mistral -> transformers serves the HF export with the logits of `load_model(run_dir)`, and the
Mistral export converts back to exactly the HF export. Every step goes through the command line
(`magistral_jax.cli.main`, in this process), with paths relative to a working directory that is
not the repository.
"""

import json
import os

import hf_reference as R
import numpy as np
import pytest
import torch

import magistral_jax as mj
from magistral_jax.cli import main
from magistral_jax.tokenizer import load_tokenizer, write_standin_tekken

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SFT_RECIPE = os.path.join(ROOT, "configs", "sft-magistral-small.yaml")
GRPO_RECIPE = os.path.join(ROOT, "configs", "grpo-magistral-small.yaml")
# Only sizes, paths and schedules change; objective, optimizer, reward, filtering and model settings
# stay the 24B recipes' own.
TINY = [
    "tokenizer=m-orbax/tekken.json",
    "mesh=data=2,fsdp=2,tensor=2",
    "microbatch_tokens=2048",
    "logprob_chunk=64",
    "optimizer.warmup_steps=1",
    "data.levels=[1]",
    "data.languages=[english]",
]
SFT = [
    *TINY,
    "init_from=m-orbax",
    "run_dir=runs/sft",
    "steps=40",
    "checkpoint_every=100",
    "sft.batch_size=16",
    "optimizer.lr=0.01",
    "optimizer.schedule=constant",
    "eval.every=20",
    "eval.data.path=bundled:math_multilingual",
    "eval.data.levels=[1]",
    "eval.data.languages=[english]",
    "eval.problems=4",
    "eval.k=2",
    "eval.max_new_tokens=40",
]
GRPO = [
    *TINY,
    "init_from=runs/sft",
    "steps=2",
    "checkpoint_every=1",
    "grpo.group_size=4",
    "grpo.prompts_per_step=4",
    "grpo.max_new_tokens=40",
    "grpo.max_draws=2",
    "grpo.reward_workers=1",
    "reward.l_max=40",
    "reward.l_cache=8",
    "optimizer.lr=0.001",
]


def _cli(*argv):
    assert main([str(a) for a in argv]) == 0, argv


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs the chain once; returns its working directory."""
    work = tmp_path_factory.mktemp("chain")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        hf = R.mistral3(seed=11, vocab=2048, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=64)
        hf.save_pretrained("m-hf")
        write_standin_tekken("m-hf/tekken.json", vocab_size=2048)
        _cli("convert", "m-hf", "m-orbax", "--to", "orbax", "--quiet")
        _cli("train", "sft", "--config", SFT_RECIPE, *SFT, f"init_from={work}/m-orbax", "--quiet")  # TEMP abs
        _cli("train", "grpo", "--config", GRPO_RECIPE, *GRPO, "run_dir=runs/grpo", "--quiet")
        _cli(
            "train",
            "grpo",
            "--config",
            GRPO_RECIPE,
            *GRPO,
            "run_dir=runs/grpo-async",
            "async_rl.enabled=true",
            "async_rl.generator_devices=4",
            "async_rl.trainer_devices=4",
            "async_rl.max_prompt_len=512",
            "async_rl.chunk=8",
            "mesh=data=1,fsdp=2,tensor=2",
            "--quiet",
        )
        for fmt in ("hf", "mistral"):
            _cli("export", "runs/grpo", f"export-{fmt}", "--to", fmt, "--quiet")
        _cli("convert", "export-mistral", "export-back-hf", "--to", "hf", "--quiet")
        yield work
    finally:
        os.chdir(cwd)


def test_sft_evaluates_and_grpo_starts_from_its_best_checkpoint(chain):
    sft = _metrics(chain / "runs/sft")
    evals = {row["step"]: row["eval/pass@1"] for row in sft if "eval/pass@1" in row}
    assert sorted(evals) == [20, 40]
    best = max(evals, key=lambda s: (evals[s], s))
    # The best evaluated checkpoint is kept beside the latest, and is where GRPO starts.
    assert str(best) in os.listdir(chain / "runs/sft/checkpoints")
    for run_dir in ("runs/grpo", "runs/grpo-async"):
        grpo = _metrics(chain / run_dir)
        assert [row["step"] for row in grpo] == [1, 2]
        assert all(row["groups_drawn"] >= row["groups_trained"] for row in grpo)


def test_the_hf_export_serves_the_runs_logits_in_transformers(chain):
    from transformers import Mistral3ForConditionalGeneration

    tok = load_tokenizer(chain / "export-hf")
    ids = np.array([tok.encode_chat("Tom has 3 apples and gets 4 more. How many apples does Tom have now?")])
    ours = np.asarray(mj.load_model(chain / "runs/grpo", dtype="float32", step="latest").logits(ids))
    ref = Mistral3ForConditionalGeneration.from_pretrained(chain / "export-hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids)).logits.numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    # The export carries the tokenizer and the system prompt the run trained with.
    assert (chain / "export-hf" / "tekken.json").read_bytes() == (chain / "m-hf" / "tekken.json").read_bytes()
    assert (chain / "export-hf" / "SYSTEM_PROMPT.txt").read_text() == tok.training_system_prompt()


def test_the_mistral_export_converts_back_to_the_hf_export_byte_for_byte(chain):
    names = sorted(os.listdir(chain / "export-hf"))
    assert names == sorted(os.listdir(chain / "export-back-hf"))
    for name in names:
        assert (chain / "export-hf" / name).read_bytes() == (chain / "export-back-hf" / name).read_bytes(), name
