"""Token choice: greedy, temperature, top-k, top-p, min-p against hand-worked supports and frequencies,
and against transformers' own logits processors at temperatures other than 1."""

import hf_reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from magistral_jax.sampling.strategies import GREEDY, PRESETS, SamplingParams, choose

# Probabilities 0.5, 0.3, 0.15, 0.05 (and logits shifted by a constant).
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS) + 3.0


def _draw(params, logits=LOGITS, n=4000, seed=0):
    rows = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
    keys = jax.random.split(jax.random.key(seed), n)
    tokens, logprobs, raw = jax.jit(choose, static_argnums=2)(rows, keys, params)
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(raw)


def test_greedy_is_argmax_with_raw_logprobs():
    tokens, logprobs, raw = _draw(GREEDY, n=3)
    assert tokens.tolist() == [0, 0, 0]
    np.testing.assert_allclose(logprobs, np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(raw, np.log(0.5), rtol=1e-6)


@pytest.mark.parametrize(
    ("params", "support"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7, then 0.3 crosses it
        (SamplingParams(top_p=0.8), {0, 1}),  # the mass before token 2 (0.8) is not below 0.8
        (SamplingParams(top_p=0.81), {0, 1, 2}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # keep p >= 0.2 * 0.5 = 0.1
        (SamplingParams(top_k=3, top_p=0.5), {0}),  # top-p on the renormalised top 3: 0.5/0.95
        (SamplingParams(top_k=1, temperature=5.0), {0}),
    ],
)
def test_filters_keep_exactly_the_hand_worked_support(params, support):
    tokens, _, _ = _draw(params)
    assert set(tokens.tolist()) == support


def test_greedy_takes_each_rows_own_argmax_and_its_logprob():
    rows = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]), jnp.float32)  # argmax 0, then 3
    tokens, logprobs, raw = choose(rows, jax.random.split(jax.random.key(0), 2), GREEDY)
    assert tokens.tolist() == [0, 3]
    np.testing.assert_allclose(np.asarray(raw), np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(0.5), rtol=1e-6)


def test_top_k_counts_tokens_not_rows():
    # Two rows, top-k 3: 100 draws of the pair (200 tokens) show the third token (0.15 / 0.95 of
    # the kept mass; absent from all 200 with probability 0.84^200 < 1e-14).
    drawn = {t for seed in range(100) for t in _draw(SamplingParams(top_k=3), n=2, seed=seed)[0].tolist()}
    assert drawn == {0, 1, 2}


def test_top_p_drops_a_token_whose_preceding_mass_equals_p():
    # Probabilities 0.5, 0.25, 0.25, exact in float32: the mass before token 1 is 0.5 exactly, not
    # below top-p 0.5, so only token 0 is kept (transformers drops the tokens whose ascending
    # cumulative mass is at most 1 - 0.5: 0.25 and 0.5).
    tokens, _, _ = _draw(SamplingParams(top_p=0.5), logits=np.log([2.0, 1.0, 1.0]), n=200)
    assert set(tokens.tolist()) == {0}


def test_min_p_keeps_a_token_exactly_at_its_floor():
    # Probabilities 0.5, 0.25, 0.25 and min-p 0.5: the floor is 0.5 x 0.5 = 0.25, which tokens 1 and
    # 2 reach exactly (in float32 too); transformers keeps probabilities >= min_p x the largest.
    tokens, _, _ = _draw(SamplingParams(min_p=0.5), logits=np.log([2.0, 1.0, 1.0]), n=400)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_the_magistral_preset_is_the_model_cards_sampling():
    # Magistral Small 2509 model card: temperature 0.7, top_p 0.95.
    assert PRESETS["magistral"] == SamplingParams(temperature=0.7, top_p=0.95)


def test_temperature_sampling_frequencies_and_logprobs():
    params = SamplingParams(temperature=2.0)
    tokens, logprobs, raw = _draw(params, n=20000, seed=1)
    tempered = PROBS**0.5 / np.sum(PROBS**0.5)
    freqs = np.bincount(tokens, minlength=4) / len(tokens)
    # Four standard errors of a binomial proportion at n = 20000.
    assert np.all(np.abs(freqs - tempered) < 4 * np.sqrt(tempered * (1 - tempered) / len(tokens)))
    np.testing.assert_allclose(logprobs, np.log(tempered)[tokens], rtol=1e-5)
    np.testing.assert_allclose(raw, np.log(PROBS)[tokens], rtol=1e-5)


@pytest.fixture(scope="module")
def transformers_warpers():
    """`(temperature, top_k, top_p, min_p) -> processed scores`: the warpers transformers' `generate`
    builds for sampling with those settings, in its order."""
    model = R.causal_lm(seed=0, vocab=8, dim=8, layers=1, heads=2, kv_heads=1, head_dim=4, hidden=16)

    def warp(logits, temperature, top_k, top_p, min_p):
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        processors = model._get_logits_processor(config, device="cpu")
        scores = processors(torch.zeros((1, 1), dtype=torch.long), torch.tensor(logits[None], dtype=torch.float32))
        return scores[0].numpy()

    return warp


# Six tokens; each case's support changes if the filters run before the temperature (the first
# three) or top-p before top-k (the fourth).
WIDE = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])) + 1.5


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(2.0, 0, 0.7, None), (0.5, 0, 0.8, None), (2.0, 0, 1.0, 0.3), (1.5, 3, 0.7, None), (0.7, 4, 0.9, 0.1)],
)
def test_filters_follow_transformers_order_at_temperatures_other_than_1(
    transformers_warpers, temperature, top_k, top_p, min_p
):
    scores = transformers_warpers(WIDE, temperature, top_k, top_p, min_p)
    kept = np.isfinite(scores)
    want = np.where(kept, np.exp(scores - scores[kept].max()), 0.0)
    want /= want.sum()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p or 0.0)
    tokens, logprobs, _ = _draw(params, logits=WIDE, n=6000, seed=3)
    assert set(tokens.tolist()) == set(np.flatnonzero(kept).tolist())
    freqs = np.bincount(tokens, minlength=len(WIDE)) / len(tokens)
    assert np.all(np.abs(freqs - want) <= 4 * np.sqrt(want * (1 - want) / len(tokens)) + 1e-9)
    # The reported log-probability is the tempered one over the whole vocabulary, not the truncated one.
    tempered = WIDE / temperature - np.log(np.sum(np.exp(WIDE / temperature)))
    np.testing.assert_allclose(logprobs, tempered[tokens], rtol=1e-5)


def test_logprobs_ignore_the_truncation():
    # Under top-k the drawn tokens' logprobs are those of the full tempered distribution.
    tokens, logprobs, _ = _draw(SamplingParams(top_k=2), n=50)
    np.testing.assert_allclose(logprobs, np.log(PROBS)[tokens], rtol=1e-5)


def test_seeded_draws_are_reproducible():
    a = _draw(SamplingParams(), n=64, seed=7)[0]
    b = _draw(SamplingParams(), n=64, seed=7)[0]
    c = _draw(SamplingParams(), n=64, seed=8)[0]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
    ],
)
def test_invalid_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
