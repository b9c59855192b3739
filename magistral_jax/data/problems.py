"""Problem sets from JSONL, Parquet or CSV files, read through grain: seeded shuffling, host sharding, state.

A row is a problem: `problem` (text), and `answer` (math) or tests (code: `tests`, `public_tests`,
`private_tests`, each a list of `{"input": ..., "output": ...}` or another form `columns.parse_tests`
reads), with optional `id`, `language`, `level`, `task` (`math` or `code`; inferred from the tests
when absent), `trace` (a worked solution, for SFT) and `fn_name` (tests call this method of the
program, as LiveCodeBench's LeetCode problems do). `fields` maps these names to the columns of a
published set and `answer_format` reads its answers (`columns`); `transform` lets a benchmark build
the fields itself (`benchmarks`).

Malformed rows (broken JSON, an empty problem, neither answer nor tests, a wrong type) are skipped
and counted, with the first few reasons kept; `strict=True` makes the first one an error instead.
Rows that would make the grader wrong are errors in any mode, naming the file and line: a code test
without an expected output, a problem whose every test expects no output, two rows with one id; so
is a file that is not UTF-8.

`ProblemSource` draws problems forever: each process reads its own shard (rows `i` with
`i % process_count == process_index`), shuffled by the seed, reshuffled every epoch; its state is
grain's iterator state, saved with the train state so a resumed run draws the same problems.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from magistral_jax.data.columns import (
    ANSWER_FORMATS,
    RowError,
    TrustError,
    as_functional,
    check_fields,
    extract_answer,
    map_fields,
    parse_tests,
)
from magistral_jax.data.procedural import Example

FIELDS = (
    "id",
    "problem",
    "answer",
    "tests",
    "public_tests",
    "private_tests",
    "language",
    "level",
    "task",
    "trace",
    "fn_name",
)


class DataError(ValueError):
    """A data file cannot be read, holds a row the grader cannot trust, or (in strict mode) holds
    a malformed row."""


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
    fn_name: str | None = None  # the tests call this method of the program (LiveCodeBench functional)


@dataclass
class ProblemSet:
    problems: list[Problem]
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def report_skipped(self, label: str) -> None:
        """One line on stderr with the number of skipped rows and the first reasons, if any."""
        if self.skipped:
            print(f"{label}: skipped {self.skipped} malformed rows; first: {'; '.join(self.reasons)}", file=sys.stderr)


def _optional(row: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = row.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RowError(f"`{key}` must be {names}, got {type(value).__name__}")
    return value


_LEVEL = re.compile(r"(?:^|\s)(-?\d+)\s*$")


def _level(value: Any) -> int | None:
    """An integer level, also from text ending in one (MATH writes `Level 3`); None when the
    column holds none (MATH's `Level ?`): the level is optional."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _LEVEL.search(value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def _row_to_problem(row: Any, where: str, answer_format: str = "raw") -> Problem:
    if not isinstance(row, dict):
        raise RowError("a JSON object is expected")
    text = row.get("problem")
    if not isinstance(text, str) or not text.strip():
        raise RowError("empty or missing `problem`")
    row_id = _optional(row, "id", (str, int))
    tests: list[dict[str, str]] = []
    kinds: set[str | None] = set()
    for column in ("tests", "public_tests", "private_tests"):
        found, found_kinds = parse_tests(row.get(column), column)
        tests += found
        kinds |= found_kinds
    # Tests call a method when they say so, or when the row names one and they do not say `stdin`.
    fn_name = _optional(row, "fn_name", str) or None
    if {"stdin", "functional"} <= kinds:
        raise RowError("stdin and functional tests mixed")
    if "stdin" in kinds:
        fn_name = None
    if "functional" in kinds and fn_name is None:
        raise RowError("functional tests need `fn_name`, the method they call")
    if fn_name is not None and not fn_name.isidentifier():
        raise RowError(f"fn_name {fn_name!r} is not a Python identifier")
    if fn_name is not None and tests:
        tests = as_functional(tests)
    answer = None if row.get("answer") is None else extract_answer(row["answer"], answer_format)
    if answer is None and not tests:
        raise RowError("neither `answer` nor `tests`")
    if tests and all(not t["output"].strip() for t in tests):
        raise TrustError("every test expects an empty output (a program that prints nothing would pass)")
    task = _optional(row, "task", str) or ("code" if tests else "math")
    if task not in ("math", "code"):
        raise RowError(f"task {task!r}; expected math or code")
    if task == "code" and not tests:
        raise RowError("a code problem without tests")
    return Problem(
        id=where if row_id is None else str(row_id),
        problem=text,
        task=task,
        answer=answer,
        tests=tests or None,
        language=_optional(row, "language", str),
        level=_level(row.get("level")),
        trace=_optional(row, "trace", str),
        fn_name=fn_name if tests else None,
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


def _utf8(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "data files must be UTF-8"
        ) from None


def jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a UTF-8 file (a leading BOM is dropped); a
    line that is not UTF-8 is a `DataError` naming the file and line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text = _utf8(raw, path, number)
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


# What a reader yields per row: where it is (for messages) and the row, or why it cannot be read.
Record = tuple[str, "dict[str, Any] | RowError"]


def _encodable(row: Any) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_records(path: str) -> Iterator[Record]:
    name = os.path.basename(path)
    for number, line in jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{name} line {number}", RowError(f"broken JSON ({e.msg})")
        except RecursionError:
            yield f"{name} line {number}", RowError("JSON nested too deeply")
        else:
            # `\ud800`-style escapes decode to lone surrogates: text that no UTF-8 file can hold.
            if "\\ud" in line.lower() and not _encodable(row):
                yield f"{name} line {number}", RowError("a string escapes a lone surrogate (not Unicode text)")
            else:
                yield f"{name} line {number}", row


def _parquet_records(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types, and UnicodeDecodeError on bad strings
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable Parquet file ({message})") from None
    for i, row in enumerate(rows):
        yield f"{name} row {i}", row


def _csv_records(path: str) -> Iterator[Record]:
    name = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        byte = raw[e.start]
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{byte:02x}); data files must be UTF-8") from None
    # Published sets keep long fields (GPQA's explanations) in one cell: lift csv's 128 KiB cap.
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    try:
        for row in reader:
            if None in row or None in row.values():
                yield f"{name} line {start}", RowError("a CSV record with more or fewer cells than the header")
            else:
                yield f"{name} line {start}", row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: unreadable CSV ({e})") from None


READERS = {".jsonl": _jsonl_records, ".json": _jsonl_records, ".parquet": _parquet_records, ".csv": _csv_records}


def read_problems(
    path: str | os.PathLike[str],
    strict: bool = False,
    keep_reasons: int = 5,
    *,
    fields: dict[str, str | list[str]] | None = None,
    answer_format: str = "raw",
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> ProblemSet:
    """Reads a `.jsonl`, `.parquet` or `.csv` problem file (or a `bundled:NAME` set).

    Args:
      fields: problem field -> the file's column (or a list of candidate columns), e.g.
        `{"problem": "question"}`; fields not given are read from the column of their own name.
      answer_format: `raw`, `gsm8k` or `boxed` (`columns.extract_answer`).
      transform: builds the problem fields from a raw row instead of `fields` (a benchmark's
        schema); raises `columns.RowError` for a malformed row.
    """
    path = resolve(path)
    fields = check_fields(fields, FIELDS, "fields")
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"answer_format: {answer_format!r}; expected {', '.join(ANSWER_FORMATS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    reader = READERS.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise DataError(f"{path}: expected a .jsonl, .parquet or .csv file")
    out = ProblemSet([])
    first_seen: dict[str, str] = {}
    for where, row in reader(path):
        try:
            if isinstance(row, RowError):
                raise row
            if isinstance(row, dict):
                row = transform(row) if transform is not None else map_fields(row, fields)
            problem = _row_to_problem(row, where, answer_format)
        except TrustError as e:
            raise DataError(f"{where}: {e}") from None
        except RowError as e:
            if strict:
                raise DataError(f"{where}: {e}") from None
            out.skipped += 1
            if len(out.reasons) < keep_reasons:
                out.reasons.append(f"{where}: {e}")
            continue
        if problem.id in first_seen:
            first = first_seen[problem.id]
            raise DataError(f"{where}: duplicate id {problem.id!r} (first at {first}); ids must be unique")
        first_seen[problem.id] = where
        out.problems.append(problem)
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
