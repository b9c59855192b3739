"""Multi-host: two processes on this machine (4 CPU devices each, gloo collectives, a localhost
coordinator) against one process on 8 simulated devices, on the same (data=2, fsdp=4) mesh.

The workers are this file run as a script, started with `MAGISTRAL_COORDINATOR`,
`MAGISTRAL_NUM_PROCESSES` and `MAGISTRAL_PROCESS_ID`. Each does what the test process does alone:
seeded sampling and streaming; two `Trainer` steps on fixed global microbatches, each process
passing its own rows; one `SFTStep` on its own block of the examples; a two-step GRPO `run`
(checkpoints after each step) and a second `run` that restores the last checkpoint. Then the
weight push of an asynchronous run whose trainer mesh spans both processes.

Tolerances (float32 throughout): sampling and the `Trainer` steps run the same global arrays
through the same programs: tokens and lengths agree exactly, log-probabilities, metrics and
parameters to rtol = atol = 1e-6. The SFT step and the GRPO run pack each process's sequences
separately, which changes the order of floating-point sums: metrics agree to rtol 1e-5, parameters
to atol 1e-5. (Adam's eps is 1e-3 so that its update is smooth in the gradient; with eps 1e-8,
near-zero gradients move elements by up to lr on rounding noise alone.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from magistral_jax.train.step import OptimizerConfig

MESH = {"data": 2, "fsdp": 4}
PROMPTS = [[1, 5, 7, 9, 11], [1, 4], [1, 8, 8, 8, 8, 3, 6, 11, 12], [1, 30, 31]]
# The optimizer (and 4 updates) of every trainer here, the GRPO run's, so they share one compiled update.
OPTIMIZER = OptimizerConfig(lr=0.003, warmup_steps=3, grad_clip=1.0, b2=0.99, eps=1e-3)
WORKER_TIMEOUT = 300  # seconds for the workers, from their start; a hung collective fails the test


def _model():
    """The GRPO run's model (tiny, one layer) with random parameters drawn on the host (cheaper
    than compiling the initializer), placed on the 8-device mesh."""
    import magistral_jax as mj
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P
    from magistral_jax.sharding import host_array_to_global

    cfg = mj.get_preset("tiny").replace(**{"text.n_layers": 1})
    mesh = mj.make_mesh(**MESH)
    rng = np.random.default_rng(0)

    def place(spec, sharding):
        x = np.ones(spec.shape) if spec.init is P.ones else rng.normal(0.0, 0.1, spec.shape)
        return host_array_to_global(x.astype(np.float32), sharding)

    specs = param_specs(cfg)
    return mj.Model(cfg, jax.tree.map(place, specs, P.shardings(specs, mesh, cfg.rules), is_leaf=P.is_spec), mesh)


def _microbatches():
    """Two global microbatches of 8 rows of 32 (the GRPO run's shape), policy-gradient fields set."""
    from magistral_jax.rl.losses import get_variant
    from magistral_jax.train.packing import Item, pack

    rng = np.random.default_rng(0)
    groups, size = 4, 6
    rewards = rng.normal(size=groups * size)
    group_ids = np.repeat(np.arange(groups), size)
    prompts = [rng.integers(3, 256, rng.integers(3, 9)).tolist() for _ in range(groups)]
    completions = [rng.integers(3, 256, rng.integers(2, 20)).tolist() for _ in range(groups * size)]
    adv, weights = get_variant("magistral").fn(rewards, group_ids, np.array([len(c) for c in completions]), 20)
    items = [
        Item(prompts[g] + c, len(prompts[g]), float(w), float(a), rng.normal(-5.0, 0.1, len(c)).tolist())
        for g, c, a, w in zip(group_ids, completions, adv, weights, strict=True)
    ]
    microbatches = pack(items, row_len=32, rows=8).microbatches
    assert len(microbatches) == 2
    return microbatches


def _own_rows(microbatches, model):
    """This process's block of rows of each global microbatch (all of them in one process)."""
    from dataclasses import replace

    from magistral_jax.sharding import logical_sharding, process_rows

    shape = microbatches[0].tokens.shape
    rows = process_rows(logical_sharding(model.mesh, ("batch", "act_seq"), model.cfg.rules, shape), shape)
    n = shape[0] // jax.process_count()
    assert rows == slice(n * jax.process_index(), n * (jax.process_index() + 1))
    fields = ("tokens", "targets", "segment_ids", "positions", "weights", "advantages", "old_logprobs", "ref_logprobs")
    return [replace(mb, **{f: getattr(mb, f)[rows] for f in fields}) for mb in microbatches]


def _host_params(model) -> dict[str, np.ndarray]:
    from magistral_jax.sharding import to_host

    return {
        "params" + jax.tree_util.keystr(p): to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(model.params)
    }


def step_and_sample() -> dict[str, np.ndarray]:
    """Seeded sampling and streaming, then two train steps; everything as host arrays. (Shapes,
    sampling and objective are the GRPO run's, so the run reuses the compiled code.)"""
    from magistral_jax.data.procedural import ReverseDigits
    from magistral_jax.sampling import Sampler, SamplingParams
    from magistral_jax.train.config import load_run_config
    from magistral_jax.train.loop import TIMING_METRICS, ProcessShard
    from magistral_jax.train.sft import SFTStep
    from magistral_jax.train.step import Objective, Trainer

    model = _model()
    sampler = Sampler(model, stop_ids=(2,))
    sampling = SamplingParams(temperature=1.0)
    out = sampler.sample(PROMPTS, max_new_tokens=8, n=4, sampling=sampling, seed=3)
    chunks = [c.tokens for c in sampler.stream(PROMPTS, max_new_tokens=8, n=4, sampling=sampling, seed=3, chunk=5)]
    result = {
        "tokens": out.tokens,
        "logprobs": out.logprobs,
        "raw_logprobs": out.raw_logprobs,
        "lengths": out.lengths,
        "streamed": np.array([[t for c in chunks for t in c[r]] == out.completion(r) for r in range(len(out.lengths))]),
    }
    trainer = Trainer(model, OPTIMIZER, Objective(), total_steps=4)
    local = _own_rows(_microbatches(), model)
    for step in range(2):
        for k, v in trainer.train_step(local).items():
            if k not in TIMING_METRICS:
                result[f"metric{step}/{k}"] = np.asarray(v)
    result.update(_host_params(model))
    # One SFT step of the loop: each process its own block of 8 examples, packed on its own.
    cfg = load_run_config(None, ["microbatch_tokens=256", "row_len=32"], kind="sft")
    sft = SFTStep(cfg, Trainer(model, OPTIMIZER, Objective(kind="sft"), total_steps=4))
    examples = ProcessShard(ReverseDigits(seed=0), jax.process_index(), jax.process_count()).next(
        8 // jax.process_count()
    )
    for k, v in sft(examples, 0).items():
        if k not in (*TIMING_METRICS, "padding_saved"):
            result[f"sft/{k}"] = np.asarray(v)
    return {**result, **{f"sft/{k}": v for k, v in _host_params(model).items()}}


def grpo_run(run_dir) -> dict[str, np.ndarray]:
    """Two GRPO steps (checkpoints after each), then `run` again: it restores the last checkpoint,
    has nothing left to do and returns the last step's metrics as written (the primary process's
    timings). Returns the restored parameters."""
    from magistral_jax.train.config import load_run_config
    from magistral_jax.train.loop import TIMING_METRICS, run

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    cfg = load_run_config(
        os.path.join(root, "configs", "grpo-tiny.yaml"),
        [
            f"run_dir={run_dir}",
            "steps=2",
            "checkpoint_every=1",
            "microbatch_tokens=256",
            "row_len=32",
            "grpo.prompts_per_step=4",
            "grpo.group_size=4",
            "grpo.minibatches=2",
            "optimizer.eps=0.001",
            "reward.tokens=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31]",
        ],
    )
    assert cfg.optimizer == OPTIMIZER and cfg.steps * cfg.grpo.minibatches == 4
    last = run(cfg, progress=False, model=_model())
    model = _model()
    again = run(cfg, progress=False, model=model)
    assert {k: v for k, v in again.items() if k not in TIMING_METRICS} == pytest.approx(
        {k: v for k, v in last.items() if k not in TIMING_METRICS}
    )
    assert "loss" in again
    return _host_params(model)


def async_weight_push() -> None:
    """The sub-meshes of an asynchronous run over both processes (2 generator and 2 trainer
    devices each; the trainer mesh spans the processes): the weight push gives each process's
    generator exactly the trainer's parameters."""
    import magistral_jax as mj
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P
    from magistral_jax.sharding import make_mesh, to_host
    from magistral_jax.train.async_grpo import split_devices
    from magistral_jax.train.policy import weight_push

    generators, trainers = split_devices(2, 2)
    assert [d.process_index for d in generators] == [jax.process_index()] * 2
    assert sorted(d.process_index for d in trainers) == [0, 0, 1, 1]
    cfg = mj.get_preset("tiny").replace(dtype="float32", param_dtype="float32")
    model = mj.init_model(cfg, 5, mesh=make_mesh(devices=trainers))
    pushed = weight_push(model.params, P.shardings(param_specs(cfg), make_mesh(devices=generators), cfg.rules))
    for got, want in zip(jax.tree.leaves(pushed), jax.tree.leaves(model.params), strict=True):
        assert got.is_fully_addressable and {d.id for d in got.devices()} <= {d.id for d in generators}
        np.testing.assert_array_equal(np.asarray(got), to_host(want))


def _worker(process_id: int, out_dir: str) -> None:
    from magistral_jax import distributed

    # The coordinator, process count and id come from the MAGISTRAL_* variables.
    assert distributed.initialize() and distributed.initialize()  # idempotent
    assert (jax.process_count(), jax.process_index(), jax.local_device_count()) == (2, process_id, 4)
    np.savez(os.path.join(out_dir, f"step{process_id}.npz"), **step_and_sample())
    np.savez(os.path.join(out_dir, f"run{process_id}.npz"), **grpo_run(os.path.join(out_dir, "grpo")))
    async_weight_push()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out_dir) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAGISTRAL_")}
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            MAGISTRAL_COORDINATOR=f"localhost:{port}",
            MAGISTRAL_NUM_PROCESSES="2",
            MAGISTRAL_PROCESS_ID=str(i),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(i), str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen], deadline: float) -> None:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"the workers did not finish within {WORKER_TIMEOUT} s") from None
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"worker {i} failed:\n{log[-4000:]}"


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _compare(got, want, what, rtol, atol, loose=()):
    """`got` equals `want` to (rtol, atol), to 1e-5 for keys starting with one of `loose`."""
    assert sorted(got.files) == sorted(want), what
    for key in want:
        tol = (1e-5, 1e-5) if any(key.startswith(prefix) for prefix in loose) else (rtol, atol)
        np.testing.assert_allclose(got[key], want[key], *tol, err_msg=f"{what}: {key}")


def test_two_processes_equal_one(tmp_path):
    from magistral_jax.train.loop import TIMING_METRICS

    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    deadline = time.monotonic() + WORKER_TIMEOUT
    procs = _start_workers(multi)
    try:  # the reference, while the workers run
        want_step = step_and_sample()
        want_run = grpo_run(single)
    finally:
        _wait(procs, deadline)

    assert want_step["streamed"].all()
    for i in range(2):
        got = np.load(multi / f"step{i}.npz")
        for key in ("tokens", "lengths", "streamed"):
            np.testing.assert_array_equal(got[key], want_step[key], err_msg=f"process {i}: {key}")
        _compare(got, want_step, f"process {i}", rtol=1e-6, atol=1e-6, loose=("sft/",))

    a, b = _metrics(single), _metrics(multi / "grpo")
    assert [m["step"] for m in b] == [1, 2]  # written once, by process 0, not cut by the restoring call
    assert all(m["updates"] == 2 for m in a)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key not in (*TIMING_METRICS, "padding_saved"):
                np.testing.assert_allclose(y[key], x[key], rtol=1e-5, atol=1e-7, err_msg=f"step {x['step']}: {key}")
    assert sorted(os.listdir(multi / "grpo" / "checkpoints")) == ["1", "2"]
    assert os.path.isfile(multi / "grpo" / "config.yaml") and os.listdir(multi / "grpo" / "tb")
    for i in range(2):
        _compare(np.load(multi / f"run{i}.npz"), want_run, f"run, process {i}", rtol=0, atol=1e-5)


CLUSTER_VARIABLES = (
    "MAGISTRAL_COORDINATOR",
    "MAGISTRAL_NUM_PROCESSES",
    "MAGISTRAL_PROCESS_ID",
    "MAGISTRAL_DISTRIBUTED",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)


def test_initialize_settings(monkeypatch):
    from magistral_jax import distributed

    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # Nothing set, one process, or the cluster environment switched off: nothing happens.
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1, process_id=0) is False
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for name, value in {**slurm, "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_environment() is None  # a single task
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.cluster_environment() == "slurm"
    assert distributed.initialize(mode="off") is False
    for name in slurm:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t-0,t-1")
    assert distributed.cluster_environment() == "gke-tpu"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    assert not jax.distributed.is_initialized()

    # Settings that cannot work are refused before JAX is asked.
    monkeypatch.setenv("MAGISTRAL_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="MAGISTRAL_NUM_PROCESSES: an integer is expected"):
        distributed.initialize()
    monkeypatch.setenv("MAGISTRAL_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"coordinator \(MAGISTRAL_COORDINATOR\), process id .* not given"):
        distributed.initialize()
    with pytest.raises(ValueError, match="process id 2 is not in"):
        distributed.initialize("localhost:1234", process_id=2)
    with pytest.raises(ValueError, match="HOST:PORT is expected"):
        distributed.initialize("localhost", process_id=1)
    with pytest.raises(ValueError, match="expected auto, off or nothing"):
        distributed.initialize(mode="yes")
    assert not jax.distributed.is_initialized()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2])
