"""`magistral-jax bench`: the measurements behind BENCHMARKS.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (see BENCHMARKS.md)", description=__doc__)
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    c = benches.add_parser(
        "convert",
        help="checkpoint conversion throughput and peak memory",
        description=(
            "Generates a bf16 Hugging Face checkpoint with the Magistral Small 2509 text geometry "
            "(dim 5120, vocab 131072, FFN 32768) and --layers layers, converts it HF -> Orbax and "
            "HF -> Mistral, and the Orbax result back to HF, each in a fresh process, and reports "
            "throughput and peak resident memory. Conversions of the generated checkpoint must stay "
            "below 1.5 x the largest tensor + 500 MB, and the HF -> Orbax -> HF round trip must "
            "reproduce the generated files byte for byte; the exit code says whether both held."
        ),
    )
    c.add_argument("--layers", type=int, default=1, help="decoder layers (default 1: a 3.8 GB checkpoint)")
    c.add_argument("--dir", help="work directory (default: a temporary directory, removed afterwards)")
    c.add_argument("--json", action="store_true", help="print the results as one JSON object")
    c.set_defaults(run=run_convert)
    s = benches.add_parser(
        "sample",
        help="sampler throughput against transformers generate and the memory-bandwidth roofline",
        description=(
            "Builds one random ~215M-parameter fp32 model (dim 1024, 12 layers, 8 query / 2 kv heads of 128, "
            "FFN 4096, vocab 16384), saves it, and generates 128 greedy tokens for a batch of 4 prompts of 128 "
            "tokens with this project's sampler and with transformers' generate (needs the test extra: torch and "
            "transformers). Reports tokens/s of both and their ratio (compilation and warm-up excluded), checks "
            "that both produced the same tokens, and compares the decode's memory traffic (weights + KV cache "
            "read per step) with this machine's measured copy bandwidth."
        ),
    )
    s.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3, best kept)")
    s.add_argument("--json", action="store_true", help="print the results as one JSON object")
    s.set_defaults(run=run_sample)
    t = benches.add_parser(
        "train",
        help="train-step throughput against transformers + torch AdamW and the matmul roofline",
        description=(
            "One optimizer step (cross-entropy on every token, AdamW, gradient clipping) of the same "
            "random ~215M-parameter fp32 model as `bench sample`, on a batch of 4 x 512 tokens, with this "
            "project's trainer and with transformers + torch.optim.AdamW (needs the test extra). Reports "
            "tokens/s of both and their ratio (compilation and warm-up excluded), the achieved model "
            "FLOP/s (6 x parameters x tokens per step) against this machine's measured fp32 matmul throughput, and "
            "our first step's time with the part of it spent compiling (the trainer's `time_compile`)."
        ),
    )
    t.add_argument("--repeats", type=int, default=3, help="timed steps of each (default 3, best kept)")
    t.add_argument("--json", action="store_true", help="print the results as one JSON object")
    r = benches.add_parser(
        "rl",
        help="asynchronous against synchronous GRPO, paged against contiguous KV cache",
        description=(
            "Runs configs/grpo-tiny-async.yaml (prompt budgets of 8 to 40 new tokens: a 5x spread of completion "
            "lengths) on 8 simulated CPU devices, once synchronously (sampling and training in turn on all 8), "
            "once asynchronously (4 generate with continuous batching, 4 train, weights pushed after every "
            "step) and once asynchronously with the paged KV cache (a pool of 16-token pages holding what the "
            "contiguous cache holds, decoding as many sequences as the queue bound lets out), and reports the "
            "completions trained per second after the warm-up steps, their ratio, the generator's tokens per "
            "second of both caches (over the wall time, and over the time it spent generating) and their ratios, "
            "the policy lag and each mode's reward curve; --rounds alternates the three modes and reports medians."
        ),
    )
    r.add_argument("--steps", type=int, default=14, help="GRPO steps per mode (default 14)")
    r.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing (default 4)")
    r.add_argument(
        "--rounds", type=int, default=3, help="rounds of the three modes, alternating (default 3; medians reported)"
    )
    r.add_argument("--json", action="store_true", help="print the results as one JSON object")
    t.set_defaults(run=run_train)
    r.set_defaults(run=run_rl)
    sc = benches.add_parser(
        "score",
        help="code-reward throughput: sandboxed Python and C++ tests per second",
        description=(
            "Scores correct a + b programs with the Magistral code reward (rl.magistral_rewards.code_correct: "
            "each completion in a fresh sandbox, every test a separate run under the paper's limits), one after "
            "the other in this process: --completions Python programs and --completions C++ programs (each "
            "compiled as C++20 first), --tests tests each. Reports tests per second (the C++ figure counts the "
            "compilation) and the mean time of a C++ completion with one test (mostly its compile); best of "
            "--repeats rounds."
        ),
    )
    sc.add_argument("--completions", type=int, default=4, help="completions per language (default 4)")
    sc.add_argument("--tests", type=int, default=20, help="tests per completion (default 20, the paper's cap)")
    sc.add_argument("--repeats", type=int, default=3, help="rounds (default 3, best kept)")
    sc.add_argument("--json", action="store_true", help="print the results as one JSON object")
    sc.set_defaults(run=run_score)


def _generate(cfg, directory: str) -> None:
    """Random bf16 weights (finite, any bit pattern but the top exponent) written piece by piece."""
    import ml_dtypes
    import numpy as np

    from magistral_jax.checkpoint.configs import to_hf_config
    from magistral_jax.checkpoint.convert import output_layout, row_pieces
    from magistral_jax.checkpoint.layouts import plan
    from magistral_jax.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, split_files

    os.makedirs(directory)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = plan(cfg, output_layout(cfg, "hf"))
    files = split_files([TensorInfo(e.name, bf16, e.torch_shape) for e in entries], 5 * 10**9, "model")
    writer = SafetensorsWriter(directory, files, "model.safetensors.index.json")
    for e in entries:
        cols = math.prod(e.torch_shape[1:])
        for start, stop in row_pieces(e, 2):
            bits = rng.integers(0, 2**16, size=(stop - start) * cols, dtype=np.uint16) & 0xBFFF
            writer.write(e.name, bits.view(bf16).reshape((stop - start, *e.torch_shape[1:])))
    writer.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f)


def _convert_child(src: str, dst: str, to: str) -> tuple[float, int]:
    """Runs `magistral-jax convert` in a fresh process; returns seconds and peak RSS in bytes."""
    cmd = [sys.executable, "-m", "magistral_jax", "convert", src, dst, "--to", to, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"convert --to {to} failed:\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def _digest(directory: str) -> dict[str, str]:
    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            h = hashlib.sha256()
            with open(os.path.join(directory, fname), "rb") as f:
                while chunk := f.read(2**24):
                    h.update(chunk)
            out[fname] = h.hexdigest()
    return out


def run_convert(args: argparse.Namespace) -> int:
    from magistral_jax.checkpoint.layouts import LAYOUTS, plan
    from magistral_jax.config import get_preset

    if args.layers < 1:
        raise ValueError("--layers must be at least 1")
    cfg = get_preset("magistral-small-2509").replace(vision=None, **{"text.n_layers": args.layers})
    entries = plan(cfg, LAYOUTS["hf-text"])
    total = sum(math.prod(e.torch_shape) for e in entries) * 2
    largest = max(math.prod(e.torch_shape) for e in entries) * 2
    bound = 1.5 * largest + 500 * 10**6
    work = args.dir or tempfile.mkdtemp(prefix="magistral-bench-")
    os.makedirs(work, exist_ok=True)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "checkpoint_bytes": total,
        "largest_tensor_bytes": largest,
        "rss_bound_bytes": int(bound),
        "conversions": {},
    }
    try:
        src = os.path.join(work, "hf")
        start = time.perf_counter()
        _generate(cfg, src)
        results["generate_s"] = time.perf_counter() - start
        for name, (a, b, to) in {
            "hf->orbax": ("hf", "orbax", "orbax"),
            "hf->mistral": ("hf", "mistral", "mistral"),
            "orbax->hf": ("orbax", "hf-back", "hf"),
        }.items():
            seconds, rss = _convert_child(os.path.join(work, a), os.path.join(work, b), to)
            results["conversions"][name] = {
                "seconds": round(seconds, 2),
                "mb_per_s": round(total / seconds / 1e6, 1),
                "peak_rss_bytes": rss,
                # The bound is about reading the published checkpoint; the way back is reported only.
                "within_bound": rss <= bound if a == "hf" else None,
            }
        results["round_trip_bit_exact"] = _digest(src) == _digest(os.path.join(work, "hf-back"))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"machine: {results['machine']}")
        print(
            f"checkpoint: {total / 1e9:.2f} GB ({args.layers} layer(s), 2509 text geometry, bf16), "
            f"largest tensor {largest / 1e9:.2f} GB, RSS bound {bound / 1e9:.2f} GB"
        )
        print(f"{'conversion':<12} {'seconds':>8} {'MB/s':>8} {'peak RSS GB':>12}  within bound")
        for name, r in results["conversions"].items():
            verdict = {True: "yes", False: "NO", None: "(not bounded)"}[r["within_bound"]]
            rss = r["peak_rss_bytes"] / 1e9
            print(f"{name:<12} {r['seconds']:>8.1f} {r['mb_per_s']:>8.1f} {rss:>12.2f}  {verdict}")
        print(f"HF -> Orbax -> HF byte-exact: {'yes' if results['round_trip_bit_exact'] else 'NO'}")
    ok = results["round_trip_bit_exact"] and all(
        r["within_bound"] is not False for r in results["conversions"].values()
    )
    return 0 if ok else 1


def _copy_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth in bytes/s: (bytes read + bytes written) / time, best of runs."""
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _reference_pair():
    """The same random ~215M-parameter fp32 model in transformers and in magistral-jax."""
    try:
        import torch
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        raise ValueError("this benchmark needs torch and transformers: pip install -e '.[test]'") from None
    from magistral_jax import load_model

    hf_cfg = MistralConfig(
        vocab_size=16384,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e9,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    ref = MistralForCausalLM(hf_cfg)
    work = tempfile.mkdtemp(prefix="magistral-bench-")
    try:
        ref.save_pretrained(work)
        model = load_model(work, dtype="float32")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return hf_cfg, ref, model


def _best_time(fn, repeats: int):
    result = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def run_sample(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import torch

    from magistral_jax.sampling import GREEDY, Sampler

    batch, prompt_len, new = 4, 128, 128
    hf_cfg, ref, model = _reference_pair()
    ref.eval()
    n_params = sum(p.numel() for p in ref.parameters())
    prompts = np.random.default_rng(0).integers(3, hf_cfg.vocab_size, (batch, prompt_len))
    sampler = Sampler(model, stop_ids=())

    def ours():
        return sampler.sample(prompts.tolist(), max_new_tokens=new, sampling=GREEDY).tokens

    def decode_only():
        state = sampler._start(prompts.tolist(), 1, new, 0)
        jax.block_until_ready(state)
        start = time.perf_counter()
        jax.block_until_ready(sampler._decode(state, new, GREEDY))
        return time.perf_counter() - start

    def theirs():
        with torch.no_grad():
            out = ref.generate(
                torch.tensor(prompts), do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
            )
        return out[:, prompt_len:].numpy()

    def our_prefill():
        return jax.block_until_ready(sampler._start(prompts.tolist(), 1, new, 0))

    def their_prefill():
        with torch.no_grad():
            return ref(torch.tensor(prompts), use_cache=True).logits

    ours_s, ours_tokens = _best_time(ours, args.repeats)
    theirs_s, their_tokens = _best_time(theirs, args.repeats)
    decode_s = min(decode_only() for _ in range(args.repeats))
    ours_prefill_s, _ = _best_time(our_prefill, args.repeats)
    theirs_prefill_s, _ = _best_time(their_prefill, args.repeats)
    theirs_decode_s = theirs_s - theirs_prefill_s
    # Per decode step: every weight once, plus the cached keys and values (on average half full).
    kv_bytes = 2 * hf_cfg.num_hidden_layers * batch * (prompt_len + new / 2) * hf_cfg.num_key_value_heads * 128 * 4
    step_bytes = n_params * 4 + kv_bytes
    bandwidth = _copy_bandwidth()
    achieved = step_bytes / (decode_s / new)
    results = {
        "machine": _machine(),
        "params": n_params,
        "batch": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "magistral_jax_tokens_per_s": round(batch * new / ours_s, 1),
        "transformers_tokens_per_s": round(batch * new / theirs_s, 1),
        "ratio": round(theirs_s / ours_s, 2),
        "same_tokens": bool((ours_tokens == their_tokens).all()),
        "prefill_ms": round(1000 * ours_prefill_s, 1),
        "transformers_prefill_ms": round(1000 * theirs_prefill_s, 1),
        "prefill_ratio": round(theirs_prefill_s / ours_prefill_s, 2),
        "decode_ratio": round(theirs_decode_s / decode_s, 2),
        "decode_step_ms": round(1000 * decode_s / new, 2),
        "bytes_per_step": int(step_bytes),
        "achieved_bytes_per_s": achieved,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_fraction": round(achieved / bandwidth, 3),
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"machine: {results['machine']}; model {n_params / 1e6:.0f}M params fp32, batch {batch}, "
            f"{prompt_len}-token prompts, {new} new tokens (greedy)"
        )
        print(
            f"magistral-jax: {results['magistral_jax_tokens_per_s']} tokens/s; transformers: "
            f"{results['transformers_tokens_per_s']} tokens/s; ratio {results['ratio']}x; "
            f"same tokens: {'yes' if results['same_tokens'] else 'NO'}"
        )
        print(
            f"prefill ({batch} x {prompt_len} tokens): {results['prefill_ms']} ms, transformers "
            f"{results['transformers_prefill_ms']} ms, ratio {results['prefill_ratio']}x; decode ({new} steps): "
            f"ratio {results['decode_ratio']}x (transformers' decode = generate minus its prefill)"
        )
        print(
            f"decode step {results['decode_step_ms']} ms reading {step_bytes / 1e9:.3f} GB = "
            f"{achieved / 1e9:.1f} GB/s against a measured copy bandwidth of {bandwidth / 1e9:.1f} GB/s "
            f"({100 * results['roofline_fraction']:.0f}% of the roofline)"
        )
    return 0


def _matmul_flops(repeats: int = 5) -> float:
    """Measured fp32 matmul throughput (FLOP/s) of XLA on this machine, [2048, 1024] x [1024, 4096]."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((2048, 1024), jnp.float32), jnp.ones((1024, 4096), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 1024 * 4096 / best


def run_train(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import torch

    from magistral_jax.train.packing import Item, pack
    from magistral_jax.train.step import Objective, OptimizerConfig, Trainer

    batch, seq = 4, 512
    hf_cfg, ref, model = _reference_pair()
    model.cfg = model.cfg.replace(remat="none")  # as transformers: activations kept, nothing recomputed
    n_params = sum(p.numel() for p in ref.parameters())
    tokens = np.random.default_rng(0).integers(3, hf_cfg.vocab_size, (batch, seq))
    trained = batch * (seq - 1)
    items = [Item(tokens=row.tolist(), loss_start=1, weight=1.0 / trained) for row in tokens]
    microbatches = pack(items, row_len=seq - 1, rows=batch).microbatches
    opt = OptimizerConfig(lr=1e-5, weight_decay=0.1, grad_clip=1.0, b2=0.95)
    trainer = Trainer(model, opt, Objective(kind="sft"), total_steps=100, chunk=512)

    def ours():
        metrics = trainer.train_step(microbatches)
        jax.block_until_ready(model.params)
        return metrics

    # The first step compiles the step's programs; the timed ones compile nothing.
    start = time.perf_counter()
    first = ours()
    first_s = time.perf_counter() - start

    ref.train()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    inputs = torch.tensor(tokens)

    def theirs():
        loss = ref(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return float(loss)

    ours_s, last = _best_time(ours, args.repeats)
    theirs_s, _ = _best_time(theirs, args.repeats)
    flops = 6 * n_params * batch * seq
    peak = _matmul_flops()
    results = {
        "machine": _machine(),
        "params": n_params,
        "tokens_per_step": batch * seq,
        "magistral_jax_tokens_per_s": round(batch * seq / ours_s, 1),
        "transformers_tokens_per_s": round(batch * seq / theirs_s, 1),
        "ratio": round(theirs_s / ours_s, 2),
        "step_s": round(ours_s, 3),
        "first_step_s": round(first_s, 3),
        "compile_s": round(first["time_compile"], 3),
        "compile_s_after_first_step": round(last["time_compile"], 3),
        "achieved_flops_per_s": flops / ours_s,
        "matmul_flops_per_s": peak,
        "matmul_fraction": round(flops / ours_s / peak, 3),
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"machine: {results['machine']}; model {n_params / 1e6:.0f}M params fp32, {batch} x {seq} tokens per step"
        )
        print(
            f"magistral-jax: {results['magistral_jax_tokens_per_s']} tokens/s; transformers + torch AdamW: "
            f"{results['transformers_tokens_per_s']} tokens/s; ratio {results['ratio']}x"
        )
        print(
            f"first step {first_s:.2f} s, of which {first['time_compile']:.2f} s compiling (tracing, lowering, XLA); "
            f"the second step {last['time_compile']:.2f} s compiling"
        )
        print(
            f"step {ours_s:.2f} s = {flops / ours_s / 1e9:.1f} GFLOP/s (6 N T) against a measured matmul "
            f"throughput of {peak / 1e9:.1f} GFLOP/s ({100 * results['matmul_fraction']:.0f}%)"
        )
    return 0


def run_rl(args: argparse.Namespace) -> int:
    if args.steps <= args.warmup or args.warmup < 1:
        raise ValueError("bench rl: 1 <= --warmup < --steps expected")
    if args.rounds < 1:
        raise ValueError("bench rl: --rounds must be >= 1")
    from magistral_jax.cli.devices import simulate_devices

    simulate_devices(8)
    import jax
    import numpy as np

    from magistral_jax.sampling.sampler import cache_shape
    from magistral_jax.train.config import load_run_config
    from magistral_jax.train.loop import run

    config = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "grpo-tiny-async.yaml")
    if not os.path.exists(config):
        raise ValueError(f"{config}: not found (bench rl runs from a source checkout)")
    if len(jax.devices()) < 8:
        raise ValueError(f"bench rl needs 8 devices, {len(jax.devices())} here")
    results: dict = {
        "machine": _machine(),
        "devices": len(jax.devices()),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    base = load_run_config(config, [])
    a, g = base.async_rl, base.grpo
    contiguous_tokens = a.slots * cache_shape(a.max_prompt_len, g.max_new_tokens)[1]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            # The modes alternate round by round, so that a change of the machine's load between
            # two runs weighs on every mode alike; each figure is the median over the rounds.
            rounds.append({})
            for mode in ("sync", "async", "paged"):
                run_dir = os.path.join(tmp, f"{mode}-{index}")
                overrides = [f"run_dir={run_dir}", f"steps={args.steps}", f"checkpoint_every={args.steps}"]
                if mode == "sync":
                    overrides += ["async_rl.enabled=false", "mesh=fsdp=8"]
                if mode == "paged":
                    # The contiguous cache's memory as a pool of pages, decoding every completion the
                    # queue bound lets out at once.
                    overrides += [
                        "async_rl.cache=paged",
                        "async_rl.page_size=16",
                        f"async_rl.pool_tokens={contiguous_tokens}",
                        f"async_rl.slots={int(a.max_async_ratio * g.prompts_per_step * g.group_size)}",
                    ]
                cfg = load_run_config(config, overrides)
                rows: list[dict] = []
                run(cfg, progress=not args.json, on_step=lambda step, m, rows=rows: rows.append(dict(m)))
                timed = rows[args.warmup :]
                seconds = sum(m["time_step"] for m in timed)
                completions = len(timed) * cfg.grpo.prompts_per_step * cfg.grpo.group_size
                out = rounds[-1][mode] = {
                    "completions_per_s": completions / seconds,
                    "step_s": seconds / len(timed),
                    "completion_len_mean": sum(m["completion_len_mean"] for m in rows) / len(rows),
                    "reward_curve": [round(m["reward_mean"], 4) for m in rows],
                }
                if mode != "sync":
                    out.update(
                        slots=cfg.async_rl.slots,
                        generator_tokens_per_s=sum(m["generator_tokens_per_s"] for m in timed) / len(timed),
                        generator_busy_tokens_per_s=sum(m["generator_busy_tokens_per_s"] for m in timed) / len(timed),
                        policy_lag_mean=sum(m["policy_lag_mean"] for m in timed) / len(timed),
                        policy_lag_max=max(m["policy_lag_max"] for m in timed),
                        weight_push_s=max(m["weight_push_s"] for m in timed),
                        trainer_utilisation=sum(m["trainer_utilisation"] for m in timed) / len(timed),
                    )
    for mode in ("sync", "async", "paged"):
        per_round = [r[mode] for r in rounds]
        results[mode] = {
            k: round(float(np.median([r[k] for r in per_round])), 4 if k == "weight_push_s" else 2)
            for k in per_round[0]
            if k not in ("reward_curve", "slots")
        }
        if "slots" in per_round[0]:
            results[mode]["slots"] = per_round[0]["slots"]
        results[mode]["reward_curve"] = per_round[-1]["reward_curve"]
    ratios = [r["async"]["completions_per_s"] / r["sync"]["completions_per_s"] for r in rounds]
    paged = [r["paged"]["generator_tokens_per_s"] / r["async"]["generator_tokens_per_s"] for r in rounds]
    results["ratio_per_round"] = [round(x, 2) for x in ratios]
    results["ratio"] = round(float(np.median(ratios)), 2)
    busy = [r["paged"]["generator_busy_tokens_per_s"] / r["async"]["generator_busy_tokens_per_s"] for r in rounds]
    results["paged_generation_ratio_per_round"] = [round(x, 2) for x in paged]
    results["paged_generation_ratio"] = round(float(np.median(paged)), 2)
    results["paged_busy_generation_ratio_per_round"] = [round(x, 2) for x in busy]
    results["paged_busy_generation_ratio"] = round(float(np.median(busy)), 2)
    results["contiguous_cache_tokens"] = contiguous_tokens
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"machine: {results['machine']}; 8 devices; {args.steps} steps per mode, the first {args.warmup} untimed; "
            f"{args.rounds} rounds of the three modes, alternating: medians"
        )
        for mode in ("sync", "async", "paged"):
            r = results[mode]
            print(
                f"{mode:>5}: {r['completions_per_s']} completions/s ({r['step_s']} s/step); rewards {r['reward_curve']}"
            )
        a = results["async"]
        print(
            f"async / sync: {results['ratio']}x (per round {results['ratio_per_round']}); "
            f"policy lag mean {a['policy_lag_mean']} max {a['policy_lag_max']}; "
            f"weight push <= {a['weight_push_s']} s; trainer busy {100 * a['trainer_utilisation']:.0f}% of the time"
        )
        p = results["paged"]
        print(
            f"generation, same cache memory ({contiguous_tokens} tokens): contiguous {a['slots']} slots "
            f"{a['generator_tokens_per_s']} tokens/s, paged {p['slots']} slots {p['generator_tokens_per_s']} "
            f"tokens/s: {results['paged_generation_ratio']}x "
            f"(per round {results['paged_generation_ratio_per_round']}); "
            f"per second of generating (waits left out) {a['generator_busy_tokens_per_s']} against "
            f"{p['generator_busy_tokens_per_s']}: {results['paged_busy_generation_ratio']}x"
        )
    return 0


SCORE_PROGRAMS = {
    "python": "a, b = map(int, input().split())\nprint(a + b)\n",
    "cpp": "#include <iostream>\nint main() { long a, b; std::cin >> a >> b; std::cout << a + b << std::endl; }\n",
}


def run_score(args: argparse.Namespace) -> int:
    from magistral_jax.rl.magistral_rewards import code_correct
    from magistral_jax.rl.sandbox import SandboxError

    if args.completions < 1 or args.tests < 1 or args.repeats < 1:
        raise ValueError("bench score: --completions, --tests and --repeats must be positive")
    tests = [{"input": f"{i} {2 * i + 1}\n", "output": f"{3 * i + 1}\n"} for i in range(args.tests)]
    languages = ["python"] + (["cpp"] if shutil.which("g++") else [])
    results: dict = {"machine": _machine(), "completions": args.completions, "tests": args.tests}
    for language in languages:
        answer = f"```{language}\n{SCORE_PROGRAMS[language]}```"
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for seed in range(args.completions):
                ok, reason = code_correct(answer, tests, seed, max_tests=args.tests)
                if not ok:
                    raise SandboxError(f"bench score: the correct {language} program failed: {reason}")
            best = min(best, time.perf_counter() - start)
        runs = args.completions * args.tests
        results[language] = {"tests_per_s": round(runs / best, 2), "seconds": round(best, 2)}
    if "cpp" in results:
        # The compilation's share: a completion with a single test is mostly its compile.
        one = [tests[0]]
        answer = f"```cpp\n{SCORE_PROGRAMS['cpp']}```"
        start = time.perf_counter()
        for seed in range(args.completions):
            code_correct(answer, one, seed, max_tests=1)
        results["cpp"]["compile_and_one_test_s"] = round((time.perf_counter() - start) / args.completions, 3)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"machine: {results['machine']}; {args.completions} completions x {args.tests} tests per language")
        for language in languages:
            r = results[language]
            extra = f"; compile + 1 test {r['compile_and_one_test_s']} s" if language == "cpp" else ""
            print(f"{language:>6}: {r['tests_per_s']} tests/s ({r['seconds']} s){extra}")
    return 0
