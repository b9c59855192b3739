"""The capacity arithmetic of `plan` (`aot.capacity`) against hand-worked cases and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magistral_jax.aot import capacity as C
from magistral_jax.cli.plan import format_capacity
from magistral_jax.config import DEFAULT_RULES

GiB = 2**30


def two_lengths() -> C.Lengths:
    """Completions of 2 or 6 new tokens, half each."""
    pmf = np.zeros(6)
    pmf[[1, 5]] = 0.5
    return C.Lengths("two", 6, pmf)


def test_two_lengths_in_flight_by_hand():
    d = two_lengths()
    assert d.mean == 4
    # A 2-token sequence lives steps 1, 2 and a 6-token one steps 1..6: 8 slot-steps, whose steps sum
    # to 3 + 21 = 24; a sequence in flight is at step 3 on average (the plain mean's half, 2, is not).
    assert d.in_flight(np.arange(1, 7)) == pytest.approx(3.0)
    # The longer of two: 2 only when both are 2 (1/4).
    assert d.mean_of_max(2) == pytest.approx(2 * 0.25 + 6 * 0.75)


def test_paged_pages_of_two_lengths_by_hand():
    d = two_lengths()
    # Prompt of 6 in pages of 4: one full page shared by the group, 2 tokens copied per sample. A
    # sample at step t holds ceil((2 + t) / 4) pages: 1, 1, 2, 2, 2, 2 -> 2 page-steps for a 2-token
    # sample, 10 for a 6-token one, 6 on average. A group of 2 holds its shared page for the
    # longer one's life, 5 steps on average, and lives 2 x 4 slot-steps:
    # (1 x 5 + 2 x 6) / 8 = 17 / 8 pages per sequence in flight.
    assert C.paged_pages(d, 6, 4, 2, 0) == pytest.approx(17 / 8)
    # Alone, a sample holds the prompt's page all its life: (1 x 4 + 6) / 4 slot-steps.
    assert C.paged_pages(d, 6, 4, 1, 0) == pytest.approx(2.5)
    # A reserve of 5 tokens is two whole pages more.
    assert C.paged_pages(d, 6, 4, 2, 5) == pytest.approx(17 / 8 + 2)
    # Each row reads its own pages, the shared one included: (1 + 6 / 4) x 4 tokens... by the steps:
    # (2 x 4 + (1 + 1 + 2 + 2 + 2 + 2) x 4 + 8 x 4) / 8 slot-steps = (8 + 40 + 32) / 8 = 10.
    assert C.paged_read_tokens(d, 6, 4) == pytest.approx(10.0)


def test_contiguous_reads_up_to_the_longest_row_by_hand():
    d = two_lengths()
    # In flight, a row is at step 1 or 2 with 1/4 each, 3..6 with 1/8 each. With blocks of one
    # slot and no prompt, one row reads its step; the longer of two rows reads
    # sum_t P(max >= t) = (64 + 60 + 48 + 39 + 28 + 15) / 64.
    assert C.contiguous_read_slots(d, 0, 6, 1, 1) == pytest.approx(3.0)
    assert C.contiguous_read_slots(d, 0, 6, 2, 1) == pytest.approx(254 / 64)
    # Blocks of 4 after a 2-slot prompt: a row at step 1 or 2 reads one block, else two.
    assert C.contiguous_read_slots(d, 2, 8, 1, 4) == pytest.approx(4 * (0.5 + 2 * 0.5))


@pytest.mark.parametrize("n", [7, 40960])
def test_uniform_lengths_in_flight_have_the_closed_form(n):
    d = C.parse_lengths("uniform:0.5", n + 1)  # uniform over 1..n (the budget one more)
    assert d.mean == pytest.approx((n + 1) / 2)
    # The step a sequence is at, length-biased: E[L (L + 1) / 2] / E[L] = (n + 2) / 3; the length of
    # a sequence in flight: E[L^2] / E[L] = (2n + 1) / 3.
    steps = np.arange(1, n + 2)
    assert d.in_flight(steps) == pytest.approx((n + 2) / 3, rel=1e-12)
    lengths = np.arange(1, n + 2)
    assert np.dot(lengths**2, d.pmf) / d.mean == pytest.approx((2 * n + 1) / 3, rel=1e-12)
    # Pages of one token, no group, no reserve: the prompt plus the mean step, held and read.
    assert C.paged_pages(d, 100, 1, 1, 0) == pytest.approx(100 + (n + 2) / 3, rel=1e-12)
    assert C.paged_read_tokens(d, 100, 1) == pytest.approx(100 + (n + 2) / 3, rel=1e-12)


@pytest.mark.parametrize(("name", "fraction"), [(n, f.default_fraction) for n, f in C.LENGTHS.items()])
def test_every_family_reaches_its_mean(name, fraction):
    # Within the rounding of the families on integer lengths (uniform5x: 3a, a whole).
    d = C.parse_lengths(name, 4096)
    assert d.mean == pytest.approx(fraction * 4096, abs=1.5)
    assert d.name == f"{name}:{fraction:.4g}"
    if name != "fixed":
        d = C.parse_lengths(f"{name}:0.2", 4096)
        assert d.mean == pytest.approx(0.2 * 4096, abs=1.5)
    assert C.parse_lengths(None, 4096).name == "uniform5x:0.3333"


def test_uniform5x_spans_five_times_its_shortest():
    d = C.parse_lengths("uniform5x:0.3", 3000)
    support = np.flatnonzero(d.pmf) + 1
    assert (support[0], support[-1], len(support)) == (300, 1500, 1201)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zipf", "unknown distribution 'zipf'; known: uniform5x"),
        ("uniform:x", "the mean fraction 'x' is not a number"),
        ("lognormal:1.5", r"must lie in \(0, 1\]"),
        ("uniform5x:0.7", "puts 5x the shortest past it"),
    ],
)
def test_bad_length_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        C.parse_lengths(spec, 1000)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(lengths="zipf:0.2"), "unknown distribution 'zipf'"),
        (dict(page_size=0), "the page size must be positive, got 0"),
        (dict(group_size=0), "the group size must be positive, got 0"),
        (dict(reserve=-1), "the reserve must not be negative, got -1"),
    ],
)
def test_plan_options_are_refused_before_compiling(options, message):
    with pytest.raises(ValueError, match=message):
        C.CapacityOptions(**options)


@pytest.mark.parametrize("page_size", [16, 64, 128])
@pytest.mark.parametrize("prompt", [1, 127, 500])
@pytest.mark.parametrize("spec", ["fixed:1", "uniform:0.5", "lognormal:0.1"])
def test_paged_never_holds_more_than_contiguous_without_a_reserve(page_size, prompt, spec):
    # With pages dividing the 128-slot buckets, a sequence's pages never exceed its contiguous slots
    # (at the full budget, with one sample per prompt, the worst case); sharing only lowers them.
    d = C.parse_lengths(spec, 1000)
    slots = C.contiguous_slots(prompt, 1000)
    for group in (1, 16):
        assert C.paged_pages(d, prompt, page_size, group, 0) * page_size <= slots


def test_capacity_of_a_two_layer_model_by_hand():
    d = C.parse_lengths("fixed:1", 128)
    kwargs = dict(
        lengths=d,
        prompt_len=64,
        n_layers=2,
        n_kv_heads=2,
        head_dim=16,
        cache_itemsize=2,
        weight_bytes=1e6,
        rules=DEFAULT_RULES,
        hbm_bytes=GiB,
        hbm_bandwidth=1e9,
        decode_rows=4,
        decode_peak_bytes=100 * 2**20,
        decode_cache_bytes=65536,  # as the two meshes below shard 4 rows' cache: 4 x 256 x 256 / 4
        decode_row_bytes=4096,
        attention_block=128,
        page_size=64,
        group_size=1,
        reserve=0,
    )
    # K and V of 2 layers x 2 kv heads x 16 in bfloat16: 256 bytes a token. Prompts pad to 128,
    # plus 128 new tokens: 256 slots. On fsdp 2 x tensor 2 a cache of many rows splits 2 ways by
    # row and 2 by kv head: each byte on one chip. The decode program compiled for 4 rows holds
    # 4096 bytes a chip of their other state: 4 x 4096 / 4 a row over the mesh.
    c = C.capacity(mesh=dict(data=1, fsdp=2, tensor=2), **kwargs)
    assert (c.kv_bytes_per_token, c.cache_replication, c.row_bytes) == (256, 1, 4096)
    free = 4 * (GiB - (100 * 2**20 - 65536 - 4096))
    assert c.free_bytes == free
    assert c.contiguous.bytes_per_sequence == 256 * 256 + 4096
    assert c.contiguous.sequences == free // (256 * 256 + 4096)
    # Every completion 128 tokens: 1 prompt page and, at step t, ceil(t / 64) of its own: 1.5 on
    # average over the 128 steps; 2.5 pages of 64 tokens.
    assert c.paged.tokens_per_sequence == pytest.approx(2.5 * 64)
    assert c.paged.sequences == math.floor(free / (2.5 * 64 * 256 + 4096))
    assert c.ratio == c.paged.sequences / c.contiguous.sequences
    # Every contiguous row reads 2 blocks of 128 (the longest row is past the prompt's 128
    # slots); a paged one reads 1 + 1.5 pages.
    assert c.contiguous.kv_read_bytes == pytest.approx(c.contiguous.sequences * 256 * 256)
    assert c.paged.kv_read_bytes == pytest.approx(c.paged.sequences * 2.5 * 64 * 256)
    step = 1e6 + c.paged.kv_read_bytes
    assert c.paged.step_bytes == pytest.approx(step)
    assert c.paged.tokens_per_s == pytest.approx(c.paged.sequences * 4 * 1e9 / step)
    # Two kv heads cannot split over tensor 4: every byte sits on the 4 chips of the tensor axis.
    c = C.capacity(mesh=dict(data=1, fsdp=1, tensor=4), **(kwargs | dict(decode_cache_bytes=4 * 256 * 256)))
    assert c.cache_replication == 4
    free = 4 * (GiB - (100 * 2**20 - 4 * 256 * 256 - 4096))
    assert c.contiguous.sequences == free // (4 * 256 * 256 + 4096)
    text = "\n".join(format_capacity(c))
    assert "fixed:1 of a 128-token budget" in text and f"-> {c.paged.sequences:,} sequences" in text
