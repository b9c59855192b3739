"""The Pixtral vision encoder and the patch-merger projector: parameter declarations.

Dimension letters: L vision layers, H vision hidden, N vision heads, K vision head dim,
F vision FFN hidden, P patch size, C channels, D decoder model dim.

Layouts: `patch_conv` is `[P, P, C, H]` (a patch flattened in row, column, channel order, i.e.
HWC pixels, times the kernel); q/k use the "rotate_half" RoPE layout of Hugging Face checkpoints,
like the decoder; the projector's `merge` input is channel-major (index `c * 4 + ki * 2 + kj` for a
2 x 2 merge), as in the published weights.
"""

from __future__ import annotations

from magistral_jax.config import VisionConfig
from magistral_jax.model import params as P


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
