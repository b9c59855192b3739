"""The pre-norm transformer block shared by the decoder and the vision encoder, and remat.

Dimension letters: B batch, T tokens, D model dim, N query heads, G kv heads, K head dim, F FFN.

Both towers use the same block: `x + attention(rms_norm(x))`, then `x + swiglu(rms_norm(x))`,
with RoPE on q and k ("rotate_half" layout) and no biases. Every projection output carries a
`checkpoint_name` tag, which the named remat policies select from.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from magistral_jax.model.layers import apply_rope, rms_norm
from magistral_jax.sharding import Rules, constrain

QKV_NAMES = ("query_proj", "key_proj", "value_proj")
MATMUL_NAMES = (*QKV_NAMES, "attention_out", "mlp_gate", "mlp_up", "mlp_down")

# (q, k, v) -> (attention output, keys, values): the caller decides what keys are attended
# (a cache, a block-diagonal mask, ...) and what to keep of them.
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def remat(fn, policy: str):
    """`fn` under the named rematerialisation policy (`none`, `full`, `save_matmuls`, `save_qkv`)."""
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "save_matmuls": jax.checkpoint_policies.save_only_these_names(*MATMUL_NAMES),
        "save_qkv": jax.checkpoint_policies.save_only_these_names(*QKV_NAMES),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def attention_block(x, lp, angles, attend: Attend, eps: float, rules: Rules):
    """`x + wo(attend(rope(wq h), rope(wk h), wv h))` with `h = rms_norm(x)`; returns the new
    residual stream and what `attend` returned as keys and values."""
    with jax.named_scope("attention"):
        h = rms_norm(x, lp["attention_norm"], eps)
        q = checkpoint_name(jnp.einsum("btd,dnk->btnk", h, lp["wq"]), "query_proj")
        k = checkpoint_name(jnp.einsum("btd,dgk->btgk", h, lp["wk"]), "key_proj")
        v = checkpoint_name(jnp.einsum("btd,dgk->btgk", h, lp["wv"]), "value_proj")
        q = constrain(apply_rope(q, angles), ("batch", "act_seq", "act_heads", None), rules)
        k = constrain(apply_rope(k, angles), ("batch", "act_seq", "act_kv_heads", None), rules)
        v = constrain(v, ("batch", "act_seq", "act_kv_heads", None), rules)
        out, k_all, v_all = attend(q, k, v)
        out = checkpoint_name(jnp.einsum("btnk,nkd->btd", out, lp["wo"]), "attention_out")
        return x + constrain(out, ("batch", "act_seq", "act_embed"), rules), (k_all, v_all)


def swiglu_block(x, lp, eps: float, rules: Rules):
    """`x + w2(silu(w1 h) * w3 h)` with `h = rms_norm(x)`."""
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["ffn_norm"], eps)
        gate = checkpoint_name(jnp.einsum("btd,df->btf", h, lp["w1"]), "mlp_gate")
        up = checkpoint_name(jnp.einsum("btd,df->btf", h, lp["w3"]), "mlp_up")
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "act_seq", "act_mlp"), rules)
        out = checkpoint_name(jnp.einsum("btf,fd->btd", hidden, lp["w2"]), "mlp_down")
        return x + constrain(out, ("batch", "act_seq", "act_embed"), rules)
