"""Small building blocks shared by the decoder and the vision encoder, and the padded sizes
(`round_up`) that attention blocks, vision inputs and the sampler's buckets share.

Dimension letters: B batch, T sequence, N heads, K head dim, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rms_norm(x: Float[Array, "*B D"], weight: Float[Array, " D"], eps: float) -> Float[Array, "*B D"]:
    """`weight * normalise(x)`: statistics in float32, cast back to x's dtype before the weight.

    The weight multiplies directly (not `1 + weight`), as in Mistral and transformers.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Float[Array, " K/2"]:
    """`theta ** -(2i / head_dim)` for i < head_dim / 2, in float32."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponent)


def apply_rope(x: Float[Array, "B T N K"], angles: Float[Array, "B T K/2"]) -> Float[Array, "B T N K"]:
    """Rotates pairs (i, i + K/2) of every head by `angles` ("rotate_half" layout).

    This is the layout of Hugging Face checkpoints, whose q/k projections are permuted from
    Mistral's interleaved pairs (2i, 2i+1); the checkpoint readers convert between the two.
    Computed in float32 and cast back to x's dtype.
    """
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def text_rope_angles(positions: Int[Array, "B T"], head_dim: int, theta: float) -> Float[Array, "B T K/2"]:
    """RoPE angles `position * inv_freq` for 1D positions."""
    return positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)


def vision_rope_angles(
    rows: Int[Array, "B T"], cols: Int[Array, "B T"], head_dim: int, theta: float
) -> Float[Array, "B T K/2"]:
    """Pixtral's 2D RoPE angles: the first K/4 pairs rotate by the patch row times the even-indexed
    frequencies, the last K/4 by the column times the odd-indexed ones."""
    freqs = rope_inv_freq(head_dim, theta)
    return jnp.concatenate(
        [rows.astype(jnp.float32)[..., None] * freqs[0::2], cols.astype(jnp.float32)[..., None] * freqs[1::2]],
        axis=-1,
    )


def segment_positions(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Position of each token inside its segment (0 at each segment start; padding (id 0) gets 0).

    Works for left padding, right padding and packed documents alike: a new segment starts
    wherever the id changes.
    """
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segment_ids != 0, idx - start_idx, 0)


def round_up(x: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` that is at least `x` (`multiple` for x <= 0):
    padded sizes, so that nearby sizes share one compiled program."""
    return max(multiple, -(-x // multiple) * multiple)
