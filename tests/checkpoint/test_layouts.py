"""Published tensor names and transforms, against the reference tables and hand-worked cases."""

import math

import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.checkpoint.layouts import LAYOUTS, CheckpointError, Transform, detect_layout, plan


def _names(layout):
    return {e.name: e.torch_shape for e in plan(mj.get_preset("magistral-small-2509"), LAYOUTS[layout])}


@pytest.mark.parametrize("layout", ["mistral", "hf-legacy", "hf-new"])
def test_2509_plan_matches_the_reference_tables(layout):
    entries = plan(mj.get_preset("magistral-small-2509"), LAYOUTS[layout])
    assert len(entries) == 585
    assert sum(math.prod(e.torch_shape) for e in entries) == 24_011_361_280
    assert len({e.name for e in entries}) == 585


def test_2509_mistral_names_and_shapes():
    names = _names("mistral")
    expected = {
        "tok_embeddings.weight": (131072, 5120),
        "norm.weight": (5120,),
        "output.weight": (131072, 5120),
        "layers.0.attention_norm.weight": (5120,),
        "layers.39.attention.wq.weight": (4096, 5120),
        "layers.12.attention.wk.weight": (1024, 5120),
        "layers.12.attention.wv.weight": (1024, 5120),
        "layers.12.attention.wo.weight": (5120, 4096),
        "layers.7.ffn_norm.weight": (5120,),
        "layers.7.feed_forward.w1.weight": (32768, 5120),
        "layers.7.feed_forward.w3.weight": (32768, 5120),
        "layers.7.feed_forward.w2.weight": (5120, 32768),
        "vision_encoder.patch_conv.weight": (1024, 3, 14, 14),
        "vision_encoder.ln_pre.weight": (1024,),
        "vision_encoder.transformer.layers.23.attention_norm.weight": (1024,),
        "vision_encoder.transformer.layers.0.attention.wq.weight": (1024, 1024),
        "vision_encoder.transformer.layers.0.attention.wo.weight": (1024, 1024),
        "vision_encoder.transformer.layers.5.ffn_norm.weight": (1024,),
        "vision_encoder.transformer.layers.5.feed_forward.w1.weight": (4096, 1024),
        "vision_encoder.transformer.layers.5.feed_forward.w2.weight": (1024, 4096),
        "pre_mm_projector_norm.weight": (1024,),
        "patch_merger.merging_layer.weight": (1024, 4096),
        "vision_language_adapter.w_in.weight": (5120, 1024),
        "vision_language_adapter.w_out.weight": (5120, 5120),
    }
    for name, shape in expected.items():
        assert names[name] == shape, name
    assert sum(1 for n in names if n.startswith("layers.")) == 360
    assert sum(1 for n in names if n.startswith("vision_encoder.")) == 218


def test_2509_hf_names_and_shapes():
    legacy, new = _names("hf-legacy"), _names("hf-new")
    assert legacy["language_model.model.embed_tokens.weight"] == (131072, 5120)
    assert legacy["language_model.lm_head.weight"] == (131072, 5120)
    assert legacy["language_model.model.layers.3.self_attn.q_proj.weight"] == (4096, 5120)
    assert legacy["language_model.model.layers.3.post_attention_layernorm.weight"] == (5120,)
    assert legacy["language_model.model.layers.3.mlp.down_proj.weight"] == (5120, 32768)
    assert legacy["vision_tower.transformer.layers.2.attention.k_proj.weight"] == (1024, 1024)
    assert legacy["vision_tower.transformer.layers.2.feed_forward.gate_proj.weight"] == (4096, 1024)
    assert legacy["multi_modal_projector.patch_merger.merging_layer.weight"] == (1024, 4096)
    assert legacy["multi_modal_projector.linear_2.weight"] == (5120, 5120)
    assert new["model.language_model.norm.weight"] == (5120,)
    assert new["lm_head.weight"] == (131072, 5120)
    assert new["model.vision_tower.patch_conv.weight"] == (1024, 3, 14, 14)
    assert new["model.multi_modal_projector.norm.weight"] == (1024,)


def test_text_only_presets_have_363_tensors_and_no_vision_in_hf_text():
    cfg = mj.get_preset("magistral-small-2507")
    entries = plan(cfg, LAYOUTS["hf-text"])
    assert len(entries) == 363
    assert sum(math.prod(e.torch_shape) for e in entries) == 23_572_403_200
    with pytest.raises(CheckpointError, match="has no vision weights"):
        plan(mj.get_preset("magistral-small-2509"), LAYOUTS["hf-text"])


def _permute_for_rope(t, n_heads):
    """The reference's HF conversion: t.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2)."""
    dim1, dim2 = t.shape
    return t.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def test_mistral_rope_rows_follow_the_reference_permutation():
    # wq of 3 heads of dim 4 over an input of 5: Mistral rows -> canonical [in, heads, head_dim].
    rng = np.random.default_rng(0)
    mistral = rng.normal(size=(12, 5))
    t = Transform("linear", rope_heads=True)
    canonical = t.read_canonical(mistral, (5, 3, 4), (slice(0, 5), slice(0, 3), slice(0, 4)))
    hf = _permute_for_rope(mistral, 3)
    np.testing.assert_array_equal(canonical, hf.T.reshape(5, 3, 4))
    # Published rows back from the canonical block, one head at a time.
    for head in range(3):
        index = t.rows_index((5, 3, 4), 4 * head, 4 * head + 4)
        np.testing.assert_array_equal(t.to_torch_rows(canonical[index]), mistral[4 * head : 4 * head + 4])


def test_transforms_read_exact_slices():
    rng = np.random.default_rng(1)
    # o_proj [D=6, N*K=2*3] -> wo [N, K, D]
    o = rng.normal(size=(6, 6))
    t = Transform("linear", n_in=2)
    full = o.T.reshape(2, 3, 6)
    block = t.read_canonical(o, (2, 3, 6), (slice(1, 2), slice(0, 3), slice(2, 5)))
    np.testing.assert_array_equal(block, full[1:2, :, 2:5])
    # patch conv [H=4, C=3, P=2, P=2] -> [P, P, C, H]
    conv = rng.normal(size=(4, 3, 2, 2))
    c = Transform("conv")
    block = c.read_canonical(conv, (2, 2, 3, 4), (slice(0, 2), slice(0, 2), slice(0, 3), slice(1, 3)))
    np.testing.assert_array_equal(block, conv.transpose(2, 3, 1, 0)[..., 1:3])
    np.testing.assert_array_equal(c.to_torch_rows(conv.transpose(2, 3, 1, 0)), conv)
    with pytest.raises(ValueError, match="not aligned to groups of 4"):
        Transform("linear").rows_index((5, 3, 4), 2, 8)


def test_layout_detection():
    assert detect_layout({"language_model.model.embed_tokens.weight"}).name == "hf-legacy"
    assert detect_layout({"model.language_model.embed_tokens.weight"}).name == "hf-new"
    assert detect_layout({"model.embed_tokens.weight"}).name == "hf-text"
    assert detect_layout({"tok_embeddings.weight"}).name == "mistral"
    with pytest.raises(CheckpointError, match="no decoder embedding"):
        detect_layout({"embeddings.weight"})
