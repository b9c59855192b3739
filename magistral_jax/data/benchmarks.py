"""The Magistral paper's benchmarks, read from their files as published, with the paper's protocol.

- `aime24`, `aime25` (math: boxed answer, math-verify; k = 64): problem from `problem`, `Problem` or
  `question`; answer from `answer` or `Answer`; id from `id`, `ID` or `problem_idx` (first present).
- `gpqa-diamond` (the boxed letter of the correct option; k = 16): `Question`, `Correct Answer`,
  `Incorrect Answer 1` to `3` and `Record ID`, or the same names in snake_case.
- `livecodebench-v5` (Python code, every test in the sandbox; k = 16): `question_content`,
  `starter_code`, `public_test_cases`, `private_test_cases` (JSON, or base64 / zlib / pickle as
  published), `metadata` (`func_name`) and `question_id`.

The AIME columns cover the common Hugging Face copies (HuggingFaceH4/aime_2024, AI-MO/aimo-validation-aime,
Maxwell-Jia/AIME_2024, yentinglin/aime_2025, opencompass/AIME2025, MathArena/aime_2025). GPQA's four
options are shuffled with a seed fixed per question (its `Record ID`, else its text), so a question's
letters never change between runs or files, and the reference answer is the correct option's letter.
LiveCodeBench's LeetCode problems (`functional` tests) call the starter code's method with one JSON
argument per input line (`evaluation.with_call_driver`); the others read stdin.

The protocol (model cards of Magistral Small; paper §5.1): temperature 0.7, top-p 0.95, 40,960 new
tokens; pass@1 averaged over k samples, maj@k for answers that can be voted on. k is the paper's
for AIME (64) and LiveCodeBench (16); it does not give GPQA's, 16 here. The paper's §5.1 says top-p
1.0 for math and GPQA and a 32k budget for GPQA: `--top-p` and `--max-new-tokens` set them.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from magistral_jax.data.columns import RowError
from magistral_jax.data.problems import ProblemSet, read_problems

TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.7, 0.95, 40960
LETTERS = "ABCD"


def _pick(row: dict[str, Any], names: tuple[str, ...], what: str, required: bool = True) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    if required:
        raise RowError(f"no {what} column ({' / '.join(names)})")
    return None


def _text(row: dict[str, Any], names: tuple[str, ...], what: str) -> str:
    value = _pick(row, names, what)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{what} ({names[0]}) must be a non-empty string")
    return value.strip()


def aime_row(row: dict[str, Any]) -> dict[str, Any]:
    """An AIME row of any of the common schemas as problem fields."""
    return {
        "id": _pick(row, ("id", "ID", "problem_idx"), "id", required=False),
        "problem": _pick(row, ("problem", "Problem", "question"), "problem"),
        "answer": _pick(row, ("answer", "Answer"), "answer"),
        "task": "math",
    }


GPQA_INSTRUCTION = "Answer with the letter of the correct option in \\boxed{}, for example \\boxed{A}."


def gpqa_row(row: dict[str, Any]) -> dict[str, Any]:
    """A GPQA row: the question and its four options, shuffled with a seed fixed per question; the
    answer is the correct option's letter."""
    question = _text(row, ("Question", "question"), "question")
    options = [_text(row, ("Correct Answer", "correct_answer"), "correct answer")]
    for i in (1, 2, 3):
        options.append(_text(row, (f"Incorrect Answer {i}", f"incorrect_answer_{i}"), f"incorrect answer {i}"))
    if len(set(options)) < 4:
        raise RowError("two of the four options are the same text")
    record = _pick(row, ("Record ID", "record_id", "id"), "id", required=False)
    order = list(range(4))
    random.Random(zlib.crc32(str(record if record is not None else question).encode())).shuffle(order)
    listed = "\n".join(f"{LETTERS[slot]}) {options[i]}" for slot, i in enumerate(order))
    return {
        "id": record,
        "problem": f"{question}\n\n{listed}\n\n{GPQA_INSTRUCTION}",
        "answer": LETTERS[order.index(0)],
        "task": "math",
    }


LCB_FUNCTIONAL = (
    "Complete the following starter code. Answer with the whole solution in one ```python code block.\n\n"
    "```python\n{starter}\n```"
)
LCB_STDIN = (
    "Read the input from standard input and write the answer to standard output. Answer with the whole "
    "program in one ```python code block."
)


def livecodebench_row(row: dict[str, Any]) -> dict[str, Any]:
    """A LiveCodeBench code-generation row (release v5 schema) as a code problem."""
    content = _text(row, ("question_content",), "question_content")
    starter = row.get("starter_code") or ""
    if not isinstance(starter, str):
        raise RowError("starter_code must be a string")
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise RowError("metadata is not JSON") from None
    if not isinstance(metadata, dict):
        raise RowError("metadata must be a JSON object")
    fmt = LCB_FUNCTIONAL.format(starter=starter.strip()) if starter.strip() else LCB_STDIN
    return {
        "id": _pick(row, ("question_id", "id"), "id", required=False),
        "problem": f"{content.strip()}\n\n{fmt}",
        "task": "code",
        "public_tests": row.get("public_test_cases"),
        "private_tests": row.get("private_test_cases"),
        "fn_name": metadata.get("func_name"),
    }


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its file schema, how the paper's table names it, and its protocol."""

    title: str
    transform: Callable[[dict[str, Any]], dict[str, Any]]
    k: int
    reward: dict[str, Any] = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("AIME'24", aime_row, k=64),
    "aime25": Benchmark("AIME'25", aime_row, k=64),
    "gpqa-diamond": Benchmark("GPQA Diamond", gpqa_row, k=16),
    # Every test is run (the training reward's default is a seeded subset of 20).
    "livecodebench-v5": Benchmark("LiveCodeBench v5", livecodebench_row, k=16, reward={"max_tests": 1 << 30}),
}


def read_benchmark(name: str, path: str, strict: bool = False) -> ProblemSet:
    """The problems of benchmark `name` from its published file (`.jsonl`, `.parquet` or `.csv`)."""
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark: {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return read_problems(path, strict=strict, transform=BENCHMARKS[name].transform)
