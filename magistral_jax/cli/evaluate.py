"""`magistral-jax eval` and `magistral-jax filter`: k samples per problem with a checkpoint, scored by
the training reward; a report, or the problems whose pass rate lies in a band."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from magistral_jax.cli.generate import add_checkpoint_options, open_for_sampling


def _common(p: argparse.ArgumentParser, k: int) -> None:
    add_checkpoint_options(p)
    p.add_argument("--data", required=True, help="problems: .jsonl or .parquet file, or bundled:NAME")
    p.add_argument("--k", type=int, default=k, help=f"samples per problem (default {k})")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="completion budget (default 2048)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7, as the paper)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--batch", type=int, default=8, help="problems per sampler call (default 8; k samples each)")
    p.add_argument("--limit", type=int, default=0, help="use the first N problems only (default 0 = all)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed data row instead of skipping")
    p.add_argument("--workers", type=int, default=2, help="reward worker processes (default 2; 0 = in process)")
    p.add_argument("--l-max", type=int, default=None, help="length penalty: l_max (default: no penalty)")
    p.add_argument("--l-cache", type=int, default=4096, help="length penalty: l_cache (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="pass@1 over k samples, maj@k, per-language figures and lengths of a checkpoint on a problem set",
        description=(
            "Samples K completions of every problem with the checkpoint (temperature 0.7, top-p 0.95 by "
            "default, as the Magistral paper evaluates), scores them with the Magistral reward used in "
            "training, and reports pass@1 averaged over the K samples, maj@K (the most frequent boxed "
            "answer), format rate, language consistency, and mean completion and thinking lengths, "
            "overall and per language. Writes OUT/report.json, OUT/report.png and every scored "
            "sample to OUT/samples.jsonl."
        ),
    )
    _common(p, k=64)
    p.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    p.set_defaults(run=run_eval)

    p = sub.add_parser(
        "filter",
        help="keep the problems whose pass rate over k samples lies strictly inside a band",
        description=(
            "The Magistral paper's difficulty filter: samples K completions of every problem with the "
            "checkpoint, scores them with the Magistral reward, and writes the problems whose pass rate "
            "lies strictly between --min-pass-rate and --max-pass-rate (by default: solved sometimes, "
            "but not always) to OUT as JSONL, each with its `pass_rate`."
        ),
    )
    _common(p, k=16)
    p.add_argument("--min-pass-rate", type=float, default=0.0, help="keep rates above this (default 0)")
    p.add_argument("--max-pass-rate", type=float, default=1.0, help="keep rates below this (default 1)")
    p.add_argument("--out", required=True, help="the filtered problems (.jsonl; must not exist)")
    p.set_defaults(run=run_filter)


def _sample(args: argparse.Namespace):
    from magistral_jax.data.problems import read_problems
    from magistral_jax.evaluation import sample_and_score
    from magistral_jax.sampling import SamplingParams

    for name in ("k", "max_new_tokens", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: a positive integer is expected")
    data = read_problems(args.data, strict=args.strict)
    if data.skipped:
        print(
            f"{args.data}: skipped {data.skipped} malformed rows; first: {'; '.join(data.reasons)}",
            file=sys.stderr,
        )
    problems = data.problems[: args.limit] if args.limit > 0 else data.problems
    if not problems:
        raise ValueError(f"{args.data}: no problems")
    model, tokenizer, system = open_for_sampling(args)
    samples = sample_and_score(
        model,
        tokenizer,
        problems,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p),
        seed=args.seed,
        system_prompt=system,
        batch_problems=args.batch,
        reward={"l_max": args.l_max, "l_cache": args.l_cache},
        workers=args.workers,
    )
    return problems, samples


def run_eval(args: argparse.Namespace) -> int:
    from magistral_jax.evaluation import plot_report, summarize

    problems, samples = _sample(args)
    os.makedirs(args.out, exist_ok=True)
    report = summarize(problems, samples, args.k)
    report.update(checkpoint=args.checkpoint, data=args.data, temperature=args.temperature, top_p=args.top_p)
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps({"id": problems[s.index].id, **dataclasses.asdict(s)}, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot = plot_report(report, os.path.join(args.out, "report.png"))
    k = args.k
    print(
        f"{'':<10}{'problems':>9}{'pass@1':>9}{f'maj@{k}':>9}{'format':>9}{'language':>9}{'length':>9}{'thinking':>9}"
    )
    for name, r in [*report["per_language"].items(), ("all", report)]:
        print(
            f"{name:<10}{r['problems']:>9}{r['pass@1']:>9.1%}{r[f'maj@{k}']:>9.1%}{r['format']:>9.1%}"
            f"{r['language']:>9.1%}{r['length']:>9.1f}{r['thinking_length']:>9.1f}"
        )
    print(f"eval: wrote {os.path.join(args.out, 'report.json')}, {plot} and the samples")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    import numpy as np

    from magistral_jax.evaluation import pass_rates

    if not 0.0 <= args.min_pass_rate < args.max_pass_rate <= 1.0:
        raise ValueError("--min-pass-rate and --max-pass-rate: 0 <= min < max <= 1 is expected")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out}: exists; remove it or choose another file")
    problems, samples = _sample(args)
    rates = pass_rates(samples, len(problems))
    keep = (rates > args.min_pass_rate) & (rates < args.max_pass_rate)
    tmp = f"{args.out}.partial"
    with open(tmp, "w") as f:
        for p, rate, kept in zip(problems, rates, keep, strict=True):
            if kept:
                row = {k: v for k, v in dataclasses.asdict(p).items() if v is not None}
                f.write(json.dumps({**row, "pass_rate": float(rate)}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    counts, _ = np.histogram(rates, bins=[0, 1e-9, 0.25, 0.5, 0.75, 1 - 1e-9, 1.0])
    print(
        f"filter: kept {int(keep.sum())} of {len(problems)} problems in {args.out}; pass rates: "
        f"0: {counts[0]}, (0, .25): {counts[1]}, [.25, .5): {counts[2]}, [.5, .75): {counts[3]}, "
        f"[.75, 1): {counts[4]}, 1: {counts[5]}"
    )
    return 0
