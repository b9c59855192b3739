"""The accelerator benchmark: decode throughput against the memory roofline, and train-step MFU.

Prepared for one NVIDIA H200 (141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense bf16), under 8 minutes:

    python tools/gpu_bench.py [--out bench.json]            # on the accelerator host
    python tools/gpu_bench.py --small                       # the same code on a CPU, tiny shapes

1. Decode: the Magistral Small 2509 text decoder (23.6B parameters, random bf16 weights, made on
   the device) samples 128 greedy tokens after 512-token prompts at batch 1 and batch 64. Reported:
   tokens/s, the decode step's time, the bytes a step must read (every weight once, plus the
   filled KV cache) and their rate as a fraction of the chip's published HBM bandwidth and of a
   measured device copy.
2. Train: one SFT step (bf16 compute, fp32 master weights, AdamW, full remat) of a ~3B config
   (dim 3072, 28 layers, 24/8 heads of 128, FFN 8192, vocabulary 131072) on 8 x 4096 tokens.
   Reported: tokens/s and MFU = 6 N tokens / step time / the chip's peak dense bf16 FLOP/s.

Prints one JSON object (and writes it with --out). Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import magistral_jax as mj
from magistral_jax.sampling import GREEDY, Sampler
from magistral_jax.train.packing import Item, pack
from magistral_jax.train.step import Objective, OptimizerConfig, Trainer

# NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense BF16 (1,979 with sparsity).
H200 = {"hbm_bytes_per_s": 4.8e12, "bf16_flops_per_s": 989e12}


def _timed(fn, repeats: int = 3) -> float:
    jax.block_until_ready(fn())  # compilation and warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth, (bytes read + written) / time."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / _timed(lambda: copy(x), repeats=5)


def decode(cfg, batches: list[int], prompt_len: int, new: int) -> list[dict]:
    model = mj.init_model(cfg, 0)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    sampler = Sampler(model, stop_ids=())
    rows = []
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(3, cfg.text.vocab_size, (batch, prompt_len)).tolist()
        total = _timed(lambda p=prompts: sampler.sample(p, max_new_tokens=new, sampling=GREEDY).tokens)
        prefill = _timed(lambda p=prompts: sampler._start(p, 1, new, 0))
        step = (total - prefill) / new
        t = cfg.text
        # the KV cache a step reads: every layer's keys and values of the filled slots (half-way)
        kv_bytes = 2 * t.n_layers * batch * (prompt_len + new / 2) * t.n_kv_heads * t.head_dim * 2
        step_bytes = weight_bytes + kv_bytes
        rows.append(
            {
                "batch": batch,
                "params": n_params,
                "prompt_tokens": prompt_len,
                "new_tokens": new,
                "tokens_per_s": batch * new / total,
                "decode_tokens_per_s": batch / step,
                "prefill_s": prefill,
                "decode_step_ms": 1000 * step,
                "bytes_per_step": step_bytes,
                "achieved_bytes_per_s": step_bytes / step,
            }
        )
    return rows


def train(cfg, batch: int, seq: int) -> dict:
    model = mj.init_model(cfg.replace(param_dtype="float32"), 0)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    tokens = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (batch, seq))
    trained = batch * (seq - 1)
    items = [Item(tokens=row.tolist(), loss_start=1, weight=1.0 / trained) for row in tokens]
    microbatches = pack(items, row_len=seq - 1, rows=batch).microbatches
    trainer = Trainer(model, OptimizerConfig(lr=1e-5, grad_clip=1.0), Objective(kind="sft"), total_steps=100)
    step = _timed(lambda: (trainer.train_step(microbatches), model.params)[1], repeats=3)
    flops = 6 * n_params * batch * seq
    return {
        "params": n_params,
        "tokens_per_step": batch * seq,
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "model_flops_per_s": flops / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--small", action="store_true", help="tiny shapes (to check the script on a CPU)")
    args = parser.parse_args()
    device = jax.devices()[0]
    if args.small:
        decode_cfg = mj.get_preset("tiny").replace(dtype="bfloat16", param_dtype="bfloat16")
        train_cfg = mj.get_preset("tiny").replace(dtype="bfloat16", remat="full")
        batches, prompt_len, new, train_shape = [1, 4], 16, 8, (2, 64)
    else:
        decode_cfg = mj.get_preset("magistral-small-2509").replace(
            vision=None, dtype="bfloat16", param_dtype="bfloat16", attention="auto"
        )
        train_cfg = mj.get_preset("magistral-small-2509").replace(
            **{
                "vision": None,
                "dtype": "bfloat16",
                "remat": "full",
                "text.dim": 3072,
                "text.n_layers": 28,
                "text.n_heads": 24,
                "text.n_kv_heads": 8,
                "text.head_dim": 128,
                "text.hidden_dim": 8192,
            }
        )
        batches, prompt_len, new, train_shape = [1, 64], 512, 128, (8, 4096)
    start = time.perf_counter()
    copy = _copy_bandwidth(2**30 if not args.small else 2**24)
    results = {
        "device": str(device.device_kind),
        "backend": jax.default_backend(),
        "date": time.strftime("%Y-%m-%d"),
        "copy_bytes_per_s": copy,
        "decode": decode(decode_cfg, batches, prompt_len, new),
        "train": train(train_cfg, *train_shape),
    }
    peak = H200 if "H200" in results["device"] else None
    for row in results["decode"]:
        row["fraction_of_measured_copy"] = row["achieved_bytes_per_s"] / copy
        if peak:
            row["fraction_of_hbm_roofline"] = row["achieved_bytes_per_s"] / peak["hbm_bytes_per_s"]
    if peak:
        results["train"]["mfu"] = results["train"]["model_flops_per_s"] / peak["bf16_flops_per_s"]
    results["seconds"] = time.perf_counter() - start
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
