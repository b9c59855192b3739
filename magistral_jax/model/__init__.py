"""The model: parameter declarations, layers, attention, decoder and vision encoder."""

from __future__ import annotations

from magistral_jax.config import ModelConfig
from magistral_jax.model import decoder, vision
from magistral_jax.model.params import ParamTree


def param_specs(cfg: ModelConfig) -> ParamTree:
    """Every parameter of the model: the decoder's at the top level, plus `vision` and
    `projector` when the config has a vision encoder."""
    specs = decoder.param_specs(cfg.text)
    if cfg.vision is not None:
        specs.update(vision.param_specs(cfg.vision, cfg.text.dim))
    return specs
