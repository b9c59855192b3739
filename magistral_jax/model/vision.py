"""The Pixtral vision encoder and the patch-merger projector: declarations, inputs and forward.

Dimension letters: L vision layers, H vision hidden, N vision heads, K vision head dim,
F vision FFN hidden, P patch size, C channels, D decoder model dim.

Layouts: `patch_conv` is `[P, P, C, H]` (a patch flattened in row, column, channel order, i.e.
HWC pixels, times the kernel); q/k use the "rotate_half" RoPE layout of Hugging Face checkpoints,
like the decoder; the projector's `merge` input is channel-major (index `c * 4 + ki * 2 + kj` for a
2 x 2 merge), as in the published weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from magistral_jax.config import ModelConfig, VisionConfig
from magistral_jax.images import ImageError, image_tokens
from magistral_jax.model import decoder
from magistral_jax.model import params as P
from magistral_jax.model.attention import attention
from magistral_jax.model.blocks import attention_block, remat, swiglu_block
from magistral_jax.model.layers import rms_norm, round_up, vision_rope_angles
from magistral_jax.sharding import constrain


def param_specs(cfg: VisionConfig, text_dim: int) -> P.ParamTree:
    """Declarations of the vision encoder (`vision`) and the projector (`projector`)."""
    L, H, N, K, F = cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.head_dim, cfg.intermediate_size
    p, c, m = cfg.patch_size, cfg.num_channels, cfg.spatial_merge_size
    D = text_dim
    encoder = {
        "patch_conv": P.ParamSpec((p, p, c, H), (None, None, None, "vision_embed"), P.fan_in(p, p, c)),
        "ln_pre": P.ParamSpec((H,), ("norm",), P.ones),
        "layers": {
            "attention_norm": P.ParamSpec((L, H), ("layers", "norm"), P.ones),
            "wq": P.ParamSpec((L, H, N, K), ("layers", "vision_embed", "vision_heads", "head_dim"), P.fan_in(H)),
            "wk": P.ParamSpec((L, H, N, K), ("layers", "vision_embed", "vision_heads", "head_dim"), P.fan_in(H)),
            "wv": P.ParamSpec((L, H, N, K), ("layers", "vision_embed", "vision_heads", "head_dim"), P.fan_in(H)),
            "wo": P.ParamSpec((L, N, K, H), ("layers", "vision_heads", "head_dim", "vision_embed"), P.fan_in(N, K)),
            "ffn_norm": P.ParamSpec((L, H), ("layers", "norm"), P.ones),
            "w1": P.ParamSpec((L, H, F), ("layers", "vision_embed", "vision_mlp"), P.fan_in(H)),
            "w3": P.ParamSpec((L, H, F), ("layers", "vision_embed", "vision_mlp"), P.fan_in(H)),
            "w2": P.ParamSpec((L, F, H), ("layers", "vision_mlp", "vision_embed"), P.fan_in(F)),
        },
    }
    projector = {
        "norm": P.ParamSpec((H,), ("norm",), P.ones),
        "merge": P.ParamSpec((m * m * H, H), ("vision_merged", "vision_embed"), P.fan_in(m * m * H)),
        "w_in": P.ParamSpec((H, D), ("vision_embed", "projector_hidden"), P.fan_in(H)),
        "w_out": P.ParamSpec((D, D), ("projector_hidden", "embed"), P.fan_in(D)),
    }
    return {"vision": encoder, "projector": projector}


# ------------------------------------------------------------------------------------------------
# Inputs: all images of a batch as one flat, bucketed sequence of patches
# ------------------------------------------------------------------------------------------------

PATCH_BUCKET = 256
MERGED_BUCKET = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
    """The images of a batch, flattened into one patch sequence (built on the host by `prepare`).

    Shapes are rounded up to buckets (patches to a multiple of `PATCH_BUCKET`, merged tokens to a
    multiple of `MERGED_BUCKET`), so batches whose images differ in size share compiled code as
    long as their totals fall in the same buckets. Padding patches have image id 0 (they see and
    are seen by nothing) and padding targets point past the sequence (they are dropped).

    Attributes:
      patches: [Np, P*P*C] pixels of each patch, flattened in (row, column, channel) order.
      image_ids: [Np] 1-based index of the patch's image in the batch, 0 for padding.
      rows, cols: [Np] the patch's position in its image's grid (2D RoPE).
      merge_index: [Nm, m*m] the patches of each merged token, in (ki, kj) row-major order.
      target_batch, target_pos: [Nm] where each merged token goes in the token sequence.
    """

    patches: jax.Array
    image_ids: jax.Array
    rows: jax.Array
    cols: jax.Array
    merge_index: jax.Array
    target_batch: jax.Array
    target_pos: jax.Array


def prepare(tokens: np.ndarray, pixels: Sequence[Sequence[np.ndarray]], cfg: VisionConfig) -> VisionInputs | None:
    """Lays out the preprocessed images (`pixels[b]`: float32 `[3, H, W]` arrays of sequence b, in
    order) for `embed_with_images`, after checking that the tokens hold exactly their image tokens.

    Each image must appear in its sequence as its full token block (see `images.image_tokens`), in
    order; an image without its block, a block without its image, or any other `[IMG]` token is an
    `ImageError` (features are never silently misaligned with tokens). None when there are no images.
    """
    tokens = np.asarray(tokens)
    if len(pixels) != tokens.shape[0]:
        raise ImageError(f"images: one list per sequence is expected, got {len(pixels)} for {tokens.shape[0]}")
    p, m = cfg.patch_size, cfg.spatial_merge_size
    patches, ids, rows, cols, merge, tb, tp = [], [], [], [], [], [], []
    n_patches = 0
    image_id = 0
    for b, images in enumerate(pixels):
        row = tokens[b]
        cursor = 0
        for k, px in enumerate(images):
            px = np.asarray(px, np.float32)
            if px.ndim != 3 or px.shape[0] != cfg.num_channels:
                raise ImageError(f"sequence {b}, image {k}: pixels [{cfg.num_channels}, H, W] expected, got {px.shape}")
            block = image_tokens(px, cfg)
            found = np.flatnonzero(row[cursor:] == cfg.image_token_id)
            if not found.size:
                raise ImageError(f"sequence {b}: image {k} has no [IMG] tokens left ({len(images)} images given)")
            start = cursor + int(found[0])
            if row[start : start + len(block)].tolist() != block:
                raise ImageError(
                    f"sequence {b}, image {k}: the tokens at {start} do not match the image's "
                    f"{px.shape[1]} x {px.shape[2]} layout ({len(block)} tokens expected)"
                )
            h, w = px.shape[1] // p, px.shape[2] // p
            image_id += 1
            patches.append(px.reshape(cfg.num_channels, h, p, w, p).transpose(1, 3, 2, 4, 0).reshape(h * w, -1))
            ids.append(np.full(h * w, image_id, np.int32))
            grid_r, grid_c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            rows.append(grid_r.reshape(-1))
            cols.append(grid_c.reshape(-1))
            br, bc, kr, kc = np.meshgrid(
                np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij"
            )
            merge.append((n_patches + (br * m + kr) * w + bc * m + kc).reshape(-1, m * m))
            targets = start + np.flatnonzero(np.asarray(block) == cfg.image_token_id)
            tb.append(np.full(len(targets), b, np.int32))
            tp.append(targets)
            n_patches += h * w
            cursor = start + len(block)
        extra = np.flatnonzero(row[cursor:] == cfg.image_token_id)
        if extra.size:
            raise ImageError(
                f"sequence {b}: [IMG] token at {cursor + int(extra[0])} belongs to no image "
                f"({len(images)} images given)"
            )
    if not patches:
        return None
    n_merged = sum(len(t) for t in tp)
    np_pad, nm_pad = round_up(n_patches, PATCH_BUCKET), round_up(n_merged, MERGED_BUCKET)

    def pad(parts, size, fill=0):
        x = np.concatenate(parts)
        return np.concatenate([x, np.full((size - len(x), *x.shape[1:]), fill, x.dtype)])

    return VisionInputs(
        patches=jnp.asarray(pad(patches, np_pad)),
        image_ids=jnp.asarray(pad(ids, np_pad)),
        rows=jnp.asarray(pad(rows, np_pad).astype(np.int32)),
        cols=jnp.asarray(pad(cols, np_pad).astype(np.int32)),
        merge_index=jnp.asarray(pad(merge, nm_pad).astype(np.int32)),
        target_batch=jnp.asarray(pad(tb, nm_pad)),
        target_pos=jnp.asarray(pad(tp, nm_pad, tokens.shape[1]).astype(np.int32)),
    )


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

# The Pixtral tower's norms use a fixed epsilon; the projector's norm uses the decoder's.
ENCODER_NORM_EPS = 1e-5


def encode(params: P.ParamTree, inputs: VisionInputs, cfg: ModelConfig) -> jax.Array:
    """Image features in the decoder's space: [Nm, D], one per merged 2 x 2 patch block."""
    v = cfg.vision
    assert v is not None
    enc, proj = params["vision"], params["projector"]
    dtype = cfg.dtype
    with jax.named_scope("vision"):
        weight = enc["patch_conv"].astype(dtype).reshape(-1, v.hidden_size)
        x = (inputs.patches.astype(dtype) @ weight)[None]
        x = rms_norm(x, enc["ln_pre"], ENCODER_NORM_EPS)
        x = constrain(x, ("batch", "act_seq", "act_embed"), cfg.rules)
        angles = vision_rope_angles(inputs.rows[None], inputs.cols[None], v.head_dim, v.rope_theta)
        segments = inputs.image_ids[None]
        zeros = jnp.zeros_like(segments)

        def attend(q, k, vv):
            out = attention(
                q,
                k,
                vv,
                q_positions=zeros,
                q_segments=segments,
                kv_positions=zeros,
                kv_segments=segments,
                causal=False,
                impl=cfg.attention,
                block=cfg.attention_block,
            )
            return out, None, None

        def layer(x, lp):
            lp = jax.tree.map(lambda w: w.astype(dtype), lp)
            x, _ = attention_block(x, lp, angles, attend, ENCODER_NORM_EPS, cfg.rules)
            return swiglu_block(x, lp, ENCODER_NORM_EPS, cfg.rules), None

        x, _ = jax.lax.scan(remat(layer, cfg.remat), x, enc["layers"])
    with jax.named_scope("projector"):
        h = rms_norm(x[0], proj["norm"], v.norm_eps)
        # [Nm, m*m, H] -> [Nm, H * m*m] with the channel major, as the published merging layer expects.
        merged = jnp.swapaxes(h[inputs.merge_index], 1, 2).reshape(inputs.merge_index.shape[0], -1)
        merged = merged @ proj["merge"].astype(dtype)
        hidden = jax.nn.gelu(merged @ proj["w_in"].astype(dtype), approximate=False)
        return hidden @ proj["w_out"].astype(dtype)


def embed_with_images(params: P.ParamTree, tokens: jax.Array, inputs: VisionInputs, cfg: ModelConfig) -> jax.Array:
    """Token embeddings with each image's features scattered into its `[IMG]` positions."""
    x = decoder.embed(params, tokens, cfg)
    features = encode(params, inputs, cfg).astype(x.dtype)
    return x.at[inputs.target_batch, inputs.target_pos].set(features, mode="drop")
