"""A training run's directory, written by `train`: config, architecture, side files, checkpoints, metrics.

    RUN_DIR/
      config.yaml            the run config `train` was started with
      magistral_config.json  the model's architecture (the file this project's Orbax checkpoints carry)
      files/                 the tokenizer and system prompt the run trains with (exported beside the weights)
      checkpoints/N/         Orbax train state (parameters, optimizer state, step) and JSON metadata (data position)
      metrics.jsonl          one line per step; `eval/...` fields at evaluations
      tb/                    TensorBoard events

A run directory belongs to one run: starting `train` on a directory that holds a run with another
config (another kind, model, data, reward, ...) is refused, naming the fields that differ; only the
fields in `resume_overrides` (and those in `OPERATIONAL`, which change how a run is executed or
kept, not what it trains) may differ when resuming. Reading a run back for its weights:
`checkpoint.runs`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax

from magistral_jax.checkpoint.configs import MAGISTRAL_CONFIG, architecture_dict, read_config
from magistral_jax.checkpoint.runs import EVAL_METRIC, FILES, RUN_CONFIG, checkpoint_manager, select_step
from magistral_jax.config import ConfigError, ModelConfig

METRICS = "metrics.jsonl"
OPERATIONAL = frozenset(
    {
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite",
        "resume_overrides",
        "grpo.reward_workers",
        "async_rl.verifiers",
    }
)
# Sections compared as a whole (free-form mappings).
_OPAQUE = ("data", "reward", "model_overrides", "eval.data", "eval.reward")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _OPAQUE:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _diff(before: dict[str, Any], now: dict[str, Any], allowed: frozenset[str] | set[str] = frozenset()) -> list[str]:
    a, b = _flatten(before), _flatten(now)
    return [
        f"{k}: {a.get(k, '(unset)')!r} in the run, {b.get(k, '(unset)')!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in allowed and k.split(".")[0] not in allowed
    ]


def check_same_run(run_dir: str, cfg_dict: dict[str, Any], allowed: list[str]) -> None:
    """Refuses to start a run in a directory that holds another one (a ConfigError naming the fields)."""
    import yaml

    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            before = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}); is {run_dir} a run directory?") from None
    if not isinstance(before, dict):
        raise ConfigError(f"{path}: not a run config; is {run_dir} a run directory?")
    diff = _diff(before, cfg_dict, set(allowed) | OPERATIONAL)
    if diff:
        raise ConfigError(
            f"run_dir {run_dir} holds another run ({'; '.join(diff)}): choose another run_dir, or list the fields "
            "meant to change in resume_overrides (e.g. resume_overrides=[steps])"
        )


def check_same_model(run_dir: str, cfg: ModelConfig) -> None:
    """Refuses to resume with another architecture than the run's, naming the fields that differ."""
    path = os.path.join(run_dir, MAGISTRAL_CONFIG)
    if os.path.exists(path):
        diff = _diff(architecture_dict(read_config(path)), architecture_dict(cfg))
        if diff:
            raise ConfigError(f"run_dir {run_dir}: the model differs from the run's ({'; '.join(diff)})")


def write_run_files(run_dir: str, cfg_dict: dict[str, Any], model_cfg: ModelConfig, files: dict[str, str]) -> None:
    """Writes config.yaml, the architecture, and the side files (name -> a file to copy, or text)."""
    import yaml

    with open(os.path.join(run_dir, RUN_CONFIG), "w") as f:
        yaml.safe_dump(cfg_dict, f, sort_keys=False)
    with open(os.path.join(run_dir, MAGISTRAL_CONFIG), "w") as f:
        json.dump(architecture_dict(model_cfg), f, indent=2)
    directory = os.path.join(run_dir, FILES)
    os.makedirs(directory, exist_ok=True)
    for name, content in files.items():
        target = os.path.join(directory, name)
        if os.path.isfile(content):
            if not os.path.exists(target) or not os.path.samefile(content, target):
                shutil.copyfile(content, target)
        else:
            with open(target, "w") as f:
                f.write(content)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored, a corrupt
    line elsewhere is an error naming it."""
    with open(path, errors="replace") as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                break
            raise ConfigError(f"{path}:{i + 1}: not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ConfigError(f"{path}:{i + 1}: a JSON object with an integer `step` is expected")
        rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl (cut back to the resumed step, a torn last line dropped) and TensorBoard events."""

    def __init__(self, run_dir: str, resume_step: int):
        self.path = os.path.join(run_dir, METRICS)
        if os.path.exists(self.path):
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class Checkpoints:
    """Orbax train-state checkpoints: the trainer's state plus a JSON of the data state; the last
    `keep` steps and the best evaluated one are kept."""

    def __init__(self, run_dir: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = checkpoint_manager(run_dir, keep, read_only=False)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def select(self, which: str | int) -> int:
        return select_step(self.manager, which)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], evaluation: float | None = None) -> None:
        """Saves checkpoint `step`; `evaluation`: its `eval/pass@1`, which makes it a candidate for best."""
        ocp = self.ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=None if evaluation is None else {EVAL_METRIC: evaluation})

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        ocp = self.ocp
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
            like,
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
