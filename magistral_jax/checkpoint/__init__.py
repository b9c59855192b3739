"""Checkpoints: their config files, the published safetensors layouts, Orbax, conversion and export."""

from magistral_jax.checkpoint.convert import FORMATS, convert, save_model
from magistral_jax.checkpoint.layouts import LAYOUTS, CheckpointError, NonFiniteWarning, plan
from magistral_jax.checkpoint.reader import open_checkpoint

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "CheckpointError",
    "NonFiniteWarning",
    "convert",
    "open_checkpoint",
    "plan",
    "save_model",
]
