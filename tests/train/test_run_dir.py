"""Run directories: one run per directory, exact resume past torn metrics, finished runs, and which
checkpoints are kept and chosen."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magistral_jax.config import ConfigError, get_preset
from magistral_jax.train.config import load_run_config
from magistral_jax.train.loop import run
from magistral_jax.train.run_dir import Checkpoints, check_same_model, read_metrics

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
SFT_TINY = os.path.join(ROOT, "configs", "sft-tiny.yaml")


def _sft(run_dir, *extra):
    return load_run_config(
        SFT_TINY,
        [
            f"run_dir={run_dir}",
            "steps=1",
            "sft.batch_size=4",
            "microbatch_tokens=256",
            "model_overrides.text.n_layers=1",
            *extra,
        ],
    )


def test_a_run_directory_holds_one_run(tmp_path, capsys):
    run(_sft(tmp_path), progress=False)
    # Another data set, another model, another kind: refused, naming what differs; nothing written.
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds another run \(data: .*max_len.*\)"):
        run(_sft(tmp_path, "data.max_len=9"), progress=False)
    with pytest.raises(ConfigError, match=r"model_overrides: .*n_layers"):
        run(_sft(tmp_path, "model_overrides.text.n_layers=2"), progress=False)
    with pytest.raises(ConfigError, match=r"kind: 'sft' in the run, 'grpo' now"):
        run(load_run_config(None, ["kind=grpo", f"run_dir={tmp_path}", "steps=1"]), progress=False)
    with pytest.raises(ConfigError, match=r"steps: 1 in the run, 2 now.*resume_overrides"):
        run(_sft(tmp_path, "steps=2"), progress=False)
    assert (tmp_path / "config.yaml").read_text() == before
    # A finished run says so and gives its last metrics, whatever operational settings change.
    capsys.readouterr()
    last = run(_sft(tmp_path, "checkpoint_every=7"), progress=False)
    assert "already at step 1 of 1" in capsys.readouterr().err
    assert last["loss"] == read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"]
    # A run killed mid-write leaves a torn last line: resuming (here with a longer schedule, allowed
    # by resume_overrides) and plotting both go on.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.4')
    run(_sft(tmp_path, "steps=2", "resume_overrides=[steps]"), progress=False)
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    from magistral_jax.cli import main

    assert main(["plot", str(tmp_path), "--metrics", "loss"]) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000


def test_a_corrupt_metrics_line_inside_the_file_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_another_architecture_is_named_field_by_field(tmp_path):
    from magistral_jax.checkpoint.configs import MAGISTRAL_CONFIG, architecture_dict

    tiny = get_preset("tiny")
    (tmp_path / MAGISTRAL_CONFIG).write_text(json.dumps(architecture_dict(tiny)))
    check_same_model(str(tmp_path), tiny)
    with pytest.raises(ConfigError, match=r"text\.n_layers: 2 in the run, 3 now"):
        check_same_model(str(tmp_path), tiny.replace(**{"text.n_layers": 3}))


def test_the_best_evaluated_checkpoint_is_kept_and_chosen(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep=2)
    # pass@1 at the evaluated steps 2, 4 and 6; steps 1, 3, 5, 7, 8 are not evaluated.
    scores = {2: 0.25, 4: 0.625, 6: 0.625}
    for step in range(1, 9):
        state = {"params": {"w": jnp.full((3,), float(step))}, "opt_state": {"m": jnp.zeros((3,))}}
        checkpoints.save(step, state, {"step": step}, evaluation=scores.get(step))
    checkpoints.manager.wait_until_finished()
    # The last two and the best (a tie between 4 and 6 goes to the later step).
    assert sorted(checkpoints.manager.all_steps()) == [6, 7, 8]
    assert checkpoints.select("best") == 6 and checkpoints.select("latest") == 8
    assert checkpoints.select("7") == 7
    with pytest.raises(ConfigError, match=r"no checkpoint '3'"):
        checkpoints.select("3")
    checkpoints.close()
    # A resumed run (a new manager) still knows which one is best, and keeps it.
    resumed = Checkpoints(str(tmp_path), keep=2)
    for step in (9, 10):
        resumed.save(step, {"params": {"w": jnp.zeros(3)}, "opt_state": {"m": jnp.zeros(3)}}, {"step": step})
    resumed.manager.wait_until_finished()
    assert sorted(resumed.manager.all_steps()) == [6, 9, 10] and resumed.select("best") == 6
    resumed.close()
    # Without evaluations, best is the latest.
    plain = Checkpoints(str(tmp_path / "plain"), keep=1)
    for step in (1, 2):
        plain.save(step, {"params": {"w": jnp.zeros(2)}}, {"step": step})
    assert plain.select("best") == 2
    plain.close()


def test_parameters_restore_weight_by_weight_under_a_progress_bar(tmp_path, capsys):
    from magistral_jax.checkpoint.runs import checkpoint_manager, restore_params

    checkpoints = Checkpoints(str(tmp_path), keep=1)
    params = {"a": {"w": jnp.arange(6.0).reshape(2, 3) + 0.1}, "b": jnp.full((4,), 1.1)}
    checkpoints.save(1, {"params": params, "opt_state": {"m": jnp.ones(3)}}, {"step": 1})
    checkpoints.close()
    manager = checkpoint_manager(str(tmp_path))  # as a reader opens it
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    for progress in (False, True):
        got = restore_params(manager, 1, abstract, progress=progress)
        assert jax.tree.structure(got) == jax.tree.structure(params)
        for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
    manager.close()
    err = capsys.readouterr().err  # 6 + 4 float32 values
    assert "loading step 1" in err and "40.0/40.0" in err, err
