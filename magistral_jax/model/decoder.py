"""The Mistral Small / Magistral text decoder: parameters, KV cache and forward.

Dimension letters: B batch, T tokens in this call, S cache slots, L layers, D model dim,
N query heads, G kv heads, K head dim, F FFN hidden dim, V vocabulary.

Layout: weights are stacked on a leading `layers` axis and the layers run under `lax.scan`.
Attention projections keep heads as their own axis (`wq: [L, D, N, K]`); q/k use the
"rotate_half" RoPE layout of Hugging Face checkpoints (see `layers.apply_rope`).

Numerics: parameters are stored in `cfg.param_dtype` and cast to `cfg.dtype` for compute;
norms' statistics, RoPE, softmax and the logits are float32.

One forward serves training, scoring, prefill and decode:
- without a cache, tokens attend causally within their segment (`segment_ids`, 0 = padding,
  distinct ids for packed documents; positions restart at each segment by default);
- with a `KVCache`, each row's new tokens are written at that row's `lengths` offset and attend to
  everything the row cached before. Within a row, valid tokens must come first (right padding);
  the row's length grows by its number of valid tokens, so a later call overwrites the padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from magistral_jax.config import ModelConfig, TextConfig
from magistral_jax.model import params as P
from magistral_jax.model.attention import attention, cached_attention, paged_attention
from magistral_jax.model.blocks import attention_block, remat, swiglu_block
from magistral_jax.model.layers import rms_norm, round_up, segment_positions, text_rope_angles
from magistral_jax.sharding import constrain


def param_specs(cfg: TextConfig) -> P.ParamTree:
    """The decoder's parameter declarations."""
    L, D, N, G, K, F, V = (
        cfg.n_layers,
        cfg.dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.hidden_dim,
        cfg.vocab_size,
    )
    return {
        "embed": P.ParamSpec((V, D), ("vocab", "embed"), P.normal(1.0)),
        "layers": {
            "attention_norm": P.ParamSpec((L, D), ("layers", "norm"), P.ones),
            "wq": P.ParamSpec((L, D, N, K), ("layers", "embed", "q_heads", "head_dim"), P.fan_in(D)),
            "wk": P.ParamSpec((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), P.fan_in(D)),
            "wv": P.ParamSpec((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), P.fan_in(D)),
            "wo": P.ParamSpec((L, N, K, D), ("layers", "q_heads", "head_dim", "embed"), P.fan_in(N, K)),
            "ffn_norm": P.ParamSpec((L, D), ("layers", "norm"), P.ones),
            "w1": P.ParamSpec((L, D, F), ("layers", "embed", "mlp"), P.fan_in(D)),
            "w3": P.ParamSpec((L, D, F), ("layers", "embed", "mlp"), P.fan_in(D)),
            "w2": P.ParamSpec((L, F, D), ("layers", "mlp", "embed"), P.fan_in(F)),
        },
        "norm": P.ParamSpec((D,), ("norm",), P.ones),
        "lm_head": P.ParamSpec((D, V), ("embed", "vocab"), P.fan_in(D)),
    }


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, with the position each slot holds.

    Attributes:
      k, v: [B, L, G, S, K] in the compute dtype. Slots and head dim last, so that writing a
        token and reading a block of slots both touch whole [slots, K] tiles; rows first, as XLA
        lays out a cache written row by row inside the layer loop (any other order costs a
        relayout copy of the whole cache per decode call).
      positions: [B, S] int32, the token position cached in each slot, -1 for an empty slot.
      lengths: [B] int32, the number of slots written in each row (the next write offset).
    """

    k: Float[Array, "B L G S K"]
    v: Float[Array, "B L G S K"]
    positions: Int[Array, "B S"]
    lengths: Int[Array, " B"]

    @staticmethod
    def logical_axes() -> KVCache:
        kv = ("batch", "layers", "act_kv_heads", "cache_seq", "head_dim")
        return KVCache(k=kv, v=kv, positions=("batch", "cache_seq"), lengths=("batch",))  # type: ignore[arg-type]

    @staticmethod
    def shapes(cfg: TextConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
        kv = jax.ShapeDtypeStruct((batch, cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim), jnp.dtype(dtype))
        return KVCache(
            k=kv,
            v=kv,
            positions=jax.ShapeDtypeStruct((batch, max_len), jnp.int32),
            lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
        )

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of `max_len` slots (in the context mesh's sharding)."""
        shapes = KVCache.shapes(cfg.text, batch, max_len, cfg.dtype)
        cache = KVCache(
            k=jnp.zeros(shapes.k.shape, shapes.k.dtype),
            v=jnp.zeros(shapes.v.shape, shapes.v.dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )
        return jax.tree.map(
            lambda x, axes: constrain(x, axes, cfg.rules),
            cache,
            KVCache.logical_axes(),
            is_leaf=lambda x: isinstance(x, tuple),
        )


MAX_PAGED_BLOCK = 512


def paged_block(longest: int, page_size: int) -> int:
    """The decode attention's block, in tokens, for a paged cache whose longest row holds
    `longest` tokens: about an eighth of it (a power of two from the page size to
    `MAX_PAGED_BLOCK`). Each loop step gathers a block of every row's pages, held or not (an
    entry a row does not hold names the null page): large blocks read far past short rows (with
    a fixed 512-token block, `bench rl`'s paged generator ran at 0.3x the contiguous one's tokens
    per second, completions being tens of tokens; BENCHMARKS.md), small ones run many steps over
    long rows."""
    block = 1 << max(0, (-(-longest // 8) - 1).bit_length())
    return min(max(block, page_size), max(MAX_PAGED_BLOCK, page_size))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Keys and values in a pool of fixed-size pages shared by the rows, each row reading and
    writing its own through a page table: a row holds as many pages as its tokens need, and the
    rows of a group may share the pages of their common prompt.

    Page 0 is the null page: never allocated, it stands in the table for pages a row does not
    hold (nothing valid is ever written to it). Which page a row gets is the host's business
    (`sampling.pages.PagePool`); the decoder only reads the table and writes a row's new tokens
    at slots `lengths[b]` on (page `slot // S`, offset `slot % S`), so the host must have given
    the row those pages beforehand.

    Attributes:
      k, v: [P, L, G, S, K] in the compute dtype: P pages of S tokens, pages first (one page's
        layers, heads and slots are one block, written token by token and gathered whole).
      page_table: [B, M] int32, row b's j-th page; M a multiple of `MAX_PAGED_BLOCK` tokens' pages.
      lengths: [B] int32, the tokens each row holds (slot t holds position t).
      block: tokens the decode attention reads per loop step (static: a power of two from the
        page size to `MAX_PAGED_BLOCK`; see `paged_block`).
    """

    k: Float[Array, "P L G S K"]
    v: Float[Array, "P L G S K"]
    page_table: Int[Array, "B M"]
    lengths: Int[Array, " B"]
    block: int = dataclasses.field(default=128, metadata=dict(static=True))

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def table_width(tokens: int, page_size: int) -> int:
        """Table entries for rows of up to `tokens` tokens: a multiple of the largest block."""
        return round_up(-(-tokens // page_size), max(1, MAX_PAGED_BLOCK // page_size))

    @staticmethod
    def logical_axes() -> PagedKVCache:
        kv = (None, "layers", "act_kv_heads", None, "head_dim")
        return PagedKVCache(k=kv, v=kv, page_table=("batch", None), lengths=("batch",))  # type: ignore[arg-type]

    @staticmethod
    def init(cfg: ModelConfig, pages: int, page_size: int, rows: int, table_width: int) -> PagedKVCache:
        """An empty pool of `pages` pages (the null page included) and `rows` rows holding none."""
        tc = cfg.text
        pool = (pages, tc.n_layers, tc.n_kv_heads, page_size, tc.head_dim)
        cache = PagedKVCache(
            k=jnp.zeros(pool, cfg.dtype),
            v=jnp.zeros(pool, cfg.dtype),
            page_table=jnp.zeros((rows, table_width), jnp.int32),
            lengths=jnp.zeros((rows,), jnp.int32),
        )
        return jax.tree.map(
            lambda x, axes: constrain(x, axes, cfg.rules),
            cache,
            PagedKVCache.logical_axes(),
            is_leaf=lambda x: isinstance(x, tuple),
        )


def _write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes new[b] into buffer[b] at slot starts[b] along axis 1 (per-row offsets)."""
    return jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=0))(buffer, new, starts)


def _write_cache(cache: jax.Array, layer: jax.Array, new: Float[Array, "B T G K"], starts: jax.Array) -> jax.Array:
    """Writes row b's new keys (or values) into `cache` [B, L, G, S, K] at `layer`, slots
    starts[b] on; in place in a loop carry: the rest of the cache is neither read nor copied."""

    def one(buf, x, s):  # buf [L, G, S, K], x [T, G, K]
        return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(x, 0, 1)[None].astype(buf.dtype), (layer, 0, s, 0))

    return jax.vmap(one)(cache, new, starts)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def embed(params: P.ParamTree, tokens: Int[Array, "B T"], cfg: ModelConfig) -> Float[Array, "B T D"]:
    """Token embeddings in the compute dtype."""
    with jax.named_scope("embed"):
        # Gathering rows from a table sharded over its model dim would leave activations sharded
        # over `embed`; gathering the table over that dim first makes the lookup local per vocab
        # shard (one all-reduce over `vocab`) and the batch constraint a plain slice.
        table = constrain(params["embed"].astype(cfg.dtype), ("vocab", None), cfg.rules)
        x = jnp.take(table, tokens, axis=0)
        return constrain(x, ("batch", "act_seq", "act_embed"), cfg.rules)


def unembed(params: P.ParamTree, x: Float[Array, "B T D"], cfg: ModelConfig) -> Float[Array, "B T V"]:
    """Final norm and output head; float32 logits."""
    with jax.named_scope("unembed"):
        h = rms_norm(x, params["norm"], cfg.text.norm_eps)
        logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(cfg.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "act_seq", "act_vocab"), cfg.rules)


def decode_layers(
    params: P.ParamTree,
    x: Float[Array, "B T D"],
    cfg: ModelConfig,
    *,
    positions: Int[Array, "B T"],
    segment_ids: Int[Array, "B T"],
    cache: KVCache | PagedKVCache | None = None,
) -> tuple[Float[Array, "B T D"], KVCache | PagedKVCache | None]:
    """Runs the stacked decoder layers over embeddings `x` (the vision merge feeds this too)."""
    tc = cfg.text
    angles = text_rope_angles(positions, tc.head_dim, tc.rope_theta)
    attend_kw = dict(causal=True, impl=cfg.attention, block=cfg.attention_block, rules=cfg.rules)

    if cache is None:

        def layer(x, scanned):
            lp, (pos, seg) = scanned
            lp = jax.tree.map(lambda w: w.astype(cfg.dtype), lp)

            def attend(q, k, v):
                where = dict(q_positions=pos, q_segments=seg, kv_positions=pos, kv_segments=seg)
                return attention(q, k, v, **where, **attend_kw), None, None

            x, _ = attention_block(x, lp, angles, attend, tc.norm_eps, cfg.rules)
            return swiglu_block(x, lp, tc.norm_eps, cfg.rules), None

        # Positions and segment ids enter the scan as per-layer inputs, not as closed-over loop
        # invariants: when the scan is differentiated, JAX hoists work on loop invariants out of
        # the loop, which would precompute the chunked attention's masks for every (query block,
        # key block) pair at once, memory quadratic in the sequence (seen with `magistral-jax plan`).
        per_layer = tuple(jnp.broadcast_to(a, (tc.n_layers, *a.shape)) for a in (positions, segment_ids))
        with jax.named_scope("layers"):
            x, _ = jax.lax.scan(remat(layer, cfg.remat), x, (params["layers"], per_layer))
        return x, None

    if isinstance(cache, PagedKVCache):
        return _paged_layers(params, x, cfg, angles, positions, segment_ids != 0, cache)
    valid = segment_ids != 0
    kv_positions = _write_rows(cache.positions, jnp.where(valid, positions, -1), cache.lengths)
    new_lengths = cache.lengths + jnp.sum(valid, axis=1, dtype=jnp.int32)
    where = dict(
        q_positions=positions,
        q_segments=valid.astype(jnp.int32),
        kv_positions=kv_positions,
        kv_segments=(kv_positions >= 0).astype(jnp.int32),
    )
    axes = KVCache.logical_axes().k

    def cached_layer(carry, scanned):
        # The whole cache rides in the loop carry and each layer writes its new keys and values
        # into it in place. (Scanning over per-layer cache slices as inputs and outputs instead
        # copies the entire cache, every layer and slot, on every decode step.)
        x, cache_k, cache_v = carry
        lp, i = scanned
        lp = jax.tree.map(lambda w: w.astype(cfg.dtype), lp)

        def attend(q, k, v):
            write = lambda c, new: constrain(_write_cache(c, i, new, cache.lengths), axes, cfg.rules)  # noqa: E731
            k_all, v_all = write(cache_k, k), write(cache_v, v)
            if cfg.attention == "xla":
                k_i, v_i = (jnp.swapaxes(jax.lax.dynamic_index_in_dim(c, i, 1, False), 1, 2) for c in (k_all, v_all))
                out = attention(q, k_i, v_i, **where, **attend_kw)
            else:
                out = cached_attention(
                    q, k_all, v_all, i, **where, filled=jnp.max(new_lengths), block=cfg.attention_block
                )
            return out, k_all, v_all

        x, (cache_k, cache_v) = attention_block(x, lp, angles, attend, tc.norm_eps, cfg.rules)
        return (swiglu_block(x, lp, tc.norm_eps, cfg.rules), cache_k, cache_v), None

    layer_ids = jnp.arange(tc.n_layers, dtype=jnp.int32)
    with jax.named_scope("layers"):
        (x, new_k, new_v), _ = jax.lax.scan(cached_layer, (x, cache.k, cache.v), (params["layers"], layer_ids))
    return x, KVCache(k=new_k, v=new_v, positions=kv_positions, lengths=new_lengths)


def _paged_layers(params, x, cfg: ModelConfig, angles, positions, valid, cache: PagedKVCache):
    """`decode_layers` over a `PagedKVCache`: each row's valid tokens (first in the row) are
    written at its slots `lengths[b]` on, through its page table, then attend to the row's pages."""
    tc = cfg.text
    t = valid.shape[1]
    n_pages, size = cache.k.shape[0], cache.page_size
    slots = cache.lengths[:, None] + jnp.arange(t)
    pages = jnp.take_along_axis(cache.page_table, jnp.minimum(slots // size, cache.page_table.shape[1] - 1), axis=1)
    pages = jnp.where(valid, pages, n_pages)  # out of range: padding writes nothing
    offsets = slots % size
    new_lengths = cache.lengths + jnp.sum(valid, axis=1, dtype=jnp.int32)
    per_block = max(1, cache.block // size)
    axes = PagedKVCache.logical_axes().k

    def paged_layer(carry, scanned):
        x, pool_k, pool_v = carry  # the pools ride in the carry, written in place (see `cached_layer`)
        lp, i = scanned
        lp = jax.tree.map(lambda w: w.astype(cfg.dtype), lp)

        def attend(q, k, v):
            write = lambda pool, new: constrain(  # noqa: E731
                pool.at[pages, i, :, offsets].set(new.astype(pool.dtype), mode="drop"), axes, cfg.rules
            )
            k_all, v_all = write(pool_k, k), write(pool_v, v)
            out = paged_attention(
                q,
                k_all,
                v_all,
                i,
                cache.page_table,
                new_lengths,
                q_positions=positions,
                pages_per_block=per_block,
                impl=cfg.attention,
                rules=cfg.rules,
            )
            return out, k_all, v_all

        x, (pool_k, pool_v) = attention_block(x, lp, angles, attend, tc.norm_eps, cfg.rules)
        return (swiglu_block(x, lp, tc.norm_eps, cfg.rules), pool_k, pool_v), None

    layer_ids = jnp.arange(tc.n_layers, dtype=jnp.int32)
    with jax.named_scope("layers"):
        (x, new_k, new_v), _ = jax.lax.scan(paged_layer, (x, cache.k, cache.v), (params["layers"], layer_ids))
    return x, dataclasses.replace(cache, k=new_k, v=new_v, lengths=new_lengths)


def forward(
    params: P.ParamTree,
    tokens: Int[Array, "B T"],
    cfg: ModelConfig,
    *,
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    cache: KVCache | PagedKVCache | None = None,
    embeddings: Float[Array, "B T D"] | None = None,
) -> tuple[Float[Array, "B T V"], KVCache | PagedKVCache | None]:
    """Logits (float32) of every token, and the updated cache when one is given.

    Args:
      tokens: token ids.
      positions: RoPE positions; by default each segment counts from 0, continuing from the row's
        cached length when a cache is given.
      segment_ids: 0 for padding, equal ids for tokens of one document; default all ones.
      cache: a `KVCache` or `PagedKVCache` to read and extend (prefill and decode), or None.
      embeddings: input embeddings to use instead of the tokens' (images merged in, see
        `vision.embed_with_images`).
    """
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
        if cache is not None:
            positions = positions + cache.lengths[:, None]
    x = embed(params, tokens, cfg) if embeddings is None else embeddings
    x, cache = decode_layers(params, x, cfg, positions=positions, segment_ids=segment_ids, cache=cache)
    return unembed(params, x, cfg), cache


def token_logprobs(
    params: P.ParamTree,
    tokens: Int[Array, "B T"],
    targets: Int[Array, "B T"],
    cfg: ModelConfig,
    *,
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    temperature: float = 1.0,
    chunk: int = 256,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Log-probability of `targets[b, t]` after `tokens[b, :t+1]`, and the entropy of that
    next-token distribution, at `temperature`, both float32.

    The head runs over chunks of `chunk` positions, each under `jax.checkpoint`, so the float32
    [tokens, vocab] logits never exist at once, forward or backward (one 32k-token sequence of
    the 24B model would need 17 GB).
    """
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    x = embed(params, tokens, cfg)
    x, _ = decode_layers(params, x, cfg, positions=positions, segment_ids=segment_ids)
    h = rms_norm(x, params["norm"], cfg.text.norm_eps)
    b, t, d = h.shape
    c = min(chunk, t)
    pad = -t % c
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    head = params["lm_head"].astype(cfg.dtype)

    @jax.checkpoint
    def one(hc, tc):
        logits = jnp.einsum("btd,dv->btv", hc, head, preferred_element_type=jnp.float32) / temperature
        logits = constrain(logits, ("batch", "act_seq", "act_vocab"), cfg.rules)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        entropy = logz - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return picked - logz, entropy

    n = (t + pad) // c
    chunks = (jnp.moveaxis(h.reshape(b, n, c, d), 1, 0), jnp.moveaxis(targets.reshape(b, n, c), 1, 0))
    logp, entropy = jax.lax.map(lambda a: one(*a), chunks)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * c)[:, :t]  # noqa: E731
    return unchunk(logp), unchunk(entropy)
