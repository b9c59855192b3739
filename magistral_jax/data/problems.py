"""Problem sets from JSONL or Parquet, read through grain: seeded shuffling, host sharding, state.

A row is a problem: `problem` (text), and `answer` (math) or `tests` (code: a list of
`{"input": ..., "output": ...}`), with optional `id`, `language`, `level` and `task` (`math` or
`code`; inferred from `tests` when absent). Malformed rows (broken JSON, an empty problem, neither
answer nor tests) are skipped and counted, with the first few reasons kept; `strict=True` makes
the first one an error instead.

`ProblemSource` draws problems forever: each process reads its own shard (rows `i` with
`i % process_count == process_index`), shuffled by the seed, reshuffled every epoch; its state is
grain's iterator state, saved with the train state so a resumed run draws the same problems.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from magistral_jax.data.procedural import Example


class DataError(ValueError):
    """A data file cannot be read, or (in strict mode) holds a malformed row."""


@dataclass
class Problem:
    id: str
    problem: str
    task: str = "math"
    answer: str | None = None
    tests: list[dict[str, str]] | None = None
    language: str | None = None
    level: int | None = None
    trace: str | None = None  # a worked solution in the Magistral format (SFT)


@dataclass
class ProblemSet:
    problems: list[Problem]
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def _row_to_problem(row: Any, where: str) -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON object is expected")
    text = row.get("problem")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty or missing `problem`")
    answer, tests = row.get("answer"), row.get("tests")
    if answer is None and not tests:
        raise ValueError(f"{where}: neither `answer` nor `tests`")
    if tests is not None and (not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests)):
        raise ValueError(f"{where}: `tests` must be a list of {{input, output}} objects")
    task = row.get("task") or ("code" if tests else "math")
    if task not in ("math", "code"):
        raise ValueError(f"{where}: task {task!r}; expected math or code")
    return Problem(
        id=str(row.get("id", where)),
        problem=text,
        task=task,
        answer=None if answer is None else str(answer),
        tests=tests,
        language=row.get("language"),
        level=row.get("level"),
        trace=row.get("trace"),
    )


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


def resolve(path: str | os.PathLike[str]) -> str:
    """`bundled:NAME` names a file shipped in `data/bundled/` (`math_multilingual`, `python_tasks`)."""
    path = os.fspath(path)
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        full = os.path.join(BUNDLED, name if name.endswith(".jsonl") else f"{name}.jsonl")
        if not os.path.exists(full):
            known = ", ".join(f.removesuffix(".jsonl") for f in sorted(os.listdir(BUNDLED)))
            raise DataError(f"{path}: no such bundled data set; bundled: {known}")
        return full
    return path


def read_problems(path: str | os.PathLike[str], strict: bool = False, keep_reasons: int = 5) -> ProblemSet:
    """Reads a `.jsonl` or `.parquet` problem file (or a `bundled:NAME` set)."""
    path = resolve(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    out = ProblemSet([])

    def skip(reason: str) -> None:
        if strict:
            raise DataError(reason)
        out.skipped += 1
        if len(out.reasons) < keep_reasons:
            out.reasons.append(reason)

    def take(row: Any, where: str) -> None:
        try:
            out.problems.append(_row_to_problem(row, where))
        except ValueError as e:
            skip(str(e))

    name = os.path.basename(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(rows):
            take(row, f"{name} row {i}")
    elif path.endswith((".jsonl", ".json")):
        with open(path) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    skip(f"{name} line {i}: broken JSON ({e.msg})")
                    continue
                take(row, f"{name} line {i}")
    else:
        raise DataError(f"{path}: expected a .jsonl or .parquet file")
    if not out.problems:
        raise DataError(f"{path}: no usable problems ({out.skipped} skipped: {'; '.join(out.reasons)})")
    return out


class ProblemSource:
    """Endless, shuffled, host-sharded problems turned into prompts by `encode`."""

    def __init__(
        self,
        problems: list[Problem],
        encode: Callable[[Problem], Example],
        seed: int = 0,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        import grain
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        mine = problems[shard_index::shard_count]
        if not mine:
            raise DataError(f"shard {shard_index} of {shard_count} holds no problems ({len(problems)} in all)")
        self.encode = encode
        self._dataset = grain.MapDataset.source(mine).seed(seed).shuffle().repeat().to_iter_dataset()
        self._iter = iter(self._dataset)

    def next(self, n: int) -> list[Example]:
        return [self.encode(next(self._iter)) for _ in range(n)]

    def state(self) -> dict[str, Any]:
        return dict(self._iter.get_state())

    def restore(self, state: dict[str, Any]) -> None:
        self._iter = iter(self._dataset)
        self._iter.set_state(state)
