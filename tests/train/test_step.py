"""The train step: chunked log-probabilities, exact microbatch accumulation, sharding, SFT, guards,
programs compiled once."""

import contextlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import magistral_jax as mj
from magistral_jax.compile_clock import compile_seconds
from magistral_jax.model import decoder
from magistral_jax.model import params as P
from magistral_jax.rl.losses import get_variant
from magistral_jax.train import step
from magistral_jax.train.packing import Item, pack
from magistral_jax.train.step import (
    Objective,
    OptimizerConfig,
    Trainer,
    TrainingError,
    guarded_update,
    make_optimizer,
    objective_of,
)


def _cfg(**changes):
    base = mj.get_preset("tiny").replace(
        **{"text.vocab_size": 128, "text.n_heads": 8, "text.n_kv_heads": 4, "text.head_dim": 16}
    )
    return base.replace(**changes)


def _grpo_items(seed=0, groups=3, group_size=4):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=groups * group_size)
    group_ids = np.repeat(np.arange(groups), group_size)
    prompts = [rng.integers(3, 128, rng.integers(3, 7)).tolist() for _ in range(groups)]
    completions = [rng.integers(3, 128, rng.integers(2, 10)).tolist() for _ in range(groups * group_size)]
    lengths = np.array([len(c) for c in completions])
    adv, weights = get_variant("magistral").fn(rewards, group_ids, lengths, 10)
    return [
        Item(
            tokens=prompts[g] + c,
            loss_start=len(prompts[g]),
            weight=float(w),
            advantage=float(a),
            old_logprobs=rng.normal(-5.0, 0.1, len(c)).tolist(),
        )
        for g, c, a, w in zip(group_ids, completions, adv, weights, strict=True)
    ]


def test_chunked_logprobs_and_entropy_equal_the_full_softmax():
    cfg = _cfg()
    model = mj.init_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 37)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    logp, entropy = decoder.token_logprobs(model.params, tokens, targets, cfg, temperature=0.7, chunk=8)
    full = jax.nn.log_softmax(model.logits(np.asarray(tokens)) / 0.7)
    np.testing.assert_allclose(logp, jnp.take_along_axis(full, targets[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(full) * full, -1), atol=1e-5)

    def chunked(p):
        return decoder.token_logprobs(p, tokens, targets, cfg, chunk=8)[0].sum()

    def dense(p):
        logits = decoder.forward(p, tokens, cfg)[0]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()

    for a, b in zip(
        jax.tree.leaves(jax.grad(chunked)(model.params)), jax.tree.leaves(jax.grad(dense)(model.params)), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_minibatch_gradient_does_not_depend_on_the_microbatch_split():
    items = _grpo_items()
    model = mj.init_model(_cfg(), 2)
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), Objective(), total_steps=10, chunk=8)
    results = []
    for rows in (1, 2, 16):
        microbatches = pack(items, row_len=16, rows=rows).microbatches
        grads, loss, sums = trainer.gradients(microbatches)
        results.append((len(microbatches), float(loss), grads, sums["tokens"]))
    assert results[0][0] > results[-1][0] == 1
    for _, loss, grads, tokens in results[:-1]:
        np.testing.assert_allclose(loss, results[-1][1], rtol=1e-5, atol=1e-8)
        assert tokens == results[-1][3]
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[-1][2]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_sft_loss_is_the_mean_cross_entropy_of_the_answer_tokens():
    cfg = _cfg()
    model = mj.init_model(cfg, 3)
    rng = np.random.default_rng(3)
    examples = [(rng.integers(3, 128, 4).tolist(), rng.integers(3, 128, n).tolist()) for n in (3, 5, 2)]
    total = sum(len(a) for _, a in examples)
    items = [Item(tokens=p + a, loss_start=len(p), weight=1.0 / total) for p, a in examples]
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), Objective(kind="sft"), total_steps=1, chunk=8)
    _, loss, _ = trainer.gradients(pack(items, row_len=16, rows=4).microbatches)
    nll = []
    for p, a in examples:
        logp = jax.nn.log_softmax(model.logits(np.array([p + a])))[0]
        nll += [-float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(a)]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


@pytest.fixture(scope="module")
def single_device_update():
    cfg = _cfg(remat="full")
    params = jax.device_get(mj.init_model(cfg, 4).params)
    items = _grpo_items(seed=5, groups=4)
    microbatches = pack(items, row_len=16, rows=8).microbatches
    model = mj.Model(cfg, jax.device_put(params))  # uncommitted, as init_model leaves them
    trainer = Trainer(model, OptimizerConfig(lr=1e-2), Objective(), total_steps=5, chunk=8)
    grads = jax.device_get(trainer.gradients(microbatches)[0])
    metrics = trainer.train_step(microbatches)
    updated = jax.device_get(model.params)
    # A second step, its compilations logged: a trainer that left its state uncommitted compiled
    # every program again here (the first step's outputs are committed).
    with jax.log_compiles(), _compile_log() as log:
        second = trainer.train_step(microbatches)
    return cfg, params, microbatches, grads, updated, metrics, (second, log)


@contextlib.contextmanager
def _compile_log():
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_the_second_step_compiles_nothing(single_device_update):
    *_, microbatches, _, _, first, (second, log) = single_device_update
    assert len(microbatches) > 1  # gradients, accumulation and the update all ran
    assert first["time_compile"] > 0
    assert [m for m in log if m.startswith("Compiling")] == [] and second["time_compile"] == 0.0


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_train_step_equals_single_device(single_device_update, shape):
    cfg, params, microbatches, want_grads, want, want_metrics, _ = single_device_update
    mesh = mj.make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
    placed = jax.device_put(params, P.shardings(decoder.param_specs(cfg.text), mesh, cfg.rules))
    model = mj.Model(cfg, placed, mesh)
    trainer = Trainer(model, OptimizerConfig(lr=1e-2), Objective(), total_steps=5, chunk=8)
    grads = trainer.gradients(microbatches)[0]
    for a, b, p in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), jax.tree.leaves(placed), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
        # Gradients come out in their parameters' shardings (the embedding table's is no exception).
        assert a.sharding.is_equivalent_to(p.sharding, p.ndim)
    metrics = trainer.train_step(microbatches)
    # Adam divides by the gradients' own scale, so elements with near-zero gradients move by up to
    # lr on rounding noise alone; the update agrees to a small fraction of lr.
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert model.params["layers"]["w1"].sharding == placed["layers"]["w1"].sharding
    # Adam's moments live in their parameters' shardings, not replicated on every device.
    for moment in ("mu", "nu"):
        state = optax.tree_utils.tree_get(trainer.opt_state, moment)
        for m, p in zip(jax.tree.leaves(state), jax.tree.leaves(placed), strict=True):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim), moment
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)


def test_non_finite_updates_are_skipped_and_counted():
    model = mj.init_model(_cfg(), 6)
    before = jax.device_get(model.params)
    trainer = Trainer(model, OptimizerConfig(lr=1e-2), Objective(), total_steps=5, chunk=8, max_nonfinite=2)
    items = _grpo_items(seed=6)
    items[0].advantage = float("nan")
    microbatches = pack(items, row_len=16, rows=16).microbatches
    metrics = trainer.train_step(microbatches)
    assert metrics["skipped_nonfinite"] == 1.0 and metrics["nonfinite_total"] == 1.0 and trainer.step == 0
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    # A finite update in between starts the count again: one more is tolerated, a second is not.
    assert trainer.train_step(pack(_grpo_items(seed=6), row_len=16, rows=16).microbatches)["skipped_nonfinite"] == 0
    assert trainer.train_step(microbatches)["nonfinite_total"] == 2.0
    with pytest.raises(TrainingError, match="2 non-finite updates in a row"):
        trainer.train_step(microbatches)


def test_a_trainer_stops_at_the_run_configs_default_of_non_finite_updates_in_a_row():
    from magistral_jax.train.config import RunConfig

    model = mj.init_model(_cfg(), 6)
    trainer = Trainer(model, OptimizerConfig(lr=1e-2), Objective(), total_steps=5, chunk=8)
    items = _grpo_items(seed=6)
    items[0].advantage = float("nan")
    microbatches = pack(items, row_len=16, rows=16).microbatches
    limit = RunConfig.__dataclass_fields__["max_nonfinite"].default
    for _ in range(limit - 1):
        assert trainer.train_step(microbatches)["skipped_nonfinite"] == 1.0
    with pytest.raises(TrainingError, match=f"{limit} non-finite updates in a row"):
        trainer.train_step(microbatches)


def test_the_objective_of_a_run_samples_and_trains_at_its_temperature():
    """GRPO's log-probabilities (pi_theta and pi_old alike) are those of the sampling distribution,
    at the run's temperature; SFT's cross-entropy is at temperature 1 whatever grpo.temperature says."""
    from magistral_jax.train.config import load_run_config

    root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs")
    grpo = objective_of(load_run_config(os.path.join(root, "grpo-tiny.yaml"), ["grpo.temperature=0.7"]))
    sft = objective_of(load_run_config(os.path.join(root, "sft-tiny.yaml"), ["grpo.temperature=0.7"]))
    assert (grpo.kind, grpo.temperature) == ("pg", 0.7)
    assert (sft.kind, sft.temperature) == ("sft", 1.0)


@pytest.mark.parametrize("field", ["lr", "grad_clip"])
@pytest.mark.parametrize("value", [0.0, -1e-6, float("nan")])
def test_optimizer_settings_must_be_positive(field, value):
    with pytest.raises(ValueError, match=rf"optimizer\.{field}: a positive number is expected"):
        OptimizerConfig(**{field: value})


def test_schedule_warmup_and_cosine():
    _, schedule = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4)], [0.2, 0.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(float(schedule(9)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way through the decay
    np.testing.assert_allclose(float(schedule(14)), 0.1, rtol=1e-6)
    # By default cosine decays over the run's steps after warmup to a tenth of lr.
    _, default = make_optimizer(OptimizerConfig(lr=1.0, schedule="cosine"), 10)
    np.testing.assert_allclose([float(default(s)) for s in (0, 5, 10)], [1.0, 0.55, 0.1], rtol=1e-6)
    # A decay of one step (the run one update longer than its warmup) reaches the floor at once.
    _, short = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1), 3)
    np.testing.assert_allclose([float(short(s)) for s in (2, 3)], [1.0, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"optimizer\.schedule"):
        OptimizerConfig(schedule="linear")


def test_each_finite_update_advances_the_schedule_by_one_step():
    model = mj.init_model(_cfg(), 8)
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=4)
    trainer = Trainer(model, optimizer, Objective(), total_steps=10, chunk=8)
    microbatches = pack(_grpo_items(seed=8), row_len=16, rows=16).microbatches
    lrs = [trainer.train_step(microbatches)["lr"] for _ in range(3)]
    # Linear warm-up to 1e-3 over 4 updates, the first already non-zero: 1/5, 2/5, 3/5 of it.
    np.testing.assert_allclose(lrs, [2e-4, 4e-4, 6e-4], rtol=1e-6)
    assert trainer.step == 3


def test_an_update_with_a_finite_loss_but_a_non_finite_gradient_is_skipped():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    tx = optax.sgd(0.5)
    state = tx.init(params)
    finite_grads = {"a": jnp.array([0.25, -0.5]), "b": jnp.array([1.0])}
    # Hand-worked: SGD at 0.5 moves each parameter by half its gradient.
    out, _, finite, norm = guarded_update(tx, params, state, finite_grads, jnp.float32(0.7))
    assert bool(finite)
    np.testing.assert_allclose(out["a"], [0.875, 2.25])
    np.testing.assert_allclose(out["b"], [2.5])
    np.testing.assert_allclose(norm, np.sqrt(0.25**2 + 0.5**2 + 1.0))
    for grads, loss in (
        ({"a": jnp.array([0.25, jnp.nan]), "b": jnp.array([1.0])}, jnp.float32(0.7)),
        ({"a": jnp.array([0.25, -0.5]), "b": jnp.array([jnp.inf])}, jnp.float32(0.7)),
        (finite_grads, jnp.float32(jnp.nan)),
    ):
        out, _, finite, _ = guarded_update(tx, params, state, grads, loss)
        assert not bool(finite)
        for name in params:
            np.testing.assert_array_equal(out[name], params[name])


def test_default_optimizer_is_adamw_with_dapos_clipping_and_no_warmup():
    """The defaults against AdamW written out (Loshchilov & Hutter, with Adam's bias correction)
    after clipping the global gradient norm to DAPO's 1.0: a first gradient of norm 5 is clipped,
    a second of norm 0.3 is not, and the first update already runs at the full learning rate."""
    cfg = OptimizerConfig()
    assert (cfg.lr, cfg.grad_clip) == (1e-6, 1.0)  # DAPO's script values (reference/magistral-rl-recipe.md)
    tx, schedule = make_optimizer(cfg, total_steps=10)
    assert float(schedule(0)) == pytest.approx(cfg.lr)
    rng = np.random.default_rng(0)
    p = {"w": (rng.normal(size=(3, 4)) * 0.01).astype(np.float32), "b": (rng.normal(size=4) * 0.01).astype(np.float32)}
    grads = []
    for norm in (5.0, 0.3):
        g = {k: rng.normal(size=v.shape) for k, v in p.items()}
        scale = norm / np.sqrt(sum((x**2).sum() for x in g.values()))
        grads.append({k: (x * scale).astype(np.float32) for k, x in g.items()})
    params, state = jax.tree.map(jnp.asarray, p), tx.init(p)
    want = {k: v.astype(np.float64) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in want.items()}
    v = {k: np.zeros_like(x) for k, x in want.items()}
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        clip = min(1.0, 1.0 / norm)
        for k in want:
            gk = g[k] * clip
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.95 * v[k] + 0.05 * gk**2
            step = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.95**t)) + 1e-8)
            want[k] = want[k] - 1e-6 * step
        for k in want:
            np.testing.assert_allclose(np.asarray(params[k]) - p[k], want[k] - p[k], rtol=2e-3, atol=1e-12)


def test_the_default_objective_clips_at_dapos_bounds():
    """Objective() trains with DAPO's clip-higher bounds, 1 - 0.2 and 1 + 0.28 (the script values in
    reference/magistral-rl-recipe.md, which Magistral keeps): a token whose ratio to pi_old is just
    inside a bound carries a gradient, just outside it none (hand-worked, one token each)."""
    model = mj.init_model(_cfg(dtype="float32", param_dtype="float32"), 11)
    prompt, answer = [5, 17, 33, 2], [71]
    logits = np.asarray(model.logits(np.array([prompt + answer])), np.float64)[0, len(prompt) - 1]
    logp = float(logits[71] - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), Objective(), total_steps=1, chunk=8)
    for ratio, advantage, clipped in ((0.81, -1.0, False), (0.79, -1.0, True), (1.27, 1.0, False), (1.29, 1.0, True)):
        item = Item(prompt + answer, len(prompt), 1.0, advantage, [logp - np.log(ratio)])
        grads, _, sums = trainer.gradients(pack([item], row_len=8, rows=1).microbatches)
        norm = float(optax.tree.norm(grads))
        assert (norm == 0.0) == clipped, (ratio, norm)
        assert sums["clip_low" if advantage < 0 else "clip_high"] == float(clipped)


def test_the_entropy_metric_is_the_mean_over_the_trained_tokens():
    """One trained token (the metric's floor of one token must not halve it), then three: the
    metric is the mean of each trained token's entropy, -sum p log p of its full softmax."""
    cfg = _cfg()
    params = jax.device_get(mj.init_model(cfg, 9).params)  # each trainer donates its model's
    prompt = [5, 17, 33, 2]
    for answer in ([71], [71, 9, 40]):
        model = mj.Model(cfg, jax.device_put(params))
        logits = np.asarray(model.logits(np.array([prompt + answer])), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        trained = logp[len(prompt) - 1 : len(prompt) - 1 + len(answer)]
        trainer = Trainer(model, OptimizerConfig(lr=1e-3), Objective(kind="sft"), total_steps=1)
        item = Item(prompt + answer, len(prompt), 1.0 / len(answer))
        metrics = trainer.train_step(pack([item], row_len=8, rows=1).microbatches)
        assert metrics["trained_tokens"] == len(answer)
        np.testing.assert_allclose(metrics["entropy"], -(np.exp(trained) * trained).sum(-1).mean(), rtol=1e-5)
        want_loss = -np.mean([trained[k, tok] for k, tok in enumerate(answer)])
        np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)


def test_a_steps_compile_time_is_what_the_compile_clock_advanced_during_it():
    model = mj.init_model(_cfg(), 10)
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), Objective(), total_steps=3, chunk=8)
    microbatches = pack(_grpo_items(seed=10), row_len=16, rows=16).microbatches
    for _ in range(2):
        before = compile_seconds()
        reported = trainer.train_step(microbatches)["time_compile"]
        assert 0.0 <= reported <= compile_seconds() - before
    assert before > 0  # the clock had run before the step: a sum instead of a difference shows


def test_a_multi_process_trainer_places_rows_on_its_models_mesh(monkeypatch):
    placed = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(step, "local_batch_to_global", lambda x, mesh, rules: placed.append((x, mesh, rules)))
    rows = np.arange(6).reshape(2, 3)
    mesh = mj.make_mesh(data=1, fsdp=1, tensor=1)
    for model, error in ((mj.Model(_cfg(), {}, mesh), None), (mj.Model(_cfg(), {}), "needs a model on a mesh")):
        trainer = Trainer.__new__(Trainer)
        trainer.model = model
        if error:
            with pytest.raises(ValueError, match=error):
                trainer.place(rows)
        else:
            trainer.place(rows)
    assert len(placed) == 1 and placed[0][0] is rows and placed[0][1] is mesh and placed[0][2] == _cfg().rules
