"""The KV-cache sampler against transformers' greedy generate and a teacher-forced forward."""

import hf_reference as R
import jax
import numpy as np
import pytest
import torch

import magistral_jax as mj
from magistral_jax.sampling import GREEDY, Sampler, SamplingParams

TEXT = dict(vocab=97, dim=32, layers=2, heads=8, kv_heads=2, head_dim=8, hidden=48)
PROMPTS = [[1, 5, 7, 9], [1, 4], [1, 8, 8, 8, 8, 3, 6, 11, 12]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.causal_lm(seed=3, **TEXT)
    directory = tmp_path_factory.mktemp("ckpt")
    ref.save_pretrained(directory)
    return ref, mj.load_model(directory, dtype="float32")


def _hf_greedy(ref, prompt, max_new, eos):
    out = ref.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate(pair):
    ref, model = pair
    out = Sampler(model, stop_ids=(2,)).sample(PROMPTS, max_new_tokens=16, sampling=GREEDY)
    for i, prompt in enumerate(PROMPTS):
        assert out.completion(i) == _hf_greedy(ref, prompt, 16, 2)


def test_each_row_stops_at_its_own_stop_token(pair):
    ref, model = pair
    # Stop on a token that greedy decoding of the first prompt emits at step 3.
    stop = _hf_greedy(ref, PROMPTS[0], 8, None)[3]
    out = Sampler(model, stop_ids=(stop,)).sample(PROMPTS, max_new_tokens=8, sampling=GREEDY)
    for i, prompt in enumerate(PROMPTS):
        expected = _hf_greedy(ref, prompt, 8, stop)
        assert out.completion(i) == expected
        stopped = expected[-1] == stop
        assert out.finish_reasons[i] == ("stop" if stopped else "length")
        assert out.lengths[i] == len(expected)
        assert not out.tokens[i, len(expected) :].any()


def _teacher_forced(model, prompt, completion, temperature):
    logits = np.asarray(model.logits(np.array([prompt + completion])))[0]
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    raw = jax.nn.log_softmax(steps, axis=-1)
    tempered = jax.nn.log_softmax(steps / temperature, axis=-1)
    idx = np.arange(len(completion))
    return np.asarray(tempered)[idx, completion], np.asarray(raw)[idx, completion]


def test_logprobs_equal_a_teacher_forced_forward(pair):
    """The on-policy importance ratio is exactly 1: sampler logprobs == trainer logprobs (fp32)."""
    _, model = pair
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40)
    out = Sampler(model, stop_ids=(2,)).sample(PROMPTS, max_new_tokens=12, n=3, sampling=params, seed=5)
    for row in range(len(PROMPTS) * 3):
        prompt = PROMPTS[row // 3]
        completion = out.completion(row)
        tempered, raw = _teacher_forced(model, prompt, completion, 0.7)
        np.testing.assert_allclose(out.logprobs[row, : len(completion)], tempered, atol=1e-5)
        np.testing.assert_allclose(out.raw_logprobs[row, : len(completion)], raw, atol=1e-5)


def test_n_samples_share_one_prefill_and_seeds_reproduce(pair):
    _, model = pair
    sampler = Sampler(model, stop_ids=())
    greedy = sampler.sample(PROMPTS, max_new_tokens=6, n=4, sampling=GREEDY)
    for b in range(len(PROMPTS)):
        rows = greedy.tokens[4 * b : 4 * b + 4]
        assert (rows == rows[0]).all()
    hot = SamplingParams(temperature=1.5)
    a = sampler.sample(PROMPTS, max_new_tokens=6, n=4, sampling=hot, seed=11)
    b = sampler.sample(PROMPTS, max_new_tokens=6, n=4, sampling=hot, seed=11)
    c = sampler.sample(PROMPTS, max_new_tokens=6, n=4, sampling=hot, seed=12)
    assert (a.tokens == b.tokens).all() and (a.tokens != c.tokens).any()
    assert len({tuple(r) for r in a.tokens[:4]}) > 1  # samples of one prompt differ
    # A row's draws do not depend on what else is in the batch.
    alone = sampler.sample(PROMPTS[:1], max_new_tokens=6, n=4, sampling=hot, seed=11)
    assert (alone.tokens == a.tokens[:4]).all()


def test_stream_yields_the_same_tokens_in_chunks(pair):
    _, model = pair
    sampler = Sampler(model, stop_ids=(2,))
    params = SamplingParams(temperature=1.0)
    whole = sampler.sample(PROMPTS, max_new_tokens=10, n=2, sampling=params, seed=3)
    chunks = list(sampler.stream(PROMPTS, max_new_tokens=10, n=2, sampling=params, seed=3, chunk=4))
    assert len(chunks) <= 3 and chunks[-1].output is not None
    for row in range(len(PROMPTS) * 2):
        assert [t for c in chunks for t in c.tokens[row]] == whole.completion(row)
    np.testing.assert_array_equal(chunks[-1].output.tokens, whole.tokens)


def test_sharded_sampling_equals_single_device(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path)
    cfg_mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = mj.load_model(tmp_path, mesh=cfg_mesh, dtype="float32")
    single = mj.load_model(tmp_path, dtype="float32")
    params = SamplingParams(temperature=0.8)
    prompts = [*PROMPTS, [1, 2, 3]]
    a = Sampler(sharded).sample(prompts, max_new_tokens=8, n=2, sampling=params, seed=1)
    b = Sampler(single).sample(prompts, max_new_tokens=8, n=2, sampling=params, seed=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # The cache is sharded like the model: rows over data x fsdp, kv heads over tensor.
    state = Sampler(sharded)._start(prompts, 2, 8, 0)
    assert tuple(state.cache.k.sharding.spec)[:3] == (("data", "fsdp"), None, "tensor")


def test_bad_requests(pair):
    _, model = pair
    sampler = Sampler(model)
    with pytest.raises(ValueError, match="at least one prompt"):
        sampler.sample([], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sampler.sample([[1] * 10], max_new_tokens=model.cfg.text.max_position_embeddings)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        sampler.sample([[1, 97]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        sampler.sample([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"one integer per prompt \(2\)"):
        sampler.sample([[1], [1, 5]], max_new_tokens=[3, 4, 5])


def test_per_prompt_budgets_cut_the_rows_of_a_uniform_budget(pair):
    # A row's draws depend only on its key and its token index, so a smaller budget truncates it.
    _, model = pair
    sampler = Sampler(model, stop_ids=())
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 8]]
    full = sampler.sample(prompts, max_new_tokens=9, n=2, seed=3)
    cut = sampler.sample(prompts, max_new_tokens=[2, 9, 5], n=2, seed=3)
    assert cut.lengths.tolist() == [2, 2, 9, 9, 5, 5]
    assert cut.finish_reasons == ["length"] * 6
    for row in range(6):
        n = cut.lengths[row]
        np.testing.assert_array_equal(cut.tokens[row, :n], full.tokens[row, :n])
        np.testing.assert_allclose(cut.logprobs[row, :n], full.logprobs[row, :n], rtol=1e-6)
        assert not cut.tokens[row, n:].any()
