"""magistral-jax: Magistral / Mistral Small 24B in pure JAX.

import magistral_jax as mj
model = mj.load_model(path)              # Hugging Face checkpoint directory
logits = model.logits(tokens)            # int32 [batch, seq] -> float32 [batch, seq, vocab]
"""

from magistral_jax.api import Model, init_model, load_model
from magistral_jax.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    TextConfig,
    VisionConfig,
    from_hf_config,
    from_mistral_params,
    get_preset,
    read_config,
)
from magistral_jax.sharding import make_mesh

__all__ = [
    "PRESETS",
    "ConfigError",
    "Model",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "from_hf_config",
    "from_mistral_params",
    "get_preset",
    "init_model",
    "load_model",
    "make_mesh",
    "read_config",
]
