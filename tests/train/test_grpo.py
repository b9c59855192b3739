"""GRPO's learning step: how a batch is formed from groups with signal, and the update against the
paper's objective written out independently (reference/magistral-rl-recipe.md, section 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magistral_jax.data.procedural import Example
from magistral_jax.train.build import build_trainer
from magistral_jax.train.config import load_run_config
from magistral_jax.train.grpo import GRPOLearner
from magistral_jax.train.rollouts import Rollouts
from magistral_jax.train.sync_grpo import GRPOStep, next_draw

G = 3  # completions per prompt


class _Source:
    """Prompt k is [1, 100 + k]: which group a trained row came from can be read off its prompt."""

    def __init__(self):
        self.index = 0

    def next(self, n):
        out = [Example([1, 100 + k]) for k in range(self.index, self.index + n)]
        self.index += n
        return out


def _cfg(*overrides):
    return load_run_config(
        None,
        [
            "kind=grpo",
            "model=tiny",
            f"grpo.group_size={G}",
            "grpo.prompts_per_step=4",
            "grpo.max_new_tokens=8",
            "grpo.reward_workers=0",
            "reward.name=token_frequency",
            "mesh=data=1,fsdp=1,tensor=1",
            *overrides,
        ],
    )


def _scripted_step(cfg, script, trained):
    """A GRPOStep whose draws return the scripted rewards (one list per group, in draw order) and whose
    update records the groups it is given."""
    step = GRPOStep(cfg, build_trainer(cfg), rewards=None, tokenizer=None)
    rewards = iter(script)

    def draw(examples, step_index, draw_index):
        values = [next(rewards) for _ in examples]
        rows = len(examples) * G
        return (
            Rollouts(
                G,
                [e.prompt for e in examples],
                [[5, 6]] * rows,
                [np.zeros(2)] * rows,
                np.full(rows, 2),
                ["stop"] * rows,
                np.concatenate([v[0] for v in values]),
                {"correct": np.concatenate([v[1] for v in values])},
            ),
            0.0,
            0.0,
        )

    def update(r):
        trained.append([p[1] - 100 for p in r.prompts])
        return {"updates": 1.0, "trained_tokens": float(r.lengths.sum())}

    step.draw, step.update = draw, update
    return step


# Real Magistral rewards: (reward, correct component) per completion of a group.
SAME_RIGHT = (np.array([1.1, 1.1, 1.1]), np.array([0.9, 0.9, 0.9]))
SAME_WRONG = (np.array([0.1, 0.1, 0.1]), np.array([0.0, 0.0, 0.0]))
MIXED = (np.array([0.1, 1.1, 1.0]), np.array([0.0, 0.9, 0.9]))
LONGER = (np.array([1.1, 1.0625, 1.1]), np.array([0.9, 0.9, 0.9]))  # only the length penalty varies


def test_a_batch_is_formed_from_groups_with_signal_drawing_more_as_needed():
    # Draw 1 (prompts 0-3) has two groups with signal, draw 2 (4-7) three: the batch is the first
    # four in draw order, and no third draw is made.
    script = [SAME_RIGHT, MIXED, SAME_WRONG, LONGER, MIXED, SAME_WRONG, MIXED, MIXED]
    trained = []
    step = _scripted_step(_cfg("grpo.max_draws=3"), script, trained)
    source = _Source()
    metrics = step(source, 0)
    assert trained == [[1, 3, 4, 6]]
    assert source.index == 8
    assert metrics["groups_drawn"] == 8 and metrics["groups_trained"] == 4
    assert metrics["filtered_groups_frac"] == pytest.approx(3 / 8)
    assert metrics["reward_mean"] == pytest.approx(np.mean(np.concatenate([s[0] for s in script])))


def test_a_later_draw_is_as_large_as_the_share_of_groups_with_signal_says():
    # Draw 1 (prompts 0-3): three groups with signal, one short. Three in four had signal, so one more
    # needs ceil(1 / 0.75) = 2 prompts (a power of two): draw 2 is prompts 4-5, not a whole batch.
    script = [MIXED, SAME_RIGHT, MIXED, LONGER, SAME_WRONG, MIXED]
    trained = []
    step = _scripted_step(_cfg("grpo.max_draws=3"), script, trained)
    source = _Source()
    metrics = step(source, 0)
    assert trained == [[0, 2, 3, 5]] and source.index == 6
    assert metrics["groups_drawn"] == 6 and metrics["filtered_groups_frac"] == pytest.approx(2 / 6)
    # The rule by hand: none with signal yet -> a whole batch; a tenth -> 100 prompts, capped at the
    # batch of 16; two processes draw an even number (3 needed at 0.9: 4 prompts).
    assert next_draw(16, 16, 0.0, 1) == 16 and next_draw(16, 10, 0.1, 1) == 16
    assert next_draw(128, 3, 0.9, 2) == 4 and next_draw(16, 5, 0.5, 1) == 16 and next_draw(16, 1, 0.92, 1) == 2


def test_a_batch_filtered_on_correctness_and_capped_draws():
    # `filter_metric: correct` (the 24B recipe's): a group whose completions are all right keeps no
    # signal though their lengths differ. With at most 2 draws and only one group with signal in
    # them, the step trains on that one group.
    script = [SAME_RIGHT, LONGER, SAME_WRONG, SAME_WRONG, SAME_RIGHT, MIXED, SAME_WRONG, LONGER]
    trained = []
    step = _scripted_step(_cfg("grpo.max_draws=2", "grpo.filter_metric=correct"), script, trained)
    metrics = step(_Source(), 0)
    assert trained == [[5]]
    assert metrics["groups_drawn"] == 8 and metrics["groups_trained"] == 1
    assert metrics["filtered_groups_frac"] == pytest.approx(7 / 8)


def test_variants_that_keep_every_group_draw_once():
    script = [SAME_RIGHT, MIXED, SAME_WRONG, LONGER]
    trained = []
    step = _scripted_step(_cfg("grpo.loss=dr_grpo"), script, trained)
    metrics = step(_Source(), 0)
    assert trained == [[0, 1, 2, 3]] and metrics["filtered_groups_frac"] == 0.0


def _padded(prompts, completions):
    """Prompt + completion per sequence, right-padded: (tokens, mask, index of each completion's
    first token's prediction)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for k, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        tokens[k, : len(p) + len(c)] = p + c
        mask[k, : len(p) + len(c)] = 1
    return tokens, mask


def _token_logprobs(params, model_cfg, tokens, mask):
    """log p(token t | tokens before t) at every position t >= 1, in column t - 1 (fp32)."""
    from magistral_jax.model import decoder

    logits = decoder.forward(params, tokens, model_cfg, segment_ids=mask)[0]
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
    return jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]


def _paper_loss(params, model_cfg, r, groups, eps_low, eps_high):
    """The Magistral objective written from the paper (no code of this project but the forward):
    per group, the token-level clipped surrogate summed over its completions and divided by their
    total length; advantages r - mean_group(r), standardised over the minibatch; mean over groups.
    The minibatch's sequences are right-padded into one batch (no packing)."""
    rows = [i for g in groups for i in range(g * G, (g + 1) * G)]
    adv = np.array([r.rewards[i] - np.mean(r.rewards[(i // G) * G : (i // G + 1) * G]) for i in rows])
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    tokens, mask = _padded([r.prompts[i // G] for i in rows], [r.completions[i] for i in rows])
    old = np.zeros((len(rows), tokens.shape[1] - 1), np.float32)
    scale = np.zeros_like(old)  # 1 / (the group's generated length * groups) on completion tokens
    for k, i in enumerate(rows):
        n, m = len(r.prompts[i // G]), len(r.completions[i])
        group_len = sum(len(r.completions[j]) for j in range((i // G) * G, (i // G + 1) * G))
        old[k, n - 1 : n - 1 + m] = r.logprobs[i]
        scale[k, n - 1 : n - 1 + m] = 1.0 / (group_len * len(groups))

    @jax.jit
    def loss(params):
        ratio = jnp.exp(_token_logprobs(params, model_cfg, jnp.asarray(tokens), jnp.asarray(mask)) - old)
        a = jnp.asarray(adv, jnp.float32)[:, None]
        surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
        return -jnp.sum(jnp.where(scale > 0, surrogate, 0.0) * scale)

    return jax.grad(loss)(params)


def test_the_update_follows_the_papers_objective_over_minibatches_and_microbatches():
    # Ragged completions (2 to 11 tokens), the Magistral reward's values, sampler log-probabilities
    # off the current policy on both sides of both clip bounds, two minibatches of two groups each,
    # and microbatches of a few rows: each minibatch's gradient is that of the paper's loss.
    cfg = _cfg(
        "grpo.minibatches=2",
        "grpo.max_new_tokens=12",
        "grpo.eps_high=0.3",
        "row_len=24",
        "microbatch_tokens=24",
        "model_overrides.dtype=float32",
        "model_overrides.remat=none",
    )
    trainer = build_trainer(cfg)
    learner = GRPOLearner(cfg, trainer, rewards=None, tokenizer=None)
    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 100, n).tolist()] for n in (3, 6, 4, 5)]
    lengths = rng.integers(2, 12, 4 * G)
    completions = [rng.integers(3, 100, n).tolist() for n in lengths]
    values = [0.1, 1.1, 1.0, 0.9625, 1.1, 0.1, 0.0, 0.1, 1.1, 1.0, 1.1, 1.0375]
    model = trainer.model
    tokens, mask = _padded([prompts[i // G] for i in range(4 * G)], completions)
    current = np.asarray(jax.jit(_token_logprobs, static_argnums=1)(model.params, model.cfg, tokens, mask))
    logprobs = []
    for i, c in enumerate(completions):
        n = len(prompts[i // G])
        noise = rng.choice([-0.5, -0.05, 0.05, 0.5], len(c))  # ratios on both sides of both clip bounds
        logprobs.append((current[i, n - 1 : n - 1 + len(c)] + noise).astype(np.float32))
    r = Rollouts(
        G, prompts, completions, logprobs, lengths, ["stop"] * len(lengths), np.array(values), {"correct": np.zeros(12)}
    )

    seen = []
    gradients = trainer.gradients

    def record(microbatches):
        params = jax.tree.map(np.asarray, trainer.model.params)
        out = gradients(microbatches)
        seen.append((params, len(microbatches), out[0]))
        return out

    trainer.gradients = record
    learner.update(r)
    assert len(seen) == 2 and all(n > 1 for _, n, _ in seen)
    for (params, _, grads), groups in zip(seen, ([0, 1], [2, 3]), strict=True):
        want = _paper_loss(jax.tree.map(jnp.asarray, params), model.cfg, r, groups, cfg.grpo.eps_low, cfg.grpo.eps_high)
        for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=1e-7)


def test_a_kl_coefficient_needs_an_objective_with_a_kl_term():
    from magistral_jax.config import ConfigError

    with pytest.raises(ConfigError, match="the magistral objective has no KL term"):
        _cfg("grpo.kl_coef=0.04")
    with pytest.raises(ConfigError, match="the grpo objective has a KL term"):
        _cfg("grpo.loss=grpo")
    assert _cfg("grpo.loss=grpo", "grpo.kl_coef=0.04").grpo.kl_coef == 0.04


def test_a_run_whose_system_prompt_contradicts_the_graded_format_is_refused(tmp_path):
    # The 2506 card's chat prompt forbids \boxed{}: a math run in the <think> style trained on it would
    # score every obedient answer 0. Refused before anything is built or written.
    from magistral_jax.config import ConfigError
    from magistral_jax.tokenizer import SYSTEM_PROMPTS, write_standin_tekken
    from magistral_jax.train.loop import run

    (tmp_path / "prompt.txt").write_text(SYSTEM_PROMPTS["magistral-small-2506"])
    cfg = load_run_config(
        None,
        [
            "kind=grpo",
            f"run_dir={tmp_path / 'run'}",
            f"tokenizer={write_standin_tekken(tmp_path / 'tekken.json', vocab_size=2048)}",
            "data.name=problems",
            "data.path=bundled:math_multilingual",
            f"data.system_prompt={tmp_path / 'prompt.txt'}",
            "reward.name=magistral",
            "reward.style=think_tags",
        ],
    )
    with pytest.raises(ConfigError, match=r"data\.system_prompt: the system prompt forbids \\boxed"):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()
