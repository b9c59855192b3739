"""The paged KV cache: its attention against a dense oracle, its page accounting by hand, and the
paged batcher against the contiguous one (itself checked against transformers and teacher forcing):
same tokens, same log-probabilities, groups sharing their prompt's pages, preemption losing nothing."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import magistral_jax as mj
from magistral_jax.model.attention import paged_attention
from magistral_jax.sampling import GREEDY, Sampler, SamplingParams
from magistral_jax.sampling.continuous import ContinuousBatcher, PagedSampler, Request
from magistral_jax.sampling.pages import PagePool


def _dense_paged_oracle(q, k_pages, v_pages, layer, table, lengths, q_positions):
    """Float64 attention of each row's queries over the slots its table names (slot t: page
    table[t // S], offset t % S, position t), written from the definition."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    b, t, n, d = q.shape
    g, size = k_pages.shape[2], k_pages.shape[3]
    out = np.zeros_like(q)
    for row in range(b):
        slots = np.arange(lengths[row])
        k = k_pages[table[row, slots // size], layer, :, slots % size]  # [slots, G, K]
        v = v_pages[table[row, slots // size], layer, :, slots % size]
        for i in range(t):
            for h in range(n):
                seen = slots <= q_positions[row, i]
                logits = k[seen, h // (n // g)] @ q[row, i, h] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[row, i, h] = (p / p.sum()) @ v[seen, h // (n // g)]
    return out


def _check_portable_path(q, k_pages, v_pages, layer, table, lengths, q_positions):
    """`paged_attention`'s portable path, blocks of 2 pages, against the oracle."""
    got = paged_attention(
        *(jnp.asarray(x) for x in (q, k_pages, v_pages)),
        jnp.int32(layer),
        jnp.asarray(table),
        jnp.asarray(lengths),
        q_positions=jnp.asarray(q_positions),
        pages_per_block=2,
    )
    want = _dense_paged_oracle(q, k_pages, v_pages, layer, table, lengths, q_positions)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_paged_attention_reads_each_rows_pages_through_its_table():
    rng = np.random.default_rng(0)
    size, n_pages, layers, g, n, d = 4, 12, 3, 2, 8, 16
    k_pages = rng.normal(size=(n_pages, layers, g, size, d)).astype(np.float32)
    v_pages = rng.normal(size=(n_pages, layers, g, size, d)).astype(np.float32)
    # Ragged rows: 1 slot, exactly one page, one page and one slot, three pages but two slots; rows
    # 2 and 3 share their first page (a group's prompt). Unused entries name pages full of other
    # rows' (or garbage) keys: reading past a row's length would show.
    lengths = np.array([1, 4, 5, 10], np.int32)
    table = np.array([[3, 9, 9, 9], [5, 1, 2, 7], [6, 8, 11, 4], [6, 10, 2, 1]], np.int32)
    k_pages[[7, 4]] *= 50.0
    q = rng.normal(size=(4, 2, n, d)).astype(np.float32)
    q_positions = lengths[:, None] - np.array([[2, 1]])  # two new tokens, the later sees one more slot
    q_positions[0] = [0, 0]
    _check_portable_path(q, k_pages, v_pages, 2, table, lengths, q_positions)


@pytest.mark.parametrize("longest", [9, 15])
def test_paged_attention_reads_the_blocks_its_longest_row_fills_and_no_more(longest):
    """Pages of 4 tokens, 2 pages a block, a table 3 blocks wide: a longest row of 9 or 15 slots
    takes ceil(9 / 8) = ceil(15 / 8) = 2 blocks. At 9 the second block holds one filled slot (a
    loop a block short misses it); the third block's entries name NaN pages, which would poison
    the output (0 x NaN) if the loop went a block too far. Row 0's query sits past its 3 slots (a
    padding query): it still sees those 3 only, not the rest of its page."""
    rng = np.random.default_rng(2)
    k_pages, v_pages = (rng.normal(size=(10, 1, 2, 4, 16)).astype(np.float32) for _ in range(2))
    k_pages[8:], v_pages[8:] = np.nan, np.nan
    lengths = np.array([3, longest], np.int32)
    table = np.array([[2, 3, 4, 5, 8, 9], [1, 6, 7, 0, 9, 8]], np.int32)
    q = rng.normal(size=(2, 1, 8, 16)).astype(np.float32)
    q_positions = np.array([[5], [longest - 1]], np.int32)
    _check_portable_path(q, k_pages, v_pages, 0, table, lengths, q_positions)


@pytest.mark.parametrize(
    ("mesh", "g"),
    [(None, 2), (dict(data=2, tensor=2), 2), (dict(data=2, tensor=2), 1)],
    ids=["one-device", "data2-tensor2", "data2-tensor2-one-kv-head"],
)
def test_the_pallas_kernel_serves_a_decode_step_like_the_portable_path(mesh, g):
    """`paged_attention(impl="splash")`: one new token per row through the Pallas kernel (in its
    interpreter here), rows over the batch axes and kv heads over tensor inside a mesh (one kv
    head, which tensor=2 cannot split, replicated)."""
    rng = np.random.default_rng(1)
    size, n, d = 4, 8, 16
    k_pages, v_pages = (rng.normal(size=(12, 2, g, size, d)).astype(np.float32) for _ in range(2))
    lengths = np.array([1, 4, 5, 10], np.int32)
    table = np.array([[3, 9, 9, 9], [5, 1, 2, 7], [6, 8, 11, 4], [6, 10, 2, 1]], np.int32)
    q = rng.normal(size=(4, 1, n, d)).astype(np.float32)
    args = [jnp.asarray(x) for x in (q, k_pages, v_pages)] + [jnp.int32(1), jnp.asarray(table), jnp.asarray(lengths)]
    kw = dict(q_positions=jnp.asarray(lengths[:, None] - 1), pages_per_block=2, impl="splash")
    with jax.set_mesh(mj.make_mesh(**mesh)) if mesh else contextlib.nullcontext():
        got = jax.jit(lambda *a: paged_attention(*a, **kw))(*args)
    want = _dense_paged_oracle(q, k_pages, v_pages, 1, table, lengths, lengths[:, None] - 1)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    if mesh:  # rows over data x fsdp (2 x 2 of the 8 devices), heads over tensor when the kv heads split
        assert got.sharding.shard_shape(got.shape) == (1, 1, n // g, d)


def test_the_page_pool_shares_prompt_pages_and_frees_a_page_with_its_last_holder():
    pool = PagePool(pages=6, page_size=4, rows=3, table_width=4)
    assert pool.available == 5  # page 0 is the null page, never handed out
    prompt = pool.take(2)
    assert 0 not in prompt
    for row in (0, 1):
        pool.hold(row, prompt, shared=True)
        pool.hold(row, pool.take(1))
    pool.give_back(prompt)  # the taker hands them to the rows
    assert pool.available == 1 and pool.holders[prompt].tolist() == [2, 2]
    pool.release(0)
    assert pool.available == 2  # only row 0's own page came back: the prompt is still held
    pool.grow(1, 13)  # 13 tokens: 4 pages, one more than row 1 holds
    assert pool.held[1] == 4 and pool.available == 1
    pool.release(1)
    assert pool.available == 5 and not pool.table.any()
    with pytest.raises(ValueError, match="6 pages wanted, 5 free"):
        pool.take(6)


CFG = mj.get_preset("tiny").replace(dtype="float32", param_dtype="float32")
# Three groups: prompts of 5, 16 (two whole pages of 8) and 23 tokens; ragged budgets.
PROMPTS = [
    list(range(3, 8)),
    [int(x) for x in np.arange(16) * 7 % 90 + 3],
    [int(x) for x in np.arange(23) * 5 % 90 + 3],
]
BUDGETS = [9, 20, 14]


def _requests(group_size):
    return [
        Request(PROMPTS[g], BUDGETS[g] - i % 3, seed=50 * g + i, tag=(g, i))
        for g in range(len(PROMPTS))
        for i in range(group_size)
    ]


def _run(model, requests, sampling, slots, stop_ids=(2, 40), **cache):
    batcher = ContinuousBatcher(
        mj.Model(CFG, model.params),
        slots=slots,
        max_prompt_len=24,
        max_new_tokens=20,
        chunk=4,
        sampling=sampling,
        stop_ids=stop_ids,
        **cache,
    )
    pending, out = list(requests), {}
    while pending or batcher.busy or batcher.waiting:
        pending = batcher.insert(pending)
        for f in batcher.step():
            assert f.request.tag not in out
            out[f.request.tag] = f
    return out, batcher


@pytest.fixture(scope="module")
def model():
    return mj.init_model(CFG, 0)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.7, top_p=0.9)], ids=["greedy", "seeded"])
def test_paged_batcher_decodes_the_tokens_and_logprobs_of_the_contiguous_one(model, sampling):
    requests = _requests(16)
    want, _ = _run(model, requests, sampling, slots=16)
    got, batcher = _run(model, requests, sampling, slots=16, cache="paged", page_size=8)
    assert got.keys() == want.keys() and len(got) == 48
    assert len({len(f.tokens) for f in want.values()}) > 3  # rows finish at different steps
    for tag, w in want.items():
        g = got[tag]
        assert g.tokens == w.tokens and g.finish_reason == w.finish_reason, tag
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_allclose(g.raw_logprobs, w.raw_logprobs, atol=1e-5)
    assert batcher.preemptions == 0 and batcher.pool.available == batcher.pool.holders.size - 1


def test_a_group_shares_its_prompts_full_pages_and_one_prefill(model, monkeypatch):
    from magistral_jax.sampling import continuous

    prefilled = []
    prefill_pages = continuous.prefill_pages

    def spy(params, cache, prompts, *args, **kw):
        prefilled.append(np.asarray(prompts))
        return prefill_pages(params, cache, prompts, *args, **kw)

    monkeypatch.setattr(continuous, "prefill_pages", spy)
    batcher = ContinuousBatcher(
        mj.Model(CFG, model.params),
        slots=16,
        max_prompt_len=24,
        max_new_tokens=20,
        chunk=4,
        sampling=GREEDY,
        cache="paged",
        page_size=8,
    )
    free = batcher.pool.available
    assert batcher.insert([Request(PROMPTS[2], 12, seed=i, tag=i) for i in range(16)]) == []
    # 23 prompt tokens: two full pages held once by the group, the third page copied per sample.
    assert free - batcher.pool.available == 2 + 16
    # One prefill call; its one real row is the prompt (the others are padding to a bucket of 8).
    assert len(prefilled) == 1 and prefilled[0][0, :23].tolist() == PROMPTS[2] and not prefilled[0][1:].any()


def test_a_pool_too_small_preempts_the_youngest_and_loses_nothing(model):
    # Two groups of 4 on 16-token prompts (two whole pages of 8), 20 new tokens each, no stop
    # token, 19 pages (the least a request of the 128-token prompt width and 20 tokens needs):
    # admitted together (4 shared pages and a page of reserve each), they outgrow the pool when
    # their completions reach a fourth page (4 + 8 x 2 = 20 > 19), mid-generation.
    sampling = SamplingParams(temperature=0.7)
    requests = [
        Request(PROMPTS[1][::-1] if g else PROMPTS[1], 20, seed=10 * g + i, tag=(g, i))
        for g in (0, 1)
        for i in range(4)
    ]
    want, _ = _run(model, requests, sampling, slots=16, stop_ids=())
    got, batcher = _run(model, requests, sampling, slots=16, stop_ids=(), cache="paged", page_size=8, pool_tokens=152)
    assert batcher.preemptions > 0 and batcher.recomputed > 0
    assert got.keys() == want.keys()
    for tag, w in want.items():
        assert got[tag].tokens == w.tokens, tag
        np.testing.assert_allclose(got[tag].logprobs, w.logprobs, atol=1e-5)
    assert batcher.generated == sum(len(f.tokens) for f in got.values()) == 160
    assert batcher.pool.available == batcher.pool.holders.size - 1  # every page came back


def test_a_request_waits_until_the_pool_has_its_prompt_and_reserve(model):
    batcher = ContinuousBatcher(
        mj.Model(CFG, model.params),
        slots=4,
        max_prompt_len=100,
        max_new_tokens=8,
        chunk=4,
        sampling=GREEDY,
        cache="paged",
        page_size=16,
        pool_tokens=176,  # 11 pages: the 128-token prompt width and a reserve of 3
        reserve_tokens=40,  # 3 pages
    )
    long, short = [5] * 100, [6] * 3  # 6 full pages and 4 tokens; 3 tokens
    a, b, c = (Request(p, 8, seed=i, tag=i) for i, p in enumerate((long, long, short)))
    assert batcher.insert([a, b, c]) == [b, c]
    # a: its prompt's 7 pages (the 7th, partly filled, copied into a page of its own, then given
    # back) and a reserve of 3: 11 of 11; b would need its own last page + 3.
    assert batcher.pool.available == 4 and batcher.busy == 1
    batcher.step()  # 4 tokens: a's last page has room, nothing is taken
    assert batcher.insert([b, c]) == [b, c]
    while batcher.busy:
        batcher.step()
    # a's pages came back: b (7 + 1 + 3) fits, c (1 + 3) does not.
    assert batcher.insert([b, c]) == [c]


def test_bad_paged_settings_are_refused(model):
    kw = dict(slots=2, max_prompt_len=8, max_new_tokens=8, sampling=GREEDY, cache="paged")
    with pytest.raises(ValueError, match="page_size: a divisor of 128"):
        ContinuousBatcher(model, page_size=48, **kw)
    with pytest.raises(ValueError, match="pool_tokens: 100 tokens cannot hold one request"):
        ContinuousBatcher(model, pool_tokens=100, **kw)
    with pytest.raises(ValueError, match="cache: 'pages'"):
        ContinuousBatcher(model, **{**kw, "cache": "pages"})


def test_the_paged_sampler_samples_what_the_contiguous_one_does(model):
    # 16 rows, budgets up to 20, pages of 8: the batcher shapes of the tests above (shared programs).
    prompts, budgets, seed = [PROMPTS[0], PROMPTS[2]], [9, 20], 2**32 - 3
    sampling = SamplingParams(temperature=0.7, top_p=0.9)
    want = Sampler(model, stop_ids=(2, 40)).sample(prompts, max_new_tokens=budgets, n=8, sampling=sampling, seed=seed)
    paged = PagedSampler(model, stop_ids=(2, 40), page_size=8, chunk=4)
    got = paged.sample(prompts, max_new_tokens=budgets, n=8, sampling=sampling, seed=seed)
    assert got.finish_reasons == want.finish_reasons and paged.preemptions == 0
    for r in range(16):
        assert got.completion(r) == want.completion(r)
        m = want.lengths[r]
        np.testing.assert_allclose(got.logprobs[r, :m], want.logprobs[r, :m], atol=1e-5)
        np.testing.assert_allclose(got.raw_logprobs[r, :m], want.raw_logprobs[r, :m], atol=1e-5)
    # Streamed in chunks through a pool of 19 pages that the 16 rows outgrow (they hold 8 x 1 + 2 +
    # 8 x 1 = 18 at the start, up to 8 x 2 + 2 + 8 x 4 = 50), each row's tokens arrive once.
    small = PagedSampler(model, stop_ids=(2, 40), page_size=8, pool_tokens=152)
    streamed = [[] for _ in range(16)]
    for chunk in small.stream(prompts, max_new_tokens=budgets, n=8, sampling=sampling, seed=seed, chunk=4):
        for r, new in enumerate(chunk.tokens):
            streamed[r] += new
    assert small.preemptions > 0
    assert streamed == [want.completion(r) for r in range(16)]
