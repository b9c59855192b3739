"""Asynchronous GRPO on 8 simulated devices (4 generate, 4 train): continuous batching, weights
swapped in flight, the bounded queue, batches in completion order, resume after a crash."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.config import get_preset
from magistral_jax.model import decoder, param_specs
from magistral_jax.model import params as P
from magistral_jax.sampling import SamplingParams
from magistral_jax.sampling.continuous import ContinuousBatcher, Request
from magistral_jax.sharding import make_mesh
from magistral_jax.train import async_grpo
from magistral_jax.train.config import load_run_config
from magistral_jax.train.loop import run

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
ASYNC_TINY = os.path.join(ROOT, "configs", "grpo-tiny-async.yaml")


def _replay(cfg, params_of, prompt, tokens, versions):
    """Log-probabilities of `tokens` decoded one at a time, the logits of token t computed by the
    parameters of `versions[t]` over a cache written by whichever parameters were current: the
    stale-cache semantics of an in-flight weight swap, computed independently of the batcher."""
    forward = jax.jit(decoder.forward, static_argnames="cfg")
    cache = decoder.KVCache.init(cfg, 1, 64)
    logits, cache = forward(params_of[versions[0]], jnp.asarray([prompt]), cfg, cache=cache)
    out = [jax.nn.log_softmax(logits[0, -1])[tokens[0]]]
    for t in range(1, len(tokens)):
        logits, cache = forward(params_of[versions[t]], jnp.asarray([[tokens[t - 1]]]), cfg, cache=cache)
        out.append(jax.nn.log_softmax(logits[0, -1])[tokens[t]])
    return np.asarray(out)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_weights_pushed_mid_generation_are_used_by_the_next_chunk(cache):
    cfg = get_preset("tiny").replace(dtype="float32", param_dtype="float32")
    old, new = mj.init_model(cfg, 0).params, mj.init_model(cfg, 1).params
    mesh = make_mesh(devices=jax.devices()[:4])
    shardings = P.shardings(param_specs(cfg), mesh, cfg.rules)
    model = mj.Model(cfg, jax.device_put(old, shardings), mesh)
    batcher = ContinuousBatcher(
        model,
        slots=2,
        max_prompt_len=8,
        max_new_tokens=12,
        chunk=4,
        sampling=SamplingParams(temperature=1.0),
        stop_ids=(),
        cache=cache,
        page_size=4,
    )
    requests = [
        Request([1, 5, 9, 11], 10, seed=3, tag=0),
        Request([1, 7], 6, seed=4, tag=1),
        Request([1, 8, 8], 12, seed=5, tag=2),
    ]
    batcher.insert(requests[:2])
    finished = batcher.step()  # 4 tokens each with the old weights
    assert finished == []
    batcher.set_params(jax.device_put(new, shardings), 1)  # swapped between two chunks
    waiting = requests[2:]
    while batcher.busy or waiting:
        finished += batcher.step()
        if waiting and batcher.free_slots:
            batcher.insert(waiting)
            waiting = []
    # Every request finished exactly once, with its whole budget (no stop token here).
    assert sorted(f.request.tag for f in finished) == [0, 1, 2]
    by_tag = {f.request.tag: f for f in finished}
    assert [len(by_tag[t].tokens) for t in range(3)] == [10, 6, 12]
    # Token 4 was drawn from logits the old weights computed at the end of the first chunk; every
    # later token from the new weights. The third request started after the swap.
    assert by_tag[0].versions.tolist() == [0] * 5 + [1] * 5
    assert by_tag[1].versions.tolist() == [0] * 5 + [1]
    assert by_tag[2].versions.tolist() == [1] * 12
    for f in finished:
        want = _replay(cfg, {0: old, 1: new}, f.request.prompt, f.tokens, f.versions)
        np.testing.assert_allclose(f.raw_logprobs, want, atol=1e-5)
    # The swap mattered: the old weights alone give other log-probabilities after it.
    f = by_tag[0]
    stale = _replay(cfg, {0: old, 1: old}, f.request.prompt, f.tokens, f.versions)
    assert np.abs(stale[5:] - f.raw_logprobs[5:]).max() > 1e-2


_PUT, _TAKE = async_grpo.RolloutQueue.put, async_grpo.RolloutQueue.take


class _Recorder:
    """Records the groups the generator queues and the trainer takes (in order)."""

    def __init__(self, monkeypatch):
        self.put, self.taken = [], []
        put, take = _PUT, _TAKE
        recorder = self

        def put_and_record(queue, group):
            with queue.cond:  # recorded in the order the queue receives them
                recorder.put.append((group.gid, [len(f.tokens) for f in group.finished]))
                put(queue, group)

        def take_and_record(queue, n, check):
            groups, depth = take(queue, n, check)
            recorder.taken.append([(g.gid, [len(f.tokens) for f in g.finished]) for g in groups])
            return groups, depth

        monkeypatch.setattr(async_grpo.RolloutQueue, "put", put_and_record)
        monkeypatch.setattr(async_grpo.RolloutQueue, "take", take_and_record)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_async_run_bounds_the_queue_trains_in_completion_order_and_resumes(tmp_path, monkeypatch):
    overrides = [
        f"run_dir={tmp_path}",
        "steps=4",
        "checkpoint_every=2",
        "grpo.prompts_per_step=4",
        "grpo.group_size=4",
        "grpo.max_new_tokens=20",
        "data.budget=[4,20]",
        "async_rl.slots=16",
        "async_rl.chunk=4",
    ]
    cfg = load_run_config(ASYNC_TINY, overrides)
    n_batch = 16

    class Crash(Exception):
        pass

    first = _Recorder(monkeypatch)
    consumed_by_step = {}

    def crash_after_step_3(step, metrics):
        consumed_by_step[step] = len([item for batch in first.taken for item in batch])
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, progress=False, on_step=crash_after_step_3)
    consumed_before_checkpoint = [gid for batch in first.taken for gid, _ in batch][: consumed_by_step[2]]

    second = _Recorder(monkeypatch)
    run(cfg, progress=False)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 of the crashed run was dropped
    for r in rows:
        assert r["outstanding_max"] <= 2 * n_batch  # the queue bound (max_async_ratio 2)
        assert r["queue_depth"] <= 2 * n_batch
        assert 0 <= r["policy_lag_mean"] <= r["policy_lag_max"] <= 3
        assert r["weight_push_s"] > 0 and r["generator_tokens_per_s"] >= 0 and "trained_tokens" in r
        # Groups without signal are consumed, not trained; the batch is filled with others.
        assert r["groups_trained"] <= 4 <= r["groups_drawn"] <= 4 * cfg.grpo.max_draws
        assert r["groups_trained"] == 4 or r["groups_drawn"] == 4 * cfg.grpo.max_draws
        assert r["filtered_groups_frac"] == pytest.approx(1 - r["groups_trained"] / r["groups_drawn"])
    assert max(r["generator_tokens_per_s"] for r in rows) > 0
    # Weights pushed after a step reached sequences already in flight.
    assert max(r["policy_lag_max"] for r in rows) >= 1

    for rec in (first, second):
        # The trainer takes whole groups in exactly the order they completed, none skipped, none
        # twice: short completions finishing first do not push long ones out of the training data.
        taken = [item for batch in rec.taken for item in batch]
        assert taken == rec.put[: len(taken)]
    # The resumed run starts from the checkpoint of step 2: it consumes none of the groups consumed
    # before it, and consumes each group once.
    resumed = [gid for batch in second.taken for gid, _ in batch]
    assert not set(resumed) & set(consumed_before_checkpoint)
    assert len(set(resumed)) == len(resumed) >= 8
    # Budgets of 4 to 20 tokens: a 5x spread of lengths among the trained completions.
    lengths = [n for batch in first.taken + second.taken for _, ns in batch for n in ns]
    assert max(lengths) >= 4 * min(lengths)
