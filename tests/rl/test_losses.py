"""The GRPO-family objectives against separate NumPy implementations of their formulas."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magistral_jax.rl.losses import VARIANTS, constant_groups, get_variant, k3_kl, token_losses

EPS_LOW, EPS_HIGH, BETA, BUDGET = 0.2, 0.28, 0.04, 12


def _batch(seed=0):
    """Three groups of uneven sizes and lengths: rewards, per-token old/new/ref log-probs."""
    rng = np.random.default_rng(seed)
    sizes = [3, 4, 2]
    groups = np.repeat(np.arange(3), sizes)
    rewards = rng.normal(size=len(groups))
    lengths = rng.integers(1, BUDGET + 1, len(groups))
    old = [rng.normal(-2, 0.5, n) for n in lengths]
    new = [o + rng.normal(0, 0.3, len(o)) for o in old]
    ref = [o + rng.normal(0, 0.3, len(o)) for o in old]
    return groups, rewards, lengths, old, new, ref


def _clipped(new, old, adv):
    r = np.exp(new - old)
    return -np.minimum(r * adv, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)


def _clipped_grad(new, old, adv):
    """d/dnew of -min(r A, clip(r) A): -r A where the unclipped term is the minimum, else 0."""
    r = np.exp(new - old)
    unclipped_min = r * adv <= np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv
    return np.where(unclipped_min, -r * adv, 0.0)


def _oracle(variant, groups, rewards, lengths, old, new, ref):
    """(loss, d loss / d new log-probs) straight from each variant's published formula."""
    ids = np.unique(groups)
    loss, grads = 0.0, [None] * len(groups)
    if variant == "magistral":
        adv = np.array([rewards[i] - rewards[groups == groups[i]].mean() for i in range(len(groups))])
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    elif variant in ("grpo", "dapo"):
        adv = np.array(
            [
                (rewards[i] - rewards[groups == groups[i]].mean()) / (rewards[groups == groups[i]].std() + 1e-8)
                for i in range(len(groups))
            ]
        )
    else:
        adv = np.array([rewards[i] - rewards[groups == groups[i]].mean() for i in range(len(groups))])
    for g in ids:
        members = np.flatnonzero(groups == g)
        for i in members:
            if variant in ("magistral", "dapo"):
                norm = lengths[members].sum()  # total generation length of the group
            elif variant == "grpo":
                norm = len(members) * lengths[i]  # (1/G)(1/|o_i|)
            else:
                norm = len(members) * BUDGET  # Dr. GRPO: constant generation budget
            scale = 1.0 / (norm * len(ids))  # mean over the prompts of the minibatch
            per_token = _clipped(new[i], old[i], adv[i])
            grad = _clipped_grad(new[i], old[i], adv[i])
            if variant == "grpo":
                d = ref[i] - new[i]
                per_token = per_token + BETA * (np.exp(d) - d - 1)
                grad = grad + BETA * (1 - np.exp(d))
            loss += scale * per_token.sum()
            grads[i] = scale * grad
    return loss, grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_loss_and_gradient_match_the_formula(variant):
    groups, rewards, lengths, old, new, ref = _batch(seed=zlib.crc32(variant.encode()) % 1000)
    v = get_variant(variant)
    adv, weights = v.fn(rewards, groups, lengths, BUDGET)
    width = int(lengths.max())
    pad = lambda xs: np.stack([np.pad(x, (0, width - len(x))) for x in xs]).astype(np.float32)  # noqa: E731
    mask = np.arange(width)[None] < lengths[:, None]
    w = np.where(mask, weights[:, None], 0.0).astype(np.float32)

    def loss(new_lp):
        per, _, _ = token_losses(
            new_lp, jnp.asarray(pad(old)), jnp.asarray(adv[:, None], jnp.float32), EPS_LOW, EPS_HIGH
        )
        if v.kl:
            per = per + BETA * k3_kl(new_lp, jnp.asarray(pad(ref)))
        return jnp.sum(per * w)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(pad(new)))
    want_value, want_grads = _oracle(variant, groups, rewards, lengths, old, new, ref)
    np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
    for i, g in enumerate(want_grads):
        np.testing.assert_allclose(np.asarray(grad)[i, : lengths[i]], g, rtol=1e-4, atol=1e-7)
        assert not np.asarray(grad)[i, lengths[i] :].any()


def test_constant_groups_are_found():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert constant_groups(rewards, groups).tolist() == [True] * 3 + [False] * 3 + [True] * 2
    assert get_variant("magistral").filter_groups and get_variant("dapo").filter_groups
    assert not get_variant("grpo").filter_groups and not get_variant("dr_grpo").filter_groups


# What the Magistral reward really gives: format 0.1, + 0.9 correct, + 0.1 language, minus a soft
# length penalty (0.0375 = 0.1 * 3 / 8 into an l_cache of 8 tokens).
MAGISTRAL_REWARDS = (0.1, 0.2, 1.1, 1.0, 0.9, 1.1 - 0.0375, 0.1 - 0.0375)


@pytest.mark.parametrize("size", [2, 3, 5, 8, 16, 32])
def test_constant_groups_are_found_with_the_magistral_rewards(size):
    # Every group holds `size` copies of one reward; beside it, a group that differs by one
    # completion's length penalty. A group is constant when max == min, whatever the float sum.
    rewards = np.concatenate([np.full(size, r) for r in MAGISTRAL_REWARDS] + [[1.1] * (size - 1) + [1.1 - 0.0125]])
    groups = np.repeat(np.arange(len(MAGISTRAL_REWARDS) + 1), size)
    want = [True] * (len(MAGISTRAL_REWARDS) * size) + [False] * size
    assert constant_groups(rewards, groups).tolist() == want
    for name in ("grpo", "dr_grpo", "dapo", "magistral"):
        adv, _ = get_variant(name).fn(rewards, groups, np.full(len(rewards), 7), BUDGET)
        # Constant groups carry exactly no advantage (Magistral: only the minibatch mean is left,
        # the same for all of them), and the varying group's signal is not drowned by their noise.
        constant = np.asarray(want)
        assert len(set(adv[constant].tolist())) == 1, name
        varying = adv[~constant]
        assert varying[-1] < 0 < varying[0], name


def test_magistral_advantages_hand_worked():
    # Group means 0.5 and 0.25: raw advantages [0.5, -0.5, 0.75, -0.25, -0.25, -0.25]; minibatch
    # mean 0, std sqrt((0.25 + 0.25 + 0.5625 + 3 * 0.0625) / 6) = sqrt(1.25 / 6).
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    groups = np.array([0, 0, 1, 1, 1, 1])
    adv, weights = get_variant("magistral").fn(rewards, groups, np.array([2, 4, 1, 1, 1, 1]), 8)
    raw = np.array([0.5, -0.5, 0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(adv, raw / np.sqrt(1.25 / 6), rtol=1e-6)
    # Group 0 has 6 generated tokens, group 1 four; two groups in the minibatch.
    np.testing.assert_allclose(weights, [1 / 12, 1 / 12, 1 / 8, 1 / 8, 1 / 8, 1 / 8])


def test_clip_higher_at_hand_worked_ratios():
    old = jnp.zeros(4)
    new = jnp.log(jnp.array([1.3, 1.1, 0.7, 0.9]))
    adv = jnp.array([2.0, 2.0, -1.0, -1.0])
    loss, low, high = token_losses(new, old, adv, 0.2, 0.28)
    # A > 0: ratio 1.3 is capped at 1.28, 1.1 is not; A < 0: ratio 0.7 is held at 0.8, 0.9 is not.
    np.testing.assert_allclose(np.asarray(loss), [-2.56, -2.2, 0.8, 0.9], rtol=1e-6)
    assert np.asarray(high).tolist() == [True, False, False, False]
    assert np.asarray(low).tolist() == [False, False, True, False]


def test_zero_advantage_tokens_are_never_counted_as_clipped():
    # With A = 0 both terms of the objective are 0: clipping changes nothing, whatever the ratio.
    _, low, high = token_losses(jnp.log(jnp.array([0.5, 1.5])), jnp.zeros(2), jnp.zeros(2), 0.2, 0.28)
    assert not np.asarray(low).any() and not np.asarray(high).any()


def test_registered_variants_cannot_be_changed_in_place():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_variant("magistral").filter_groups = False


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'ppo'"):
        get_variant("ppo")


def test_a_new_combination_of_registered_parts_is_configuration_only():
    from magistral_jax.config import ConfigError
    from magistral_jax.train.config import load_run_config

    # DAPO's advantages with Dr. GRPO's constant-budget normaliser, from two keys of a run config.
    cfg = load_run_config(None, ["kind=grpo", "grpo.loss=dapo", "grpo.aggregation=budget"])
    variant = cfg.grpo.variant()
    assert (variant.advantage, variant.aggregation, variant.filter_groups, variant.kl) == (
        "group_normalized",
        "budget",
        True,
        False,
    )
    rewards = np.array([0.1, 1.1, 1.0, 0.9, 0.1])
    groups = np.array([0, 0, 0, 1, 1])
    adv, weights = variant.fn(rewards, groups, np.array([3, 5, 4, 7, 2]), BUDGET)
    g0, g1 = rewards[:3], rewards[3:]
    want_adv = np.concatenate([(g0 - g0.mean()) / (g0.std() + 1e-8), (g1 - g1.mean()) / (g1.std() + 1e-8)])
    np.testing.assert_allclose(adv, want_adv, rtol=1e-12)
    # 1 / (G_g * budget), and the mean over the two groups.
    np.testing.assert_allclose(weights, [1 / (3 * BUDGET * 2)] * 3 + [1 / (2 * BUDGET * 2)] * 2, rtol=1e-12)
    with pytest.raises(ConfigError, match=r"grpo\.advantage: unknown 'ppo'; registered: "):
        load_run_config(None, ["kind=grpo", "grpo.advantage=ppo"])
    # A KL term added to a variant without one needs its coefficient.
    with pytest.raises(ConfigError, match="has a KL term and needs kl_coef"):
        load_run_config(None, ["kind=grpo", "grpo.kl=true"])
    assert load_run_config(None, ["kind=grpo", "grpo.kl=true", "grpo.kl_coef=0.01"]).grpo.variant().kl
