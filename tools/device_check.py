"""Accelerator check: attention implementations and the decoder on whatever backend JAX finds.

Run on a GPU or TPU host (it also runs on the CPU, where `cudnn` falls back to XLA):

    python tools/device_check.py [--seq 4096] [--layers 4] [--repeats 5] [--json OUT.json]

It prints, for bf16 inputs with GQA, packing and padding, the max difference of every attention
implementation's output and gradients against the fp32 `xla` implementation, then times a
forward and a forward+backward of a few-layer, 24B-width decoder slice (bf16) for each implementation.
Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import magistral_jax as mj
from magistral_jax.model import decoder
from magistral_jax.model.attention import attention

IMPLS = ("xla", "cudnn", "chunked")


def _attention_case(seq: int):
    rng = np.random.default_rng(0)
    b, n, g, k = 2, 32, 8, 128
    q = jnp.asarray(rng.normal(size=(b, seq, n, k)), jnp.float32)
    kv = [jnp.asarray(rng.normal(size=(b, seq, g, k)), jnp.float32) for _ in range(2)]
    seg = np.ones((b, seq), np.int32)
    seg[0, seq // 2 :] = 2
    seg[1, seq - seq // 8 :] = 0
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(b, 0)
    pos[1] = np.arange(seq)
    return q, kv[0], kv[1], jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def check_attention(seq: int) -> dict:
    q, k, v, pos, seg = _attention_case(seq)
    kw = dict(q_positions=pos, q_segments=seg, kv_positions=pos, kv_segments=seg)

    def run(impl, dtype):
        def loss(q, k, v):
            out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), impl=impl, **kw)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out.astype(jnp.float32), grads

    ref_out, ref_grads = run("xla", jnp.float32)
    results = {}
    for impl in IMPLS:
        out, grads = run(impl, jnp.bfloat16)
        results[impl] = {
            "out_max_diff": float(jnp.max(jnp.abs(out - ref_out))),
            "grad_max_rel_diff": max(
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(grads, ref_grads, strict=True)
            ),
        }
    return results


def _timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def time_decoder(seq: int, layers: int, repeats: int) -> dict:
    base = mj.get_preset("magistral-small-2509").replace(
        **{"text.n_layers": layers, "text.vocab_size": 8192}, vision=None
    )
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 8192, (1, seq)), jnp.int32)
    results = {}
    for impl in IMPLS:
        cfg = base.replace(attention=impl)
        params = mj.init_model(cfg, 0).params
        fwd = jax.jit(lambda p, t, cfg=cfg: decoder.forward(p, t, cfg)[0])
        grad = jax.jit(jax.grad(lambda p, t, cfg=cfg: jnp.mean(decoder.forward(p, t, cfg)[0])))
        try:
            results[impl] = {
                "forward_s": _timed(fwd, params, tokens, repeats=repeats),
                "forward_backward_s": _timed(grad, params, tokens, repeats=repeats),
            }
        except Exception as e:  # report an implementation the backend cannot run, keep going
            results[impl] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to time (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    report = {
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "seq": args.seq,
        "attention_bf16_vs_fp32_xla": check_attention(min(args.seq, 2048)),
        "decoder_layers": args.layers,
        "decoder_24b_width": time_decoder(args.seq, args.layers, args.repeats),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
