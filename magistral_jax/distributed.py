"""Multi-host (multi-process) runs: `initialize` and the small cross-process helpers training uses.

One process runs on each host (under SLURM or Open MPI: one per GPU, as JAX's own detection
assumes), every process runs the same command, and together they see one global device mesh.
`initialize` must run before any JAX computation; `magistral-jax train` calls it first thing.

How the processes find each other:

- TPU pod slices on GKE, SLURM (`srun`, more than one task) and Open MPI (`mpirun`): nothing to
  set; the environment says it is a multi-process job and `jax.distributed.initialize()` reads
  the coordinator, process count and process id from it.
- Cloud TPU VM pod slices (their workers are known only to the metadata server) and other
  clusters JAX detects itself (Kubernetes, ...): `MAGISTRAL_DISTRIBUTED=auto` (`--distributed`)
  calls `jax.distributed.initialize()` without arguments.
- Anywhere else: every process is told the coordinator (`HOST:PORT` of process 0, a free port),
  the number of processes and its own id, by environment or by options of `train`:

      MAGISTRAL_COORDINATOR=10.0.0.1:7777 MAGISTRAL_NUM_PROCESSES=2 MAGISTRAL_PROCESS_ID=0 \\
          magistral-jax train sft --config ...        # and PROCESS_ID=1 on the second host
      magistral-jax train sft --coordinator 10.0.0.1:7777 --num-processes 2 --process-id 1 ...

  On CPU hosts the collectives between processes go through gloo.

`MAGISTRAL_DISTRIBUTED=off` ignores the cluster environment (a single-process run inside a
multi-task job). Without any of these settings nothing happens: one process, its own devices.

What each process does in training (see `train.loop`): it draws its own share of the batch (`batch
/ process_count` examples: `ProblemSource` reads its own shard of the rows, the procedural sources
keep their block of the examples a single process would draw), packs it into its rows of each
global microbatch, and the global arrays are assembled from every process's rows. Group
statistics (GRPO advantages, group filtering) are computed from rewards gathered from every
process, so they equal those of a single process on the whole batch. The run directory must be
on storage every host sees (Orbax writes the checkpoints from all processes); metrics.jsonl,
TensorBoard events, config.yaml, the progress bar and the printed metrics come from process 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "MAGISTRAL_COORDINATOR"
ENV_NUM_PROCESSES = "MAGISTRAL_NUM_PROCESSES"
ENV_PROCESS_ID = "MAGISTRAL_PROCESS_ID"
ENV_MODE = "MAGISTRAL_DISTRIBUTED"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: an integer is expected, got {value!r}") from None


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def cluster_environment() -> str | None:
    """The multi-process job environment JAX can read its settings from, if the environment
    variables show one (`slurm`, `ompi` or `gke-tpu`), else None."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in os.environ for v in slurm) and _int_env("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "gke-tpu"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str | None = None,
) -> bool:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`); returns whether
    this is a multi-process run.

    Arguments not given come from `MAGISTRAL_COORDINATOR`, `MAGISTRAL_NUM_PROCESSES` and
    `MAGISTRAL_PROCESS_ID`; `mode` (default `MAGISTRAL_DISTRIBUTED`) is `auto` to always call
    `jax.distributed.initialize()` (JAX detects the cluster), `off` to ignore the cluster
    environment, or empty to initialise when explicit settings are given or `cluster_environment`
    finds a multi-process job. Idempotent: a second call changes nothing. Must run before any JAX
    computation.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    mode = (os.environ.get(ENV_MODE, "") if mode is None else mode).strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{ENV_MODE}: {mode!r}; expected auto, off or nothing")
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"number of processes: a positive integer is expected, got {num_processes}")
    if num_processes == 1 and mode != "auto":
        if process_id not in (None, 0):
            raise ValueError(f"process id {process_id} of a single process; 0 is expected")
        return False
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"coordinator: HOST:PORT is expected (process 0's address), got {coordinator!r}")
    if not explicit and mode != "auto" and (mode == "off" or cluster_environment() is None):
        return False
    if explicit and mode != "auto" and cluster_environment() is None:
        missing = [
            name
            for name, value in (
                (f"coordinator ({ENV_COORDINATOR})", coordinator),
                (f"number of processes ({ENV_NUM_PROCESSES})", num_processes),
                (f"process id ({ENV_PROCESS_ID})", process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"multi-host: {', '.join(missing)} not given (outside a cluster JAX detects)")
    # On CPU the processes exchange data through gloo (an explicit `mpi` choice is kept); the
    # setting does not concern GPU or TPU backends.
    if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs and prints."""
    return jax.process_index() == 0


def allgather(x: np.ndarray | float | int) -> np.ndarray:
    """Every process's `x` (host values of one shape and dtype on all processes), stacked in
    process order: shape `[process_count, *x.shape]`."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    # As bytes: exact for any dtype (JAX would narrow 64-bit values without jax_enable_x64).
    raw = multihost_utils.process_allgather(np.ascontiguousarray(x).reshape(-1).view(np.uint8), tiled=False)
    return np.asarray(raw).view(x.dtype).reshape(jax.process_count(), *x.shape)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = allgather(np.int64(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = allgather(padded)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(rows, sizes, strict=True)]


def concat_lists(values: list[Any]) -> list[Any]:
    """Every process's list (JSON-serialisable items), concatenated in process order."""
    if jax.process_count() == 1:
        return list(values)
    return [v for part in allgather_objects(list(values)) for v in part]


def global_sum(x: float | int) -> float:
    """The sum of every process's `x`."""
    return x if jax.process_count() == 1 else allgather(x).sum().item()


def global_max(x: float | int) -> float:
    """The largest of every process's `x`."""
    return x if jax.process_count() == 1 else allgather(x).max().item()
