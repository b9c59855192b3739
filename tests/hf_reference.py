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
