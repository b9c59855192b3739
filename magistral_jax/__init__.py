"""magistral-jax: Magistral / Mistral Small 24B in pure JAX.

    import magistral_jax as mj
    model = mj.load_model(path)              # Hugging Face, Mistral or Orbax checkpoint directory
    logits = model.logits(tokens)            # int32 [batch, seq] -> float32 [batch, seq, vocab]

Names are imported lazily, so light submodules (rewards, data) load without JAX: reward worker
processes stay small.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Model": "magistral_jax.api",
    "init_model": "magistral_jax.api",
    "load_model": "magistral_jax.api",
    "PRESETS": "magistral_jax.config",
    "ConfigError": "magistral_jax.config",
    "ModelConfig": "magistral_jax.config",
    "TextConfig": "magistral_jax.config",
    "VisionConfig": "magistral_jax.config",
    "from_hf_config": "magistral_jax.checkpoint.configs",
    "from_mistral_params": "magistral_jax.checkpoint.configs",
    "get_preset": "magistral_jax.config",
    "read_config": "magistral_jax.checkpoint.configs",
    "make_mesh": "magistral_jax.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'magistral_jax' has no attribute {name!r}")
