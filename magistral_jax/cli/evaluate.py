"""`magistral-jax eval` and `magistral-jax filter`: k samples per problem with a checkpoint, scored by
the training reward; a report (for a problem file, or the paper's benchmarks in its table's layout),
or the problems whose pass rate lies in a band."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from magistral_jax.cli.generate import add_cache_options, add_checkpoint_options, open_for_sampling
from magistral_jax.cli.score import add_data_options, read_data

if TYPE_CHECKING:
    from magistral_jax.data.problems import Problem


def _common(p: argparse.ArgumentParser) -> None:
    add_checkpoint_options(p)
    add_cache_options(p)
    add_data_options(p)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7, as the paper)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95, as the model cards)")
    p.add_argument("--batch", type=int, default=8, help="problems per sampler call (default 8; k samples each)")
    p.add_argument("--limit", type=int, default=0, help="use the first N problems of each set (default 0 = all)")
    p.add_argument("--workers", type=int, default=2, help="reward worker processes (default 2; 0 = in process)")
    p.add_argument("--l-max", type=int, default=None, help="length penalty: l_max (default: no penalty)")
    p.add_argument("--l-cache", type=int, default=4096, help="length penalty: l_cache (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def register(sub: argparse._SubParsersAction) -> None:
    from magistral_jax.data.benchmarks import BENCHMARKS

    p = sub.add_parser(
        "eval",
        help="pass@1 over k samples and maj@k of a checkpoint: the paper's benchmarks, or any problem set",
        description=(
            "Samples K completions of every problem with the checkpoint, scores them with the Magistral "
            "reward used in training, and reports pass@1 averaged over the K samples, maj@K (the most "
            "frequent boxed answer, answers grouped by mathematical equivalence), format rate, language "
            "consistency, and mean completion and thinking lengths, overall and per language where the "
            "set has languages. With --benchmark NAME --data FILE (repeatable, in pairs), reads each "
            "benchmark's published file and follows the paper's protocol: temperature 0.7, top-p 0.95, "
            "40,960 new tokens, K = 64 for AIME, 16 for GPQA Diamond and LiveCodeBench (each "
            "overridable), and prints pass@1 and maj@K per benchmark as the paper's table lays them out. "
            "Writes OUT/report.json, OUT/report.png and every scored sample to OUT/samples.jsonl; an "
            "existing report is kept unless --overwrite is given, and OUT is checked to be writable "
            "before anything is sampled."
        ),
    )
    _common(p)
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE",
        help="problems (.jsonl, .parquet, .csv, or bundled:NAME); with --benchmark, that benchmark's file "
        "(one --data per --benchmark, in the same order)",
    )
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        choices=list(BENCHMARKS),
        help="read --data as this benchmark's published file and use the paper's protocol (repeatable)",
    )
    p.add_argument("--k", type=int, default=None, help="samples per problem (default 64; a benchmark's own)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="completion budget (default 2048; 40960 with --benchmark)"
    )
    p.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    p.add_argument("--overwrite", action="store_true", help="replace the report an earlier eval left in OUT")
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
    _common(p)
    p.add_argument("--data", required=True, help="problems: .jsonl, .parquet or .csv file, or bundled:NAME")
    p.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="completion budget (default 2048)")
    p.add_argument("--min-pass-rate", type=float, default=0.0, help="keep rates above this (default 0)")
    p.add_argument("--max-pass-rate", type=float, default=1.0, help="keep rates below this (default 1)")
    p.add_argument("--out", required=True, help="the filtered problems (.jsonl; must not exist)")
    p.set_defaults(run=run_filter)


@dataclasses.dataclass
class EvalSet:
    """One problem set of an eval: a benchmark's file, or a plain problem file (`benchmark` None)."""

    name: str
    data: str
    benchmark: str | None
    problems: list[Problem]
    k: int
    max_new_tokens: int
    reward: dict[str, Any]
    skipped: int = 0


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("k", "max_new_tokens", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: a positive integer is expected")


def _problems(args: argparse.Namespace, path: str, benchmark: str | None):
    """The problem set of `path` (read as `benchmark`'s schema when given), skipped rows reported."""
    if benchmark is None:
        data = read_data(args, path)
    else:
        from magistral_jax.data.benchmarks import read_benchmark

        data = read_benchmark(benchmark, path, strict=args.strict)
        data.report_skipped(f"{benchmark}: {path}")
    if args.limit > 0:
        data.problems = data.problems[: args.limit]
    return data


def _open(args: argparse.Namespace):
    return open_for_sampling(args)


def _sample(args: argparse.Namespace, opened, s: EvalSet):
    """Samples and scores one set's problems with the opened checkpoint."""
    from magistral_jax.evaluation import sample_and_score
    from magistral_jax.sampling import SamplingParams

    model, tokenizer, system = opened
    return sample_and_score(
        model,
        tokenizer,
        s.problems,
        k=s.k,
        max_new_tokens=s.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p),
        seed=args.seed,
        system_prompt=system,
        batch_problems=args.batch,
        reward={"l_max": args.l_max, "l_cache": args.l_cache, **s.reward},
        workers=args.workers,
        cache={"cache": args.cache, "page_size": args.page_size, "pool_tokens": args.pool_tokens or None},
    )


def _prepare_out(out: str, overwrite: bool) -> None:
    """Checks, before anything is sampled, that OUT is a writable directory without a report."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file; a directory is expected")
    if os.path.exists(os.path.join(out, "report.json")) and not overwrite:
        raise ValueError(f"--out {out}: holds a report already; pass --overwrite to replace it, or choose another")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not writable ({e.strerror or e})") from None


def _eval_sets(args: argparse.Namespace) -> list[EvalSet]:
    from magistral_jax.data.benchmarks import BENCHMARKS, MAX_NEW_TOKENS

    if args.benchmark and len(args.benchmark) != len(args.data):
        raise ValueError(
            f"--benchmark and --data come in pairs: {len(args.benchmark)} benchmarks, {len(args.data)} files"
        )
    if not args.benchmark and len(args.data) != 1:
        raise ValueError("--data: one problem file without --benchmark (several only in --benchmark pairs)")
    if args.benchmark and (args.field or args.answer_format != "raw"):
        raise ValueError("--field and --answer-format are for plain problem files; a benchmark reads its own schema")
    if len(set(args.benchmark)) != len(args.benchmark):
        raise ValueError(f"--benchmark: each benchmark once (given: {', '.join(args.benchmark)})")
    sets = []
    for path, name in zip(args.data, args.benchmark or [None], strict=True):
        bench = BENCHMARKS[name] if name else None
        data = _problems(args, path, name)
        sets.append(
            EvalSet(
                name=name or path,
                data=path,
                benchmark=name,
                problems=data.problems,
                k=args.k or (bench.k if bench else 64),
                max_new_tokens=args.max_new_tokens or (MAX_NEW_TOKENS if bench else 2048),
                reward=dict(bench.reward) if bench else {},
                skipped=data.skipped,
            )
        )
    return sets


def _language_table(report: dict[str, Any], k: int) -> list[str]:
    heads = ("problems", "pass@1", f"maj@{k}", "format", "language", "length", "thinking")
    lines = [f"{'':<10}" + "".join(f"{h:>9}" for h in heads)]
    for name, r in [*report["per_language"].items(), ("all", report)]:
        maj = "-" if r[f"maj@{k}"] is None else f"{r[f'maj@{k}']:.1%}"
        lines.append(
            f"{name:<10}{r['problems']:>9}{r['pass@1']:>9.1%}{maj:>9}{r['format']:>9.1%}"
            f"{r['language']:>9.1%}{r['length']:>9.1f}{r['thinking_length']:>9.1f}"
        )
    return lines


def paper_table(report: dict[str, Any]) -> str:
    """The benchmarks' pass@1 and maj@k in percent, one column each, as the paper's table lays them
    out (maj@k only where answers can be voted on), then each benchmark's details."""
    from magistral_jax.data.benchmarks import BENCHMARKS

    headers, values = [], []
    for name, r in report["benchmarks"].items():
        title = BENCHMARKS[name].title
        for metric in ("pass@1", f"maj@{r['k']}"):
            if r[metric] is not None:
                headers.append(f"{title} {metric}")
                values.append(f"{100 * r[metric]:.2f}")
    label = os.path.basename(os.path.normpath(report["checkpoint"])) or report["checkpoint"]
    width = max(len(label), 10) + 2
    lines = [" " * width + "".join(f"{h:>{len(h) + 3}}" for h in headers)]
    lines.append(f"{label:<{width}}" + "".join(f"{v:>{len(h) + 3}}" for h, v in zip(headers, values, strict=True)))
    for name, r in report["benchmarks"].items():
        lines += ["", f"{BENCHMARKS[name].title}: {r['problems']} problems x {r['k']} samples, {r['data']}"]
        lines += _language_table(r, r["k"])
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from magistral_jax.evaluation import plot_report, summarize

    _check_positive(args)
    _prepare_out(args.out, args.overwrite)
    sets = _eval_sets(args)
    opened = _open(args)
    results = [(s, _sample(args, opened, s)) for s in sets]
    settings = {"checkpoint": args.checkpoint, "temperature": args.temperature, "top_p": args.top_p}
    if args.benchmark:
        report: dict[str, Any] = {**settings, "benchmarks": {}}
        for s, samples in results:
            report["benchmarks"][s.name] = {
                "data": s.data,
                "max_new_tokens": s.max_new_tokens,
                "skipped_rows": s.skipped,
                **summarize(s.problems, samples, s.k),
            }
    else:
        ((s, samples),) = results
        report = {**summarize(s.problems, samples, s.k), **settings, "data": s.data, "skipped_rows": s.skipped}
    with open(os.path.join(args.out, "samples.jsonl"), "w", encoding="utf-8") as f:
        for s, samples in results:
            for x in samples:
                row = {"id": s.problems[x.index].id, **dataclasses.asdict(x)}
                if s.benchmark:
                    row = {"benchmark": s.benchmark, **row}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    plot = plot_report(report, os.path.join(args.out, "report.png"))
    print(paper_table(report) if args.benchmark else "\n".join(_language_table(report, report["k"])))
    print(f"eval: wrote {os.path.join(args.out, 'report.json')}, {plot} and the samples")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    import numpy as np

    from magistral_jax.evaluation import pass_rates

    _check_positive(args)
    if not 0.0 <= args.min_pass_rate < args.max_pass_rate <= 1.0:
        raise ValueError("--min-pass-rate and --max-pass-rate: 0 <= min < max <= 1 is expected")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out}: exists; remove it or choose another file")
    tmp = f"{args.out}.partial"
    try:
        open(tmp, "w").close()  # writable? (checked before anything is sampled)
    except OSError as e:
        raise ValueError(f"--out {args.out}: not writable ({e.strerror or e})") from None
    try:
        problems = _problems(args, args.data, None).problems
        s = EvalSet(args.data, args.data, None, problems, args.k, args.max_new_tokens, {})
        samples = _sample(args, _open(args), s)
    except BaseException:
        os.remove(tmp)
        raise
    rates = pass_rates(samples, len(problems))
    keep = (rates > args.min_pass_rate) & (rates < args.max_pass_rate)
    with open(tmp, "w", encoding="utf-8") as f:
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
