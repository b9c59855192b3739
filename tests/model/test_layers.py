"""RMSNorm, RoPE and segment positions against closed forms and hand-worked cases."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from magistral_jax.model.layers import apply_rope, rms_norm, round_up, segment_positions, text_rope_angles


def test_rms_norm_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16)) * 3.0
    w = rng.normal(size=16)
    expected = w * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5)
    got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 1e-5)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_epsilon_where_it_matters():
    # Rows whose mean square (1e-4) is comparable to eps (1e-4): the closed form with eps added.
    x = np.random.default_rng(2).normal(size=(3, 32)) * 1e-2
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-4)
    got = rms_norm(jnp.asarray(x, jnp.float32), jnp.ones(32, jnp.float32), 1e-4)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_rms_norm_keeps_input_dtype_and_normalises_in_fp32():
    # bf16 input with a large common offset: fp32 statistics keep the result finite and exact
    # up to the final bf16 cast.
    x = jnp.full((1, 8), 3.0e4, jnp.bfloat16)
    y = rms_norm(x, jnp.ones(8, jnp.bfloat16), 1e-5)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, rtol=1e-2)


def test_rms_norm_of_wide_bf16_rows_takes_its_statistics_in_fp32():
    """5,120-wide bf16 rows of different scales (the 24B's width): float32 statistics give, element
    for element, the closed form normalised exactly and rounded to bf16 before the bf16 weight.
    Statistics in bf16 put a rounding error of up to 2^-9 on each row's scale, which moves about a
    third of the elements by a bf16 step or more."""
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(8, 5120)) * rng.uniform(0.5, 40.0, size=(8, 1))).astype(bf16)
    w = rng.normal(1.0, 0.3, size=5120).astype(bf16)
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5)
    expected = (normed.astype(bf16).astype(np.float64) * w.astype(np.float64)).astype(bf16)
    got = np.asarray(jax.jit(rms_norm, static_argnums=2)(jnp.asarray(x), jnp.asarray(w), 1e-5))
    assert got.dtype == bf16
    # Rounding the exact value straight to bf16 and rounding float32 statistics to bf16 may differ
    # on a rare tie; nothing else may.
    assert np.mean(got == expected) > 0.999
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=2**-8)


def _interleaved_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Mistral's RoPE: pairs (2i, 2i+1) as complex numbers times exp(i * pos * theta^(-2i/K)).

    Angles in float32 as mistral-inference computes them (`torch.outer(t, freqs).float()`).
    """
    k = x.shape[-1]
    freqs = (1.0 / theta ** (np.arange(0, k, 2, dtype=np.float32) / np.float32(k))).astype(np.float32)
    angles = (positions.astype(np.float32)[..., None] * freqs).astype(np.float64)  # [B, T, K/2]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * angles)[:, :, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _to_half_split(x: np.ndarray) -> np.ndarray:
    """The HF q/k permutation inside each head: even dims first, then odd dims."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def test_rope_equals_mistral_interleaved_rope_under_the_hf_permutation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 16))
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 1000, 131071]])
    expected = _to_half_split(_interleaved_rope(x, positions, 1e9))
    angles = text_rope_angles(jnp.asarray(positions, jnp.int32), 16, 1e9)
    got = apply_rope(jnp.asarray(_to_half_split(x), jnp.float32), angles)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


def test_segment_positions_hand_worked():
    segments = jnp.array(
        [
            [1, 1, 1, 2, 2, 0, 0],  # two packed documents, right padding
            [0, 0, 1, 1, 1, 1, 1],  # left padding
            [3, 3, 3, 3, 3, 3, 3],  # one document
        ]
    )
    expected = [[0, 1, 2, 0, 1, 0, 0], [0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    np.testing.assert_array_equal(np.asarray(segment_positions(segments)), expected)


@pytest.mark.parametrize(("x", "up"), [(-5, 128), (0, 128), (1, 128), (128, 128), (129, 256), (300, 384)])
def test_round_up_is_the_smallest_positive_multiple_at_least_x(x, up):
    assert round_up(x, 128) == up
