"""`magistral-jax train sft|grpo` and `magistral-jax plot`."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train with SFT or GRPO (resumable)",
        description=(
            "Trains with SFT or the Magistral GRPO objective as the config says, writing checkpoints, "
            "RUN_DIR/metrics.jsonl (one line per step) and TensorBoard events. Running the same command "
            "again resumes from the latest checkpoint in run_dir. Overrides are dotted KEY=VALUE pairs, "
            "e.g. steps=20 optimizer.lr=1e-5 grpo.group_size=16 (see configs/ for the keys). "
            "With async_rl.enabled=true, GRPO runs asynchronously: generators and trainers on disjoint "
            "devices, weights pushed to the generators in flight (configs/grpo-tiny-async.yaml; on the CPU "
            "the command simulates the devices the config asks for). "
            "Multi-host: run the same command on every host (one process per host; per GPU under SLURM). "
            "TPU pods on GKE, SLURM jobs of several tasks and Open MPI are detected from the environment; "
            "Cloud TPU VM pods need --distributed; anywhere else give every process --coordinator HOST:PORT "
            "(process 0's address, a free port), --num-processes N and its own --process-id I (or "
            "MAGISTRAL_COORDINATOR, MAGISTRAL_NUM_PROCESSES, MAGISTRAL_PROCESS_ID). The batch is split "
            "evenly over the processes, each loading its own share; RUN_DIR must be on storage every host "
            "sees; logs and metrics come from process 0."
        ),
    )
    p.add_argument("kind", choices=["sft", "grpo"], help="what to train")
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="simulated CPU devices when running on the CPU (default: those an asynchronous config names, else 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-host (see magistral_jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 to N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() and let JAX detect the cluster (Cloud TPU VM pods)",
    )
    p.set_defaults(run=run_train)

    q = sub.add_parser(
        "plot",
        help="plot a run's metrics to PNG",
        description="Writes RUN_DIR/plots/*.png "
        "from RUN_DIR/metrics.jsonl: reward, loss, completion length, entropy and the rest.",
    )
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("--metrics", nargs="*", help="metric names to plot (default: all numeric ones)")
    q.set_defaults(run=run_plot)


def run_train(args: argparse.Namespace) -> int:
    from magistral_jax.cli.devices import simulate_devices
    from magistral_jax.train.config import load_run_config

    cfg = load_run_config(args.config, args.overrides, kind=args.kind)
    if args.devices:
        simulate_devices(args.devices)
    elif cfg.kind == "grpo" and cfg.async_rl.enabled and cfg.async_rl.trainer_devices:
        # The generator and trainer devices, simulated when this runs on the CPU.
        simulate_devices(cfg.async_rl.generator_devices + cfg.async_rl.trainer_devices)
    from magistral_jax import distributed

    # Before any JAX computation: joins the other processes of a multi-host run, if any.
    distributed.initialize(
        args.coordinator, args.num_processes, args.process_id, mode="auto" if args.distributed else None
    )
    from magistral_jax.train.loop import run

    metrics = run(cfg, progress=not args.quiet)
    if distributed.is_primary():
        print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from magistral_jax.train.run_dir import read_metrics

    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no metrics to plot")
    rows = read_metrics(path)  # a torn last line (a run killed mid-write) is left out
    if not rows:
        raise ValueError(f"{path}: empty")
    names = args.metrics or sorted(
        {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, int | float)}
    )
    out = os.path.join(args.run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    for name in names:
        points = [(r["step"], r[name]) for r in rows if name in r]
        if not points:
            raise ValueError(f"{name}: not in {path}")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points, strict=True))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{os.path.basename(os.path.abspath(args.run_dir))}: {name}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name.replace('/', '_')}.png"), dpi=110)
        plt.close(fig)
    print(f"wrote {len(names)} plots to {out}")
    return 0
