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


def _generate(cfg, directory: str) -> None:
    """Random bf16 weights (finite, any bit pattern but the top exponent) written piece by piece."""
    import ml_dtypes
    import numpy as np

    from magistral_jax.checkpoint.convert import _row_pieces, output_layout
    from magistral_jax.checkpoint.layouts import plan
    from magistral_jax.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, split_files
    from magistral_jax.config import to_hf_config

    os.makedirs(directory)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = plan(cfg, output_layout(cfg, "hf"))
    files = split_files([TensorInfo(e.name, bf16, e.torch_shape) for e in entries], 5 * 10**9, "model")
    writer = SafetensorsWriter(directory, files, "model.safetensors.index.json")
    for e in entries:
        cols = math.prod(e.torch_shape[1:])
        for start, stop in _row_pieces(e, 2):
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
