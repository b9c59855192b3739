"""How many sequences a generator holds at once with a contiguous or a paged KV cache, and what a
decode step then reads from HBM: the arithmetic behind `plan`'s capacity section.

Conventions. A completion has L new tokens, 1 <= L <= B (the budget), drawn from a length
distribution (`LENGTHS`, a registry of named families, each fitted to a mean given as a fraction
of B). A sequence in a continuous batcher spends one decode step per new token; at its step t
(t = 1..L) it holds its prompt (P tokens) and t new tokens. Expectations are exact sums over the
integer lengths, never sampled.

Why the length bias. A batcher refills a slot as soon as its sequence finishes, so the sequences
in flight at a given moment are caught at a uniformly random step of their life, and long ones are
caught more often. By renewal-reward, the time average of any per-step quantity f(t) over the
sequences in flight is

    E_flight[f] = E[sum_{t=1..L} f(t)] / E[L] = sum_{t>=1} f(t) P(L >= t) / E[L],

(swap the sums: step t is lived by every sequence with L >= t). With f(t) = t this is
(E[L^2] + E[L]) / (2 E[L]), not E[L] / 2: for lengths uniform on 1..n, (n + 2) / 3.

The caches (`decoder.KVCache` today; the paged pool of issue 19):
- contiguous: every slot reserves `cache_shape(P, B)` slots (the prompt's padded width plus the
  budget, in buckets of 128), whatever its sequence will use; each of a group's samples keeps its
  own copy of the prompt.
- paged: pages of `page_size` tokens. A group of G samples prefills its prompt once and shares
  its floor(P / page_size) full pages, held until the group's last sample finishes (for
  max(L_1..L_G) steps); each sample copies the partly filled last page (s = P mod page_size
  tokens) and at step t holds ceil((s + t) / page_size) pages of its own, plus the reserve
  (ceil(reserve / page_size) pages, the headroom the batcher admits it with, so that a decode
  chunk never runs out mid-way). Per sequence in flight, by the renewal argument over a group
  (G E[L] slot-steps):

      pages = floor(P / ps) E[max(L_1..L_G)] / (G E[L]) + E_flight[ceil((s + t) / ps)] + ceil(r / ps).

A cache byte lives on `cache_replication` chips of the generator mesh (the KV array is sharded by
the rules: rows over the batch axes, kv heads over `tensor` where they divide). Sequences that
fit = floor(HBM free for the rows / bytes per sequence), the free HBM being every chip's minus
what the compiled decode program needs besides its rows' state (weights, temporaries, buffers
kept alive beside it), a sequence's bytes its keys and values plus the rest of its row's state
(logits, output buffers, ...), as the compiled program holds them.

HBM traffic of a decode step (whole mesh): the matmul weights once, plus the keys and values the
attention reads: contiguous, every row reads the blocks up to the longest row's filled length
(`attention.cached_attention`); paged, each row reads its own pages. The tokens/s beside it is a
roofline estimate: rows / (bytes / (chips x HBM bandwidth)), each chip reading only its share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from magistral_jax.model.layers import round_up

DEFAULT_LENGTHS = "uniform5x"
DEFAULT_PAGE_SIZE = 64
DEFAULT_GROUP_SIZE = 16
DEFAULT_RESERVE = 16  # one decode chunk (`async_rl.chunk`)
LOGNORMAL_SIGMA = 1.0


# ------------------------------------------------------------------------------------------------
# Length distributions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """A distribution of completion lengths over 1..budget: `pmf[l - 1] = P(L = l)`."""

    name: str
    budget: int
    pmf: np.ndarray

    def __post_init__(self):
        if self.pmf.shape != (self.budget,) or np.any(self.pmf < 0) or not math.isclose(self.pmf.sum(), 1.0):
            raise ValueError(f"lengths {self.name}: a distribution over 1..{self.budget} expected")

    @property
    def mean(self) -> float:
        return float(np.dot(np.arange(1, self.budget + 1), self.pmf))

    @property
    def survival(self) -> np.ndarray:
        """`survival[t - 1] = P(L >= t)`, t = 1..budget."""
        return np.cumsum(self.pmf[::-1])[::-1]

    def in_flight(self, f: np.ndarray) -> float:
        """E_flight[f]: the mean of `f[t - 1]` (a quantity at step t of a sequence's life) over the
        sequences in flight, sum_t f(t) P(L >= t) / E[L] (see the module docstring)."""
        return float(np.dot(f, self.survival) / self.mean)

    def step_cdf(self) -> np.ndarray:
        """`cdf[t - 1] = P(step <= t)` of the step an in-flight sequence is at."""
        return np.cumsum(self.survival) / self.mean

    def mean_of_max(self, n: int) -> float:
        """E[max(L_1..L_n)] of n independent lengths: sum_l P(max >= l) = sum_l 1 - F(l - 1)^n."""
        cdf = np.concatenate(([0.0], np.cumsum(self.pmf)[:-1]))
        return float(np.sum(1.0 - np.clip(cdf, 0.0, 1.0) ** n))


def _bisect(mean_of: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The x in [lo, hi] where the increasing `mean_of(x)` reaches `target`."""
    for _ in range(64):  # far past float64's resolution of [lo, hi]
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_of(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _uniform_range(budget: int, lo: int, hi: int) -> np.ndarray:
    pmf = np.zeros(budget)
    pmf[lo - 1 : hi] = 1.0 / (hi - lo + 1)
    return pmf


def uniform(budget: int, fraction: float) -> np.ndarray:
    """Uniform over the widest range of lengths centred on the mean: 1..2m - 1 for a mean m up to
    half the budget, 2m - B..B above."""
    m = fraction * budget
    lo, hi = (1, round(2 * m - 1)) if fraction <= 0.5 else (round(2 * m - budget), budget)
    if not 1 <= lo <= hi <= budget:
        raise ValueError(f"lengths uniform: a mean of {fraction} of {budget} tokens leaves no range")
    return _uniform_range(budget, lo, hi)


def uniform5x(budget: int, fraction: float) -> np.ndarray:
    """Uniform over a..5a with mean 3a: the paper's spread (the longest completions up to 5 times
    the shortest); a mean up to 0.6 of the budget."""
    a = max(1, round(fraction * budget / 3))
    if 5 * a > budget:
        raise ValueError(f"lengths uniform5x: a mean of {fraction} of the budget puts 5x the shortest past it")
    return _uniform_range(budget, a, 5 * a)


def exponential(budget: int, fraction: float) -> np.ndarray:
    """Truncated exponential, P(L = l) proportional to exp(-k l) on 1..budget, k fitted (of
    either sign) to the mean."""
    ls = np.arange(1, budget + 1)

    def pmf(k: float) -> np.ndarray:
        logits = -k * ls / budget
        return _normalised(np.exp(logits - logits.max()))

    k = -_bisect(lambda k: float(np.dot(ls, pmf(-k))), fraction * budget, -1e4, 1e4)
    return pmf(k)


def lognormal(budget: int, fraction: float) -> np.ndarray:
    """Lognormal (sigma = `LOGNORMAL_SIGMA`, a long tail) truncated to 1..budget, its mu fitted
    to the mean: P(L = l) proportional to the density at l."""
    logs = np.log(np.arange(1, budget + 1))

    def pmf(mu: float) -> np.ndarray:
        logits = -((logs - mu) ** 2) / (2 * LOGNORMAL_SIGMA**2) - logs
        return _normalised(np.exp(logits - logits.max()))

    mu = _bisect(lambda mu: float(np.dot(np.exp(logs), pmf(mu))), fraction * budget, -50.0, 50.0)
    return pmf(mu)


def fixed(budget: int, fraction: float) -> np.ndarray:
    """Every completion of the same length (fraction 1: the whole budget, as a contiguous cache assumes)."""
    return _uniform_range(budget, max(1, round(fraction * budget)), max(1, round(fraction * budget)))


@dataclass(frozen=True)
class LengthFamily:
    """A registered family: `build(budget, mean_fraction) -> pmf`, its default mean fraction."""

    build: Callable[[int, float], np.ndarray]
    default_fraction: float
    help: str


LENGTHS: dict[str, LengthFamily] = {
    # The default, and the issue's figure: mean a third of the budget. Paper section 3: "the longest
    # completions can take up to 5 times longer than the shortest"; bench rl's workload spreads its
    # budgets 5x as well. Nothing else about the lengths' shape is published.
    "uniform5x": LengthFamily(uniform5x, 1 / 3, "uniform over a..5a (the paper's 5x spread), mean 3a"),
    "uniform": LengthFamily(uniform, 1 / 2, "uniform over the widest range around the mean (1..B at 0.5)"),
    "exponential": LengthFamily(exponential, 1 / 3, "truncated exponential fitted to the mean"),
    "lognormal": LengthFamily(lognormal, 1 / 3, f"truncated lognormal, sigma {LOGNORMAL_SIGMA}, fitted to the mean"),
    "fixed": LengthFamily(fixed, 1.0, "every completion the same length (1.0: the whole budget)"),
}


def lengths_spec(spec: str | None) -> tuple[str, float]:
    """(family, mean fraction) of `NAME[:MEAN_FRACTION]`; None is the default."""
    name, _, frac = (spec or DEFAULT_LENGTHS).partition(":")
    if name not in LENGTHS:
        raise ValueError(f"lengths: unknown distribution {name!r}; known: {', '.join(LENGTHS)}")
    try:
        fraction = float(frac) if frac else LENGTHS[name].default_fraction
    except ValueError:
        raise ValueError(f"lengths {spec}: the mean fraction {frac!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"lengths {spec}: the mean fraction must lie in (0, 1], got {fraction}")
    return name, fraction


def parse_lengths(spec: str | None, budget: int) -> Lengths:
    """`NAME[:MEAN_FRACTION]` (e.g. `uniform5x`, `lognormal:0.25`) over completions of 1..budget."""
    if budget < 1:
        raise ValueError(f"lengths: a budget of at least one new token expected, got {budget}")
    name, fraction = lengths_spec(spec)
    return Lengths(f"{name}:{fraction:.4g}", budget, LENGTHS[name].build(budget, fraction))


# ------------------------------------------------------------------------------------------------
# Bytes and pages
# ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Keys and values of one token over every layer."""
    return 2 * n_layers * n_kv_heads * head_dim * itemsize


def cache_shards(
    rules: tuple, mesh: dict[str, int], rows: int, n_layers: int, n_kv_heads: int, slots: int, head_dim: int
) -> int:
    """Over how many chips the KV cache [rows, layers, kv heads, slots, head dim] splits, by the
    rules (`KVCache.logical_axes`); a mesh axis that does not divide its dimension replicates it."""
    from magistral_jax.model.decoder import KVCache
    from magistral_jax.sharding import logical_to_spec

    spec = logical_to_spec(KVCache.logical_axes().k, rules, (rows, n_layers, n_kv_heads, slots, head_dim), mesh)
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh[a] for a in axes)


def contiguous_slots(prompt_len: int, budget: int) -> int:
    """Slots a contiguous cache reserves per sequence (`sampler.cache_shape`)."""
    from magistral_jax.sampling.sampler import cache_shape

    return cache_shape(prompt_len, budget)[1]


def paged_pages(lengths: Lengths, prompt_len: int, page_size: int, group_size: int, reserve: int) -> float:
    """Expected pages held per sequence in flight (the module docstring's formula)."""
    steps = np.arange(1, lengths.budget + 1)
    shared = prompt_len // page_size
    own = np.ceil((prompt_len % page_size + steps) / page_size)
    prefix = shared * lengths.mean_of_max(group_size) / (group_size * lengths.mean)
    return prefix + lengths.in_flight(own) + math.ceil(reserve / page_size)


def paged_read_tokens(lengths: Lengths, prompt_len: int, page_size: int) -> float:
    """Expected KV tokens one row's decode step reads from a paged cache: its whole pages, shared
    prompt pages included (each row reads its own table), not the reserve."""
    steps = np.arange(1, lengths.budget + 1)
    pages = prompt_len // page_size + np.ceil((prompt_len % page_size + steps) / page_size)
    return lengths.in_flight(pages * page_size)


def contiguous_read_slots(lengths: Lengths, width: int, slots: int, rows: int, block: int) -> float:
    """Expected cache slots each row's decode step reads from a contiguous cache of `slots` slots:
    whole blocks up to the longest of `rows` in-flight rows (the prompt's padded `width` plus its
    step), `cached_attention`'s loop; the rows' steps taken independent."""
    bk = min(block, slots)
    steps = np.arange(1, lengths.budget + 1)
    # Never past the cache's last block: the slots hold the padded prompt and the whole budget.
    blocks = np.ceil((width + steps) / bk)
    cdf = np.clip(lengths.step_cdf(), 0.0, 1.0)
    p_max = np.diff(np.concatenate(([0.0], cdf**rows)))
    return float(np.dot(blocks, p_max) * bk)


# ------------------------------------------------------------------------------------------------
# The capacity of a generator
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityOptions:
    """What `plan` asks about the caches: the length distribution (`NAME[:MEAN_FRACTION]`, None
    for the default), page size, and group size and reserve (None: the run's, or the defaults)."""

    lengths: str | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    group_size: int | None = None
    reserve: int | None = None

    def __post_init__(self):
        # Refused before anything is compiled (a 24B compile takes minutes).
        lengths_spec(self.lengths)
        if self.page_size < 1:
            raise ValueError(f"capacity: the page size must be positive, got {self.page_size}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"capacity: the group size must be positive, got {self.group_size}")
        if self.reserve is not None and self.reserve < 0:
            raise ValueError(f"capacity: the reserve must not be negative, got {self.reserve}")


@dataclass
class CacheCapacity:
    """One cache's figures on the generator mesh. Bytes over the whole mesh (replicas included)."""

    tokens_per_sequence: float  # cache tokens reserved (contiguous) or held on average (paged)
    bytes_per_sequence: float
    sequences: int
    kv_read_bytes: float  # per decode step, all rows, expected at the steady state
    step_bytes: float  # weights + kv_read_bytes
    tokens_per_s: float  # roofline estimate


@dataclass
class Capacity:
    """The capacity section of a plan (see the module docstring)."""

    lengths: str
    budget: int
    mean_length: float
    mean_fraction: float
    prompt_len: int
    group_size: int
    page_size: int
    reserve: int
    chips: int
    mesh: dict[str, int]
    kv_bytes_per_token: int
    cache_replication: int  # chips holding each cache byte
    decode_rows: int  # rows of the compiled decode program the figures below come from
    decode_peak_bytes: int  # per chip, its peak plus what is kept alive beside it
    decode_cache_bytes: int  # per chip, its cache's keys and values
    decode_row_bytes: int  # per chip, the rest of its rows' state (logits, outputs, positions, ...)
    row_bytes: float  # whole mesh, what a row's state besides its keys and values takes
    free_bytes: float  # whole mesh, for the rows: every chip's HBM less the decode's fixed needs
    weight_bytes: float  # read once per decode step (whole mesh)
    hbm_bandwidth: float  # per chip
    contiguous: CacheCapacity
    paged: CacheCapacity
    ratio: float | None  # paged / contiguous sequences (None when no contiguous sequence fits)


def _cache(
    tokens: float, read_tokens: float, per_token: float, row: float, free: float, weights: float, bandwidth: float
) -> CacheCapacity:
    """One cache's figures: `row` the bytes of a row besides its keys and values, `bandwidth`
    the whole mesh's."""
    per_seq = tokens * per_token + row
    n = max(0, math.floor(free / per_seq))
    read = n * read_tokens * per_token
    step = weights + read
    return CacheCapacity(tokens, per_seq, n, read, step, n * bandwidth / step)


def capacity(
    *,
    lengths: Lengths,
    prompt_len: int,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    cache_itemsize: int,
    weight_bytes: float,
    rules: tuple,
    mesh: dict[str, int],
    hbm_bytes: int,
    hbm_bandwidth: float,
    decode_rows: int,
    decode_peak_bytes: int,
    decode_cache_bytes: int,
    decode_row_bytes: int,
    attention_block: int,
    page_size: int = DEFAULT_PAGE_SIZE,
    group_size: int = DEFAULT_GROUP_SIZE,
    reserve: int = DEFAULT_RESERVE,
) -> Capacity:
    """Sequences at once with a contiguous and a paged cache, and their decode steps' HBM traffic.

    Args:
      lengths: the completion lengths (their budget is the contiguous cache's budget).
      prompt_len: prompt tokens of every sequence.
      n_layers, n_kv_heads, head_dim, cache_itemsize: the KV cache's shape and dtype size.
      weight_bytes: what a decode step reads of the weights (the matmul parameters, whole mesh).
      rules, mesh: the sharding rules and the generator mesh's axis sizes.
      hbm_bytes, hbm_bandwidth: per chip.
      decode_rows, decode_peak_bytes: the compiled contiguous decode program's rows and per-chip
        peak (with what stays alive beside it).
      decode_cache_bytes, decode_row_bytes: per chip, its state's keys and values, and the rest of
        its rows' state. What it needs besides its rows (weights, temporaries) is the peak minus
        both; every chip's HBM minus that is free for rows, each of which takes its keys and
        values plus the rest of its state (taken equal for both caches).
      attention_block: the cached attention's key block (contiguous reads).
      page_size, group_size, reserve: the paged cache's page, the samples sharing a prompt, the
        tokens of headroom a sequence is admitted with.
    """
    if page_size < 1 or group_size < 1 or reserve < 0 or prompt_len < 1:
        raise ValueError(
            f"capacity: page size {page_size} and group size {group_size} must be positive, reserve {reserve} "
            f"not negative, prompt {prompt_len} positive"
        )
    chips = math.prod(mesh.values())
    per_token = kv_bytes_per_token(n_layers, n_kv_heads, head_dim, cache_itemsize)
    budget = lengths.budget
    slots = contiguous_slots(prompt_len, budget)
    width = round_up(prompt_len, 128)
    # A cache of many rows splits over every batch axis as well.
    replication = chips // cache_shards(rules, mesh, chips * group_size, n_layers, n_kv_heads, slots, head_dim)
    free = chips * (hbm_bytes - (decode_peak_bytes - decode_cache_bytes - decode_row_bytes))
    row = chips * decode_row_bytes / decode_rows
    per_seq_token = per_token * replication
    contiguous_rows = max(1, math.floor(free / (slots * per_seq_token + row)))
    contiguous = _cache(
        slots,
        contiguous_read_slots(lengths, width, slots, contiguous_rows, attention_block),
        per_seq_token,
        row,
        free,
        weight_bytes,
        chips * hbm_bandwidth,
    )
    paged = _cache(
        paged_pages(lengths, prompt_len, page_size, group_size, reserve) * page_size,
        paged_read_tokens(lengths, prompt_len, page_size),
        per_seq_token,
        row,
        free,
        weight_bytes,
        chips * hbm_bandwidth,
    )
    return Capacity(
        lengths=lengths.name,
        budget=budget,
        mean_length=lengths.mean,
        mean_fraction=lengths.mean / budget,
        prompt_len=prompt_len,
        group_size=group_size,
        page_size=page_size,
        reserve=reserve,
        chips=chips,
        mesh=dict(mesh),
        kv_bytes_per_token=per_token,
        cache_replication=replication,
        decode_rows=decode_rows,
        decode_peak_bytes=decode_peak_bytes,
        decode_cache_bytes=decode_cache_bytes,
        decode_row_bytes=decode_row_bytes,
        row_bytes=row,
        free_bytes=free,
        weight_bytes=weight_bytes,
        hbm_bandwidth=hbm_bandwidth,
        contiguous=contiguous,
        paged=paged,
        ratio=paged.sequences / contiguous.sequences if contiguous.sequences else None,
    )
