"""What a run config builds: the model config, the model on the run's mesh, and the trainer."""

from __future__ import annotations

import jax

from magistral_jax.checkpoint.runs import architecture, is_run_dir, load_run_params
from magistral_jax.config import ModelConfig
from magistral_jax.train.config import RunConfig
from magistral_jax.train.step import Trainer, objective_of


def model_config(cfg: RunConfig) -> ModelConfig:
    """The model a run trains (see `run_dir.architecture`)."""
    return architecture(cfg.init_from, cfg.model, cfg.model_overrides, cfg.param_dtype)


def build_model(cfg: RunConfig, mesh, progress: bool = False):
    """The run's model on `mesh`: random parameters drawn with `seed`, or those of `init_from` (a
    run directory's chosen checkpoint: its parameters alone, restored straight into their
    shardings on `mesh`), loaded under a progress bar with `progress`."""
    from magistral_jax.api import Model, init_model, load_model
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P

    target = model_config(cfg)
    if not cfg.init_from:
        return init_model(target, cfg.seed, mesh=mesh)
    if is_run_dir(cfg.init_from):
        params = load_run_params(cfg.init_from, target, mesh, cfg.init_checkpoint, progress)
    else:
        loaded = load_model(cfg.init_from, mesh=mesh, dtype=None, check_finite=True, progress=progress)
        params = loaded.params
        if mesh is not None and loaded.cfg.rules != target.rules:
            params = jax.device_put(params, P.shardings(param_specs(target), mesh, target.rules))
    if jax.tree.leaves(params)[0].dtype != target.param_dtype:
        params = jax.tree.map(lambda x: x.astype(target.param_dtype), params)
    return Model(target, params, mesh)


def build_trainer(cfg: RunConfig, model=None, devices: list | None = None, progress: bool = False) -> Trainer:
    """The trainer of a run, around `model` or the model the config builds, on `devices` (default
    all; a given model is moved onto their mesh); `progress`: a progress bar while loading."""
    from magistral_jax.sharding import make_mesh, parse_mesh

    mesh = None
    if cfg.mesh or devices is not None or len(jax.devices()) > 1:
        mesh = make_mesh(**parse_mesh(cfg.mesh), devices=devices)
    if model is None:
        model = build_model(cfg, mesh, progress)
    elif devices is not None:
        from magistral_jax.model import param_specs
        from magistral_jax.model import params as P

        model.params = jax.device_put(model.params, P.shardings(param_specs(model.cfg), mesh, model.cfg.rules))
        model.mesh = mesh
    updates_per_step = cfg.grpo.minibatches if cfg.kind == "grpo" else 1
    return Trainer(
        model,
        cfg.optimizer,
        objective_of(cfg),
        total_steps=cfg.steps * updates_per_step,
        chunk=cfg.logprob_chunk,
        max_nonfinite=cfg.max_nonfinite,
    )
