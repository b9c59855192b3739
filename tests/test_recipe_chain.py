"""The Magistral recipe as one chain, as the README's "The Magistral recipe, end to end" section
gives it, at tiny dimensions on 8 simulated CPU devices.

The README's own Python snippet writes a published-layout checkpoint (Mistral3, text and vision,
with tekken.json) with transformers, and its own commands run, in this process through the command
line (`magistral_jax.cli.main`), from a working directory that is not the repository (`configs/`
pointing at the repository's): `convert` to Orbax -> `train sft` from the 24B SFT recipe on a data x
fsdp x tensor mesh, evaluated every few steps -> `train grpo` from the 24B GRPO recipe, `init_from`
the SFT run (its best checkpoint), with the Magistral reward on the bundled math problems,
synchronously and asynchronously -> `export` to HF and Mistral -> `convert` the Mistral export back
to HF -> `generate` on the run directory. Then: transformers serves the HF export with the logits of
`load_model(run_dir)` and generates what `generate` printed, and the Mistral export converts back to
exactly the HF export.
"""

import contextlib
import io
import json
import os
import shlex

import numpy as np
import pytest
import torch
from helpers import ROOT, readme_blocks

import magistral_jax as mj
from magistral_jax.cli import main
from magistral_jax.tokenizer import load_tokenizer

SECTION = "### The Magistral recipe, end to end"


def _commands() -> list[list[str]]:
    """The tiny chain's command lines (the first bash block), with `configs/` made absolute."""
    lines = readme_blocks("bash", SECTION)[0].text.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        if not argv or argv[0] == "export":  # the environment: the tests simulate 8 devices already
            continue
        assert argv[0] == "magistral-jax", line
        commands.append([os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv[1:]])
    return commands


def _train_overrides(kind: str, run_dir: str) -> list[str]:
    (argv,) = [a for a in _commands() if a[:2] == ["train", kind] and f"run_dir={run_dir}" in a]
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _best(run_dir):
    evals = {row["step"]: row["eval/pass@1"] for row in _metrics(run_dir) if "eval/pass@1" in row}
    return evals, max(evals, key=lambda s: (evals[s], s))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs the README's chain once; returns its working directory and what `generate` printed."""
    work = tmp_path_factory.mktemp("chain")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        ((_, _, snippet),) = readme_blocks("python", SECTION)
        exec(compile(snippet, "README.md", "exec"), {})
        printed = io.StringIO()
        for argv in _commands():
            with contextlib.redirect_stdout(printed):
                assert main(argv) == 0, argv
        yield work, printed.getvalue()
    finally:
        os.chdir(cwd)


def test_sft_evaluates_and_grpo_trains_from_its_best_checkpoint(chain):
    work, _ = chain
    evals, best = _best(work / "runs/tiny-sft")
    assert sorted(evals) == [20, 40]
    # The best evaluated checkpoint is kept beside the latest.
    assert str(best) in os.listdir(work / "runs/tiny-sft/checkpoints")
    for run_dir in ("runs/tiny-grpo", "runs/tiny-grpo-async"):
        rows = _metrics(work / run_dir)
        assert [row["step"] for row in rows] == [1, 2]
        assert all(row["groups_drawn"] >= row["groups_trained"] for row in rows)
        # The cold start answers in the format often enough for groups with signal: GRPO trains.
        assert sum(row["updates"] for row in rows) >= 1


def test_the_hf_export_serves_the_runs_logits_in_transformers(chain):
    from transformers import Mistral3ForConditionalGeneration

    work, _ = chain
    tok = load_tokenizer(work / "tiny-grpo-hf")
    ids = np.array([tok.encode_chat("Tom has 3 apples and gets 4 more. How many apples does Tom have now?")])
    ours = np.asarray(mj.load_model(work / "runs/tiny-grpo", dtype="float32", step="latest").logits(ids))
    ref = Mistral3ForConditionalGeneration.from_pretrained(work / "tiny-grpo-hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    # The export carries the tokenizer and the system prompt the run trained with.
    assert (work / "tiny-grpo-hf/tekken.json").read_bytes() == (work / "tiny-m2509/tekken.json").read_bytes()
    assert (work / "tiny-grpo-hf/SYSTEM_PROMPT.txt").read_text() == tok.training_system_prompt()


def test_the_mistral_export_converts_back_to_the_hf_export_byte_for_byte(chain):
    work, _ = chain
    names = sorted(os.listdir(work / "tiny-grpo-hf"))
    assert names == sorted(os.listdir(work / "tiny-grpo-back-hf"))
    for name in names:
        assert (work / "tiny-grpo-hf" / name).read_bytes() == (work / "tiny-grpo-back-hf" / name).read_bytes(), name


def test_generate_on_the_run_directory_is_transformers_greedy_on_the_export(chain):
    from transformers import Mistral3ForConditionalGeneration

    work, printed = chain
    tokens = json.loads(printed.strip().splitlines()[-1])["tokens"]
    # `generate` used the run's own tokenizer and system prompt (files/), its float32 parameters
    # on a 2 x 2 mesh: transformers, greedy on the HF export, agrees token for token.
    (argv,) = [a for a in _commands() if a[0] == "generate"]
    prompt, budget = argv[argv.index("--prompt") + 1], int(argv[argv.index("--max-new-tokens") + 1])
    tok = load_tokenizer(work / "runs/tiny-grpo/files")
    ids = tok.encode_chat(prompt, tok.training_system_prompt())
    ref = Mistral3ForConditionalGeneration.from_pretrained(work / "tiny-grpo-hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False, eos_token_id=tok.eos_id)
    assert tokens == greedy[0, len(ids) :].tolist()


def test_grpo_restores_only_the_sft_parameters_into_its_own_mesh(chain, monkeypatch):
    import jax
    import orbax.checkpoint as ocp

    from magistral_jax.train.async_grpo import split_devices
    from magistral_jax.train.build import build_trainer
    from magistral_jax.train.config import load_run_config

    work, _ = chain
    monkeypatch.chdir(work)
    _, best = _best("runs/tiny-sft")
    # The oracle: the whole train state of that checkpoint, read back by Orbax itself.
    saved = ocp.StandardCheckpointer().restore(str(work / "runs/tiny-sft/checkpoints" / str(best) / "state"))
    restores = []
    original = ocp.CheckpointManager.restore

    def spy(self, step, args=None):
        restores.append(args)
        return original(self, step, args=args)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    recipe = os.path.join(ROOT, "configs", "grpo-magistral-small.yaml")
    for run_dir, devices in (("runs/tiny-grpo", jax.devices()), ("runs/tiny-grpo-async", split_devices(4, 4)[1])):
        overrides = [o for o in _train_overrides("grpo", run_dir) if not o.startswith("run_dir=")]
        cfg = load_run_config(recipe, [*overrides, "run_dir=runs/unused"], kind="grpo")
        trainer = build_trainer(cfg, devices=devices if cfg.async_rl.enabled else None)
        assert trainer.model.mesh.devices.size == len(devices)
        for path, x in jax.tree_util.tree_leaves_with_path(trainer.model.params):
            assert set(x.sharding.device_set) <= set(devices), jax.tree_util.keystr(path)
            want = saved["params"]
            for key in path:
                want = want[key.key]
            np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    # Only the parameters were asked of Orbax: the optimizer state was never read.
    assert restores and all(set(args.state.item) == {"params"} for args in restores)


def test_the_24b_recipes_build_what_the_tiny_chain_builds():
    """The chain runs the 24B recipe files themselves: apart from the keys it overrides (sizes, paths,
    schedules), the objective, optimizer, reward, filtering, sampling and model settings are theirs."""
    from magistral_jax.train.config import load_run_config, to_dict

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("data", "reward", "model_overrides"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    for kind, run_dir in (("sft", "runs/tiny-sft"), ("grpo", "runs/tiny-grpo")):
        recipe = os.path.join(ROOT, "configs", f"{kind}-magistral-small.yaml")
        overrides = _train_overrides(kind, run_dir)
        big, tiny = flat(to_dict(load_run_config(recipe))), flat(to_dict(load_run_config(recipe, overrides)))
        named = {o.split("=", 1)[0] for o in overrides}
        changed = {k for k in big if big[k] != tiny[k]}
        assert all(any(n == k or n.startswith(f"{k}.") for n in named) for k in changed), changed - named
        for section in ("data", "reward"):
            kept = {k: v for k, v in big[section].items() if f"{section}.{k}" not in named}
            assert kept == {k: tiny[section][k] for k in kept}
        assert tiny["model_overrides"] == big["model_overrides"]
        assert not {"grpo.loss", "grpo.eps_high", "grpo.kl_coef", "optimizer.b2", "param_dtype"} & named
