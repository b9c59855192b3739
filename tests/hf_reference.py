"""Tiny random transformers models (the reference implementation) for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PixtralVisionConfig,
)


def text_config(
    vocab=101, dim=32, layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, eps=1e-5, theta=1e9
) -> MistralConfig:
    return MistralConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=theta,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Random weights with a useful logit scale; norm weights around 1 so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


def causal_lm(seed: int = 0, **kw) -> MistralForCausalLM:
    cfg = text_config(**kw)
    cfg._attn_implementation = "eager"
    return randomize(MistralForCausalLM(cfg), seed)


def mistral3(seed: int = 0, **kw) -> Mistral3ForConditionalGeneration:
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=112,
        patch_size=14,
        hidden_act="silu",
    )
    cfg = Mistral3Config(
        text_config=text_config(**kw),
        vision_config=vision,
        tie_word_embeddings=False,
        spatial_merge_size=2,
        image_token_index=10,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = "eager"
    return randomize(Mistral3ForConditionalGeneration(cfg), seed)


def reference_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, vocab: int, batch: int = 3, seq: int = 12):
    """Random tokens with a full row, a right-padded row and a left-padded row.

    Returns tokens, mask and the positions each real token has (counting from 0 at its first
    real token), which both implementations receive.
    """
    tokens = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 4 :] = 0
    mask[2, :3] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


# Hugging Face -> Mistral consolidated names (reference/architecture-and-checkpoints.md, section 3).
_TEXT_NAMES = [
    (r"embed_tokens\.weight", "tok_embeddings.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attention.w\2.weight"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
]
_VISION_NAMES = [
    (r"(patch_conv|ln_pre)\.weight", r"vision_encoder.\1.weight"),
    (
        r"transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight",
        r"vision_encoder.transformer.layers.\1.\2.weight",
    ),
    (
        r"transformer\.layers\.(\d+)\.attention\.([qkvo])_proj\.weight",
        r"vision_encoder.transformer.layers.\1.attention.w\2.weight",
    ),
    (
        r"transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w1.weight",
    ),
    (
        r"transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w3.weight",
    ),
    (
        r"transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight",
        r"vision_encoder.transformer.layers.\1.feed_forward.w2.weight",
    ),
]
_PROJECTOR_NAMES = [
    (r"norm\.weight", "pre_mm_projector_norm.weight"),
    (r"patch_merger\.merging_layer\.weight", "patch_merger.merging_layer.weight"),
    (r"linear_1\.weight", "vision_language_adapter.w_in.weight"),
    (r"linear_2\.weight", "vision_language_adapter.w_out.weight"),
]


def _unpermute_for_rope(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The reference's inverse of the HF conversion's q/k permutation (HF -> Mistral):
    t.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)."""
    dim1, dim2 = t.shape
    return t.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def save_mistral_consolidated(model, directory, dtype=torch.float32) -> dict:
    """Writes `model` (MistralForCausalLM or Mistral3ForConditionalGeneration) as Mistral's
    consolidated.safetensors + params.json, with names and the RoPE permutation written
    independently of magistral_jax from the reference. Returns the tensors written."""
    import json
    import os
    import re

    from safetensors.torch import save_file as save_torch

    cfg = model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    vision_cfg = getattr(cfg, "vision_config", None)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    prefixes = [
        ("language_model.model.", _TEXT_NAMES),
        ("model.language_model.", _TEXT_NAMES),
        ("model.", _TEXT_NAMES),
        ("vision_tower.", _VISION_NAMES),
        ("model.vision_tower.", _VISION_NAMES),
        ("multi_modal_projector.", _PROJECTOR_NAMES),
        ("model.multi_modal_projector.", _PROJECTOR_NAMES),
    ]
    out = {}
    for name, tensor in state.items():
        if name.endswith("lm_head.weight"):
            out["output.weight"] = tensor
            continue
        for prefix, table in prefixes:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            for pattern, target in table:
                if re.fullmatch(pattern, rest):
                    new = re.sub(pattern, target, rest)
                    if new.endswith(("attention.wq.weight", "attention.wk.weight")):
                        is_vision = new.startswith("vision_encoder.")
                        heads = (
                            vision_cfg.num_attention_heads
                            if is_vision
                            else text_cfg.num_attention_heads
                            if "wq" in new
                            else text_cfg.num_key_value_heads
                        )
                        tensor = _unpermute_for_rope(tensor, heads).contiguous()
                    out[new] = tensor
                    break
            else:
                continue
            break
        else:
            raise AssertionError(f"unmapped tensor {name}")
    save_torch(out, os.path.join(directory, "consolidated.safetensors"))
    params = {
        "dim": text_cfg.hidden_size,
        "n_layers": text_cfg.num_hidden_layers,
        "head_dim": text_cfg.head_dim,
        "hidden_dim": text_cfg.intermediate_size,
        "n_heads": text_cfg.num_attention_heads,
        "n_kv_heads": text_cfg.num_key_value_heads,
        "norm_eps": text_cfg.rms_norm_eps,
        "vocab_size": text_cfg.vocab_size,
        "rope_theta": text_cfg.rope_parameters["rope_theta"],
    }
    if vision_cfg is not None:
        params["vision_encoder"] = {
            "hidden_size": vision_cfg.hidden_size,
            "num_channels": vision_cfg.num_channels,
            "image_size": vision_cfg.image_size,
            "max_image_size": vision_cfg.image_size,
            "patch_size": vision_cfg.patch_size,
            "rope_theta": vision_cfg.rope_parameters["rope_theta"],
            "intermediate_size": vision_cfg.intermediate_size,
            "num_hidden_layers": vision_cfg.num_hidden_layers,
            "num_attention_heads": vision_cfg.num_attention_heads,
            "adapter_bias": False,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": cfg.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": True,
            "image_token_id": cfg.image_token_index,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
        }
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return out
