"""`magistral-jax score`: the Magistral reward of completions generated elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score completions generated elsewhere with the training reward (one JSON line each)",
        description=(
            "Reads problems (.jsonl, .parquet or .csv: id, problem, answer or tests, optional language "
            "and task; --field maps other column names) and completions (.jsonl: id of the problem, "
            "completion = the decoded text with control tokens written out, e.g. [THINK], and optionally "
            "n_tokens for the length penalty), scores every completion with the same Magistral reward "
            "code as training, and writes one JSON line per completion, in input order: id, reward, components, reason "
            "(why the reward is what it is; null when nothing was missed)."
        ),
    )
    p.add_argument("--data", required=True, help="problems: .jsonl, .parquet or .csv file, or bundled:NAME")
    add_data_options(p)
    p.add_argument("--completions", required=True, help="completions: .jsonl with `id` and `completion`")
    p.add_argument(
        "--style",
        default="v13",
        choices=("v13", "think-tags"),
        help="v13: [THINK]...[/THINK] (Magistral 2507/2509); think-tags: <think>...</think> (2506). Default v13",
    )
    p.add_argument("--out", default="-", help="output .jsonl (default: standard output)")
    p.add_argument("--workers", type=int, default=2, help="reward worker processes (default 2; 0 = in process)")
    p.add_argument("--l-max", type=int, default=None, help="length penalty: l_max in tokens (needs n_tokens)")
    p.add_argument("--l-cache", type=int, default=4096, help="length penalty: l_cache (default 4096)")
    p.add_argument("--no-language", action="store_true", help="leave out the language-consistency reward")
    p.add_argument("--batch", type=int, default=256, help="completions scored per batch (default 256)")
    p.set_defaults(run=run)


def add_data_options(p: argparse.ArgumentParser) -> None:
    """How a problem file's columns are read (shared by score, eval and filter)."""
    from magistral_jax.data.columns import ANSWER_FORMATS

    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="read problem field FIELD (problem, answer, tests, public_tests, private_tests, id, language, "
        "level, task, trace, fn_name) from column COLUMN, e.g. --field problem=question (repeatable)",
    )
    p.add_argument(
        "--answer-format",
        default="raw",
        choices=ANSWER_FORMATS,
        help="how the answer column is written: raw (as is), gsm8k (the number after ####), boxed (the "
        "last \\boxed{} of a worked solution). Default raw",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first malformed data row instead of skipping")


def read_data(args: argparse.Namespace, path: str):
    """The problem set of `path` as the data options say; skipped rows reported on stderr."""
    from magistral_jax.data.problems import read_problems

    fields = {}
    for item in args.field:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise ValueError(f"--field {item!r}: FIELD=COLUMN is expected")
        fields[name] = column
    data = read_problems(path, strict=args.strict, fields=fields, answer_format=args.answer_format)
    data.report_skipped(path)
    return data


def read_completions(path: str, known: set[str], need_tokens: bool) -> list[dict]:
    """The completion rows; any bad line is an error naming the line (nothing is scored)."""
    from magistral_jax.data.problems import jsonl_lines

    if not os.path.isfile(path):
        raise ValueError(f"--completions {path}: no such file")
    rows, errors = [], []
    for number, line in jsonl_lines(path):
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            errors.append(f"{where}: not JSON ({getattr(e, 'msg', 'nested too deeply')})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            errors.append(f"{where}: an object with a string `completion` is expected")
        elif str(row.get("id")) not in known:
            errors.append(f"{where}: id {row.get('id')!r} names no problem")
        elif need_tokens and not isinstance(row.get("n_tokens"), int):
            errors.append(f"{where}: --l-max needs an integer `n_tokens`")
        else:
            rows.append(row)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("; ".join(errors[:5]) + more)
    if not rows:
        raise ValueError(f"{path}: no completions")
    return rows


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from magistral_jax.data.sources import problem_fields
    from magistral_jax.evaluation import with_call_driver
    from magistral_jax.rl.rewards import RewardPool

    if args.batch < 1:
        raise ValueError("--batch: a positive integer is expected")
    problems = {p.id: p for p in read_data(args, args.data).problems}
    rows = read_completions(args.completions, set(problems), args.l_max is not None)
    settings = {
        "style": args.style,
        "l_max": args.l_max,
        "l_cache": args.l_cache,
        "language_reward": not args.no_language,
    }
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    try:
        with (
            RewardPool("magistral", settings, args.workers) as pool,
            tqdm(total=len(rows), desc="score", unit="completion", file=sys.stderr) as bar,
        ):
            for first in range(0, len(rows), args.batch):
                batch = rows[first : first + args.batch]
                chosen = [problems[str(r["id"])] for r in batch]
                fields = [problem_fields(p) for p in chosen]
                texts = [with_call_driver(r["completion"], chosen[i].fn_name, args.style) for i, r in enumerate(batch)]
                scored = pool(
                    [f["problem"] for f in fields],
                    texts,
                    n_tokens=[r.get("n_tokens", 0) for r in batch],
                    **{k: [f[k] for f in fields] for k in ("problem", "task", "answer", "tests", "test_seed")},
                )
                for i, r in enumerate(batch):
                    record = {
                        "id": r["id"],
                        "reward": round(scored.rewards[i], 6),
                        "components": {k: round(v[i], 6) for k, v in scored.components.items()},
                        "reason": scored.reasons[i],
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(batch))
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
