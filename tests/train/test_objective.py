"""The policy-gradient objective the trainer minimises, against NumPy formulas written from the paper
(reference/magistral-rl-recipe.md): off-policy clipping on both sides of both bounds and the k3 KL
term at the trainer level, then the GRPO, DAPO and Dr. GRPO objectives and the filtering on a
reward component through training runs, checked on whatever rows each update trains on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.model import decoder
from magistral_jax.rl.rewards import RewardOutput, register_reward
from magistral_jax.train.config import load_run_config
from magistral_jax.train.loop import run
from magistral_jax.train.packing import Item, pack
from magistral_jax.train.step import Objective, OptimizerConfig, Trainer

EPS_LOW, EPS_HIGH, TEMPERATURE = 0.2, 0.28, 0.8
# Ratios below, between and above both the clip bounds (0.8, 1.28) and their swap (0.72, 1.2).
RATIOS = np.array([0.6, 0.75, 0.9, 1.1, 1.25, 1.4])
PAD = 24  # every sequence is scored padded to this length: one compiled forward


def _cfg():
    return mj.get_preset("tiny").replace(
        **{"text.vocab_size": 128, "text.n_layers": 1, "text.n_heads": 4, "text.n_kv_heads": 2, "text.head_dim": 8}
    )


def _logprobs(cfg, params, sequences, temperature):
    """Per sequence, log pi(token_t | tokens_<t) of every token after the first, at `temperature`,
    from the full softmax of a plain forward over the sequence alone."""
    tokens = np.zeros((len(sequences), PAD), np.int32)
    segments = np.zeros((len(sequences), PAD), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], segments[i, : len(s)] = s, 1
    logits, _ = jax.jit(decoder.forward, static_argnames="cfg")(
        params, jnp.asarray(tokens), cfg, segment_ids=jnp.asarray(segments)
    )
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1), np.float64)
    return [logp[i, np.arange(len(s) - 1), s[1:]] for i, s in enumerate(sequences)]


def _clipped(ratio, advantage):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and its derivative in log r."""
    clipped = np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
    loss = -np.minimum(ratio * advantage, clipped * advantage)
    grad = np.where(ratio * advantage <= clipped * advantage, -ratio * advantage, 0.0)
    return loss, grad


def _k3(logp, ref):
    return np.exp(ref - logp) - (ref - logp) - 1


def test_trainer_loss_gradient_and_clip_metrics_off_policy_match_the_formula():
    kl_coef = 0.05  # (the runs below check the objective without KL)
    cfg = _cfg()
    model = mj.init_model(cfg, 7)
    params = jax.device_get(model.params)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, n).tolist() for n in (4, 6, 3, 5)]
    sequences = [p + rng.integers(3, 128, n).tolist() for p, n in zip(prompts, (7, 9, 5, 11), strict=True)]
    advantages = np.array([1.3, -0.7, 0.4, -1.1])
    weights = np.array([0.05, 0.03, 0.08, 0.02])
    logp = [lp[len(p) - 1 :] for lp, p in zip(_logprobs(cfg, params, sequences, TEMPERATURE), prompts, strict=True)]
    ratios = [np.roll(RATIOS, i)[np.arange(len(lp)) % len(RATIOS)] for i, lp in enumerate(logp)]
    refs = [lp + rng.choice([-0.8, -0.3, 0.3, 0.8], len(lp)) for lp in logp]
    items = [
        Item(
            tokens=s,
            loss_start=len(p),
            weight=float(w),
            advantage=float(a),
            old_logprobs=(lp - np.log(r)).tolist(),
            ref_logprobs=ref.tolist(),
        )
        for s, p, w, a, lp, r, ref in zip(sequences, prompts, weights, advantages, logp, ratios, refs, strict=True)
    ]
    objective = Objective(eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=kl_coef, temperature=TEMPERATURE)
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), objective, total_steps=1, chunk=8)
    microbatches = pack(items, row_len=PAD, rows=2).microbatches
    grads, loss, _ = trainer.gradients(microbatches)

    want_loss, cotangents = 0.0, []
    for w, a, lp, r, ref in zip(weights, advantages, logp, ratios, refs, strict=True):
        per_token, grad = _clipped(r, a)
        per_token, grad = per_token + kl_coef * _k3(lp, ref), grad + kl_coef * (1 - np.exp(ref - lp))
        want_loss += w * per_token.sum()
        cotangents.append(w * grad)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)

    # The gradient: the formula's d loss / d log pi, pulled back through an independent forward.
    def trained_logp(p):
        tokens = jnp.asarray([s + [0] * (PAD - len(s)) for s in sequences], jnp.int32)
        segments = jnp.asarray([[1] * len(s) + [0] * (PAD - len(s)) for s in sequences], jnp.int32)
        logits, _ = decoder.forward(p, tokens, cfg, segment_ids=segments)
        full = jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)
        return [
            full[i, jnp.arange(len(pr) - 1, len(s) - 1), jnp.asarray(s[len(pr) :])]
            for i, (s, pr) in enumerate(zip(sequences, prompts, strict=True))
        ]

    _, pullback = jax.vjp(jax.jit(trained_logp), params)
    (want_grads,) = pullback([jnp.asarray(c, jnp.float32) for c in cotangents])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-6)

    metrics = trainer.train_step(microbatches)
    n = sum(len(r) for r in ratios)
    low = sum(int(np.sum((r < 1 - EPS_LOW) & (a < 0))) for r, a in zip(ratios, advantages, strict=True))
    high = sum(int(np.sum((r > 1 + EPS_HIGH) & (a > 0))) for r, a in zip(ratios, advantages, strict=True))
    assert low and high
    assert metrics["clip_low_frac"] == pytest.approx(low / n) and metrics["clip_high_frac"] == pytest.approx(high / n)
    drift = np.concatenate([np.abs(np.log(r)) for r in ratios]).mean()
    assert metrics["logprob_drift"] == pytest.approx(drift, rel=1e-4)
    kl = np.concatenate([_k3(lp, ref) for lp, ref in zip(logp, refs, strict=True)]).mean()
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Through training runs
# ------------------------------------------------------------------------------------------------

GROUP = 4
SHAPING = "objective_test_shaping"
SCORED: list[tuple[list[str], list[float], list[float]]] = []  # (prompts, correct, shaping) per call


@register_reward(SHAPING)
def _correct_and_shaping(prompts, completions, *, completion_ids, **_):
    """`correct`: 0.9 when the first completion token is below 24 (a fifth of the time: about half
    the groups are all wrong); `shaping`: a small amount that varies within almost every group."""
    correct = [0.9 if ids[0] < 24 else 0.0 for ids in completion_ids]
    shaping = [0.01 * (ids[0] % 7) for ids in completion_ids]
    SCORED.append((list(prompts), correct, shaping))
    return RewardOutput(
        [c + s for c, s in zip(correct, shaping, strict=True)], {"correct": correct, "shaping": shaping}
    )


def _sequences(mb):
    """The sequences packed into a microbatch: (prompt, completion, weight, advantage,
    old log-probs, ref log-probs) of each."""
    out = []
    for r in range(mb.tokens.shape[0]):
        for seg in sorted(set(mb.segment_ids[r].tolist()) - {0}):
            cols = np.flatnonzero(mb.segment_ids[r] == seg)
            trained = cols[mb.weights[r, cols] > 0]
            full = [*mb.tokens[r, cols].tolist(), int(mb.targets[r, cols[-1]])]
            start = int(trained[0] - cols[0]) + 1
            out.append(
                (
                    full[:start],
                    full[start:],
                    float(mb.weights[r, trained[0]]),
                    float(mb.advantages[r, trained[0]]),
                    mb.old_logprobs[r, trained].astype(np.float64),
                    mb.ref_logprobs[r, trained].astype(np.float64),
                )
            )
    return out


def _train(tmp_path, monkeypatch, *overrides):
    """Runs 2 GRPO steps of a tiny model; returns every update's (parameters before it, the
    sequences it trained on, its metrics) and the model's config and final parameters."""
    updates = []
    original = Trainer.train_step

    def recorded(self, microbatches):
        before = jax.device_get(self.model.params)
        metrics = original(self, microbatches)
        updates.append((before, [s for mb in microbatches for s in _sequences(mb)], metrics))
        return metrics

    monkeypatch.setattr(Trainer, "train_step", recorded)
    text = {"vocab_size": 128, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8}
    cfg = load_run_config(
        None,
        [
            "kind=grpo",
            f"run_dir={tmp_path}",
            "steps=2",
            "checkpoint_every=2",
            "microbatch_tokens=256",
            "optimizer.lr=0.01",
            *(f"model_overrides.text.{k}={v}" for k, v in text.items()),
            f"grpo.group_size={GROUP}",
            "grpo.prompts_per_step=3",
            "grpo.max_new_tokens=5",
            f"grpo.temperature={TEMPERATURE}",
            "grpo.reward_workers=0",
            "data.name=random_prompts",
            "data.low=3",
            "data.high=100",
            "data.min_len=4",
            "data.max_len=8",
            *overrides,
        ],
    )
    run(cfg, progress=False)
    assert updates, "no update was trained"
    model_cfg = mj.get_preset("tiny").replace(**{f"text.{k}": v for k, v in text.items()})
    return updates, model_cfg


def _groups(sequences):
    groups: dict[tuple, list] = {}
    for s in sequences:
        groups.setdefault(tuple(s[0]), []).append(s)
    assert all(len(g) == GROUP for g in groups.values())
    return list(groups.values())


def _token_share(completion, token=7):
    return float(np.mean(np.asarray(completion) == token))


def _moved(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def _check_update(cfg, before, sequences, metrics, advantages, weights, kl_coef=0.0, ref=None):
    """The update's trained rows carry `advantages` and `weights` (per sequence, in order), its
    reference log-probabilities are those of `ref`, and its loss and KL metric are the formula's
    on the policy it updated."""
    np.testing.assert_allclose([s[3] for s in sequences], advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([s[2] for s in sequences], weights, rtol=1e-5)
    full = [s[0] + s[1] for s in sequences]
    logp = [lp[len(s[0]) - 1 :] for lp, s in zip(_logprobs(cfg, before, full, TEMPERATURE), sequences, strict=True)]
    loss = scale = 0.0
    for s, lp, a, w in zip(sequences, logp, advantages, weights, strict=True):
        per_token, _ = _clipped(np.exp(lp - s[4]), a)
        loss += w * per_token.sum()
        scale += w * np.abs(per_token).sum()
    if kl_coef:
        refs = [lp[len(s[0]) - 1 :] for lp, s in zip(_logprobs(cfg, ref, full, TEMPERATURE), sequences, strict=True)]
        for s, r in zip(sequences, refs, strict=True):
            np.testing.assert_allclose(s[5], r, atol=2e-5)
        k3 = [_k3(lp, r) for lp, r in zip(logp, refs, strict=True)]
        loss += kl_coef * sum(w * k.sum() for w, k in zip(weights, k3, strict=True))
        assert metrics["kl"] == pytest.approx(np.concatenate(k3).mean(), rel=1e-3, abs=1e-7)
    else:
        assert "kl" not in metrics
    # On-policy the advantages of a group cancel: the loss is a small sum of larger terms.
    assert abs(metrics["loss"] - loss) <= 1e-4 * scale + 1e-7, (metrics["loss"], loss, scale)


TOKENS = list(range(3, 40))  # token_frequency's reward: the share of completion tokens among these
FREQUENCY = ("reward.name=token_frequency", f"reward.tokens={TOKENS}")


def _share(completion):
    return float(np.mean(np.isin(completion, TOKENS)))


def test_grpo_run_trains_against_the_initial_policy_with_the_k3_kl(tmp_path, monkeypatch):
    updates, cfg = _train(
        tmp_path,
        monkeypatch,
        "grpo.loss=grpo",
        "grpo.kl_coef=0.05",
        "reward.name=token_frequency",
        f"reward.tokens={TOKENS}",
    )
    assert len(updates) >= 2
    reference = updates[0][0]  # the policy before any update
    for k, (before, sequences, metrics) in enumerate(updates):
        advantages, weights = [], []
        groups = _groups(sequences)
        for group in groups:
            r = np.array([_share(s[1]) for s in group])
            advantages += list((r - r.mean()) / (r.std() + 1e-8))
            weights += [1 / (GROUP * len(s[1]) * len(groups)) for s in group]
        order = [s for g in groups for s in g]
        _check_update(cfg, before, order, metrics, advantages, weights, 0.05, reference)
        # The policy starts at the reference: no divergence before the first update, some after.
        assert (metrics["kl"] == 0.0) if k == 0 else (metrics["kl"] > 1e-6)
    assert _moved(reference, updates[-1][0])


def test_dr_grpo_run_weights_by_the_budget_without_std(tmp_path, monkeypatch):
    updates, cfg = _train(tmp_path, monkeypatch, "grpo.loss=dr_grpo", *FREQUENCY)
    for before, sequences, metrics in updates:
        groups = _groups(sequences)
        advantages, weights = [], []
        for group in groups:
            r = np.array([_share(s[1]) for s in group])
            advantages += list(r - r.mean())
            weights += [1 / (GROUP * 5 * len(groups))] * GROUP  # 5: the budget of new tokens
        _check_update(cfg, before, [s for g in groups for s in g], metrics, advantages, weights)
    assert _moved(updates[0][0], updates[-1][0]) or len(updates) == 1


def test_dapo_run_filtered_on_the_correct_component(tmp_path, monkeypatch):
    """The 24B recipe's `filter_metric: correct` with DAPO's objective: groups whose `correct`
    component does not vary are never trained, even when the total reward varies; the trained
    ones have DAPO's advantages and token weights of the total reward."""
    SCORED.clear()
    updates, cfg = _train(
        tmp_path,
        monkeypatch,
        "grpo.loss=dapo",
        "grpo.filter_metric=correct",
        "grpo.prompts_per_step=4",
        f"reward.name={SHAPING}",
    )
    scored_groups = [
        (correct[i : i + GROUP], shaping[i : i + GROUP])
        for _, correct, shaping in SCORED
        for i in range(0, len(correct), GROUP)
    ]
    # Some group had a varying reward but a constant `correct` (so filtering on the reward would keep it).
    assert len(scored_groups) >= 8
    assert any(len(set(c)) == 1 and len(set(s)) > 1 for c, s in scored_groups)
    for before, sequences, metrics in updates:
        groups = _groups(sequences)
        advantages, weights = [], []
        for group in groups:
            correct = np.array([0.9 if s[1][0] < 24 else 0.0 for s in group])
            assert len(set(correct)) > 1, "a group without signal in `correct` was trained"
            r = correct + np.array([0.01 * (s[1][0] % 7) for s in group])
            advantages += list((r - r.mean()) / (r.std() + 1e-8))
            weights += [1 / (sum(len(s[1]) for s in group) * len(groups))] * GROUP
        _check_update(cfg, before, [s for g in groups for s in g], metrics, advantages, weights)
