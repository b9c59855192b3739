"""The public model object: `load_model`, `init_model` and `Model.logits`."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from magistral_jax.config import ModelConfig, canonical_dtype
from magistral_jax.images import ImageError, encode_image
from magistral_jax.model import decoder, param_specs, vision
from magistral_jax.model import params as P
from magistral_jax.sharding import host_array_to_global, logical_sharding


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, tokens, positions, segment_ids, images, cfg: ModelConfig):
    x = None if images is None else vision.embed_with_images(params, tokens, images, cfg)
    return decoder.forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids, embeddings=x)[0]


def _pixels(image: Any, cfg: ModelConfig, name: str) -> np.ndarray:
    # float [3, H, W] arrays are preprocessed already; anything else goes through mistral-common.
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    assert cfg.vision is not None
    return encode_image(image, cfg.vision, name)[1]


def image_inputs(tokens: np.ndarray, images: Sequence[Sequence[Any]], cfg: ModelConfig) -> vision.VisionInputs | None:
    """The vision inputs of a token batch and its images (per sequence, in order: PIL images,
    uint8 arrays, encoded bytes, or float32 `[3, H, W]` pixels already preprocessed)."""
    if cfg.vision is None:
        raise ImageError(f"{cfg.name} has no vision encoder: images cannot be given")
    pixels = [
        [_pixels(img, cfg, f"image {k} of sequence {b}") for k, img in enumerate(seq)] for b, seq in enumerate(images)
    ]
    return vision.prepare(np.asarray(tokens), pixels, cfg.vision)


@dataclass
class Model:
    """A configured model with its parameters, placed on `mesh` (or the default device)."""

    cfg: ModelConfig
    params: P.ParamTree
    mesh: Mesh | None = None

    def mesh_context(self) -> contextlib.AbstractContextManager:
        """`jax.set_mesh(self.mesh)`, or nothing without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def place_batch(self, x: np.ndarray | jax.Array) -> jax.Array:
        """Puts a [B, T] host array on the mesh with the activations' batch sharding."""
        if self.mesh is None or isinstance(x, jax.Array):
            return jnp.asarray(x)
        sharding = logical_sharding(self.mesh, ("batch", "act_seq"), self.cfg.rules, x.shape)
        return host_array_to_global(np.asarray(x), sharding)

    def logits(
        self,
        tokens: np.ndarray | jax.Array,
        *,
        images: Sequence[Sequence[Any]] | None = None,
        mask: np.ndarray | jax.Array | None = None,
        segment_ids: np.ndarray | jax.Array | None = None,
        positions: np.ndarray | jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits [batch, seq, vocab] of int32 `tokens` [batch, seq].

        Args:
          images: per sequence, the list of its images in order (PIL images, uint8 arrays, encoded
            bytes, or float32 `[3, H, W]` pixels already preprocessed); each must appear in the
            sequence as its `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` block (see `magistral_jax.images`).
          mask: 1 for real tokens, 0 for padding (left or right); shorthand for `segment_ids`.
          segment_ids: 0 for padding, one id per packed document.
          positions: RoPE positions; by default each document counts from 0.
        """
        tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens: an integer array [batch, seq] is expected, got {tokens.dtype}{tokens.shape}")
        if isinstance(tokens, np.ndarray) and tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.cfg.text.vocab_size:
                raise ValueError(f"tokens: ids must lie in [0, {self.cfg.text.vocab_size}), got [{lo}, {hi}]")
        if mask is not None and segment_ids is not None:
            raise ValueError("logits: pass either mask or segment_ids, not both")
        if mask is not None:
            segment_ids = (np.asarray(mask) != 0).astype(np.int32)
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
                raise ValueError(f"{name}: shape {tuple(tokens.shape)} expected, got {tuple(arr.shape)}")
        if segment_ids is None:
            segment_ids = np.ones(tokens.shape, np.int32)
        vision_inputs = None if images is None else image_inputs(np.asarray(tokens), images, self.cfg)
        with self.mesh_context():
            pos = None if positions is None else self.place_batch(np.asarray(positions, np.int32))
            return _logits(
                self.params,
                self.place_batch(tokens.astype(np.int32)),
                pos,
                self.place_batch(np.asarray(segment_ids, np.int32)),
                vision_inputs,
                self.cfg,
            )


def with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """`cfg` with parameters and compute in `dtype`; None keeps both as they are."""
    if dtype is None:
        return cfg
    dtype = canonical_dtype(dtype)
    return cfg.replace(param_dtype=dtype, dtype=dtype)


def init_model(cfg: ModelConfig, key: jax.Array | int = 0, mesh: Mesh | None = None, dtype: str | None = None) -> Model:
    """A model with random parameters, initialised directly in their shardings on `mesh`."""
    cfg = with_dtype(cfg, dtype)
    key = jax.random.key(key) if isinstance(key, int) else key
    return Model(cfg, P.init(param_specs(cfg), key, cfg.param_dtype, mesh, cfg.rules), mesh)


def load_model(
    path: str | os.PathLike[str],
    mesh: Mesh | None = None,
    dtype: str | None = "bfloat16",
    *,
    layout: str | None = None,
    progress: bool = False,
    step: str | int = "best",
    check_finite: bool = False,
) -> Model:
    """Loads a checkpoint directory of any supported format.

    Formats: Hugging Face (`config.json` + safetensors, one file or shards with an index; text-only
    or Mistral3 in either key layout), Mistral (`params.json` + `consolidated.safetensors`), this
    project's Orbax conversions (`magistral_config.json` + `params/`), and training run directories
    (the parameters alone of the checkpoint `step` names). Vision weights, where present, are
    loaded too (under `params["vision"]` and `params["projector"]`).

    Args:
      path: the checkpoint or run directory (relative or absolute).
      mesh: where to place the parameters (sharded by the config's rules); default device if None.
      dtype: parameter and compute dtype (`bfloat16`, `float32`, ...); None keeps the
        checkpoint's own dtype for the parameters and computes in bfloat16.
      layout: force the format or layout (`orbax`, `mistral`, `hf-legacy`, `hf-new`, `hf-text`).
      progress: show a progress bar.
      step: a run directory's checkpoint: `best` (its best evaluated one, else its latest), `latest`
        or a step number.
      check_finite: refuse parameters holding NaN or Inf (a `CheckpointError` naming the tensor),
        as training from a checkpoint does; off by default, where a damaged checkpoint shows
        itself in the logits.
    """
    from magistral_jax.checkpoint.reader import load_params, open_checkpoint
    from magistral_jax.checkpoint.runs import is_run_dir, load_run_params, run_model_config

    if layout is None and is_run_dir(path):
        stored = run_model_config(os.fspath(path))
        cfg = with_dtype(stored, dtype)
        params = load_run_params(path, stored, mesh, step, progress)
        if cfg.param_dtype != stored.param_dtype:
            params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
        return Model(cfg, params, mesh)
    ckpt = open_checkpoint(path, layout)
    cfg = with_dtype(ckpt.cfg, dtype)
    return Model(cfg, load_params(ckpt, cfg, mesh, progress=progress, check_finite=check_finite), mesh)
