"""Training run directories as a checkpoint format: which checkpoint, its architecture, its parameters.

A run directory (`train.run_dir` writes it) holds `config.yaml`, `magistral_config.json` (the
model's architecture), `files/` (the tokenizer and system prompt it trains with) and
`checkpoints/N/` (Orbax train state). Reading one for its weights restores only the parameters of
the chosen checkpoint, straight into their shardings: the optimizer state is never read.

Which checkpoint: `best` (the best evaluated one, `eval/pass@1`, the later one on a tie; the latest
where the run has no evaluation), `latest`, or a step number.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from magistral_jax.checkpoint.configs import MAGISTRAL_CONFIG, read_config
from magistral_jax.config import ConfigError, ModelConfig, flatten_model_fields, get_preset

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
FILES = "files"
EVAL_METRIC = "eval/pass@1"


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, RUN_CONFIG)) and os.path.isdir(os.path.join(path, CHECKPOINTS))


def architecture(init_from: str | None, model: str, model_overrides: dict[str, Any], param_dtype: str) -> ModelConfig:
    """The model a run config names: the architecture of `init_from` (a checkpoint or a run
    directory) or of `model` (a preset or a model YAML), with `model_overrides` (`text: {n_layers:
    2}` in YAML, `model_overrides.text.n_layers=2` on the command line) and `param_dtype`."""
    if init_from:
        base = run_model_config(init_from) if is_run_dir(init_from) else read_config(init_from)
    elif os.path.exists(model) or model.endswith((".yaml", ".yml")):
        base = read_config(model)
    else:
        base = get_preset(model)
    return base.replace(**flatten_model_fields(model_overrides)).replace(param_dtype=param_dtype)


def run_model_config(run_dir: str) -> ModelConfig:
    """The architecture of a run's model (its parameters stored in the run's `param_dtype`)."""
    path = os.path.join(run_dir, MAGISTRAL_CONFIG)
    if os.path.exists(path):
        return read_config(path)
    # A run written before the architecture was stored beside its config: derive it from the config.
    import yaml

    with open(os.path.join(run_dir, RUN_CONFIG)) as f:
        d = yaml.safe_load(f) or {}
    return architecture(
        d.get("init_from"), d.get("model", "tiny"), d.get("model_overrides") or {}, d.get("param_dtype", "float32")
    )


def _quiet_unevaluated_saves(record: logging.LogRecord) -> bool:
    # Orbax warns at every save without metrics once the best is tracked: most steps are not evaluated.
    return not str(record.msg).startswith("Requested `tracked_metric`")


def checkpoint_manager(run_dir: str, keep: int = 1, *, read_only: bool = True):
    """The run's Orbax CheckpointManager: it keeps the last `keep` steps and the best evaluated one."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

    metric = lambda m: m[EVAL_METRIC]  # noqa: E731
    policy = pp.AnyPreservationPolicy(
        [pp.LatestN(keep), pp.BestN(get_metric_fn=metric, n=1, keep_checkpoints_without_metrics=False)]
    )
    # `best_fn` makes Orbax write each checkpoint's metrics to disk, so the best survives a restart.
    absl_logger = logging.getLogger("absl")
    if _quiet_unevaluated_saves not in absl_logger.filters:
        absl_logger.addFilter(_quiet_unevaluated_saves)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=metric, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)), options=options)


def best_step(manager) -> int | None:
    """The best evaluated step (the later one on a tie), or None without evaluations."""
    scored = []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and EVAL_METRIC in metrics:
            scored.append((float(metrics[EVAL_METRIC]), step))
    return max(scored)[1] if scored else None


def select_step(manager, which: str | int) -> int:
    """The step `which` names: `best`, `latest`, or a step number."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise ConfigError(f"{manager.directory}: the run has no checkpoint yet")
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = best_step(manager)
        return steps[-1] if best is None else best
    if not str(which).isdigit() or int(which) not in steps:
        raise ConfigError(f"{manager.directory}: no checkpoint {which!r}; best, latest or one of the steps {steps}")
    return int(which)


def restore_params(manager, step: int, abstract_params: Any, progress: bool = False) -> Any:
    """Only the parameters of checkpoint `step`, laid out as `abstract_params` (ShapeDtypeStructs
    with shardings) says; nothing else is read. With `progress`, one weight at a time under a
    progress bar (in bytes)."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from magistral_jax.checkpoint.reader import set_at

    def restore(params: Any) -> Any:
        item = {"params": params}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item
        )
        args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=args))
        except ValueError as e:
            raise ConfigError(
                f"{manager.directory}/{step}: the parameters do not match the run's model ({e})"
            ) from None
        return out["state"]["params"]

    if not progress:
        return restore(abstract_params)
    leaves = [(tuple(k.key for k in path), x) for path, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    total = sum(x.size * x.dtype.itemsize for _, x in leaves)
    out: dict = {}
    with tqdm(total=total, desc=f"loading step {step}", unit="B", unit_scale=True) as bar:
        for path, x in leaves:
            one: dict = {}
            set_at(one, path, x)
            value = restore(one)
            for part in path:
                value = value[part]
            set_at(out, path, value)
            bar.update(x.size * x.dtype.itemsize)
    return out


def load_run_params(
    run_dir: str | os.PathLike[str], cfg: ModelConfig, mesh=None, step: str | int = "best", progress: bool = False
) -> Any:
    """The parameters of a run's checkpoint `step`, in the run's parameter dtype, placed by `cfg`'s
    rules on `mesh` (on the first local device without one), under a progress bar with `progress`.
    `cfg` must have the run's architecture (`run_model_config`); its rules decide the shardings."""
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P

    run_dir = os.fspath(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a training run directory (no {RUN_CONFIG} and {CHECKPOINTS}/)")
    stored = run_model_config(run_dir)
    abstract = P.abstract(param_specs(cfg), stored.param_dtype, mesh, cfg.rules)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    manager = checkpoint_manager(run_dir)
    try:
        return restore_params(manager, select_step(manager, step), abstract, progress)
    finally:
        manager.close()
