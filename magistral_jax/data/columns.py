"""From the columns of public data sets to this project's problem fields, without user code.

- `map_fields`: a row's columns renamed to the problem fields (`fields: {problem: question}`), a
  column name or a list of candidate names per field (the first the row has wins).
- `extract_answer`: the reference answer in the set's own notation (`answer_format`): `raw` as is,
  `gsm8k` the number after the last `####` (`... #### 1,234` -> `1234`), `boxed` the content of the
  last `\\boxed{...}` of a worked solution (MATH, NuminaMath), braces balanced.
- `parse_tests`: code tests as `[{"input": ..., "output": ...}]` from a list of such objects, a dict
  of parallel lists (`{"input": [...], "output": [...]}`, also `inputs` / `outputs`), their JSON
  text, or LiveCodeBench's compressed form (base64 of zlib of a pickled JSON string). LiveCodeBench
  `functional` tests (LeetCode: a method is called with one JSON argument per input line) keep their
  input; their output is normalised to the JSON the evaluation driver prints.

Pickle from a data file could run arbitrary code: `restricted_unpickle` builds only str, bytes,
list, dict and int values and refuses every global (class or function) a pickle names.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import pickle
import re
import zlib
from typing import Any

ANSWER_FORMATS = ("raw", "gsm8k", "boxed")
# A decompressed test field larger than this is refused (a zlib bomb would exhaust memory).
MAX_DECOMPRESSED = 1 << 30


class RowError(ValueError):
    """A row is malformed: it is skipped and counted (or, in strict mode, an error)."""


class TrustError(ValueError):
    """A row that would make the grader wrong (a code test without an expected output passes any
    program): never skipped, always an error."""


def map_fields(row: dict[str, Any], fields: dict[str, str | list[str]]) -> dict[str, Any]:
    """`row` with each mapped field taken from its column (columns not mapped keep their names)."""
    out = dict(row)
    for name, columns in fields.items():
        candidates = [columns] if isinstance(columns, str) else list(columns)
        present = [c for c in candidates if c in row]
        if name not in candidates:
            out.pop(name, None)
        if present:
            out[name] = row[present[0]]
    return out


def check_fields(fields: Any, known: tuple[str, ...], what: str) -> dict[str, str | list[str]]:
    """A validated field mapping (problem field -> column name, or a list of candidate names)."""
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ValueError(f"{what}: a mapping of problem fields to column names is expected, got {fields!r}")
    for name, columns in fields.items():
        if name not in known:
            raise ValueError(f"{what}: {name!r} is not a problem field; known: {', '.join(known)}")
        ok = isinstance(columns, str) or (
            isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)
        )
        if not ok:
            raise ValueError(f"{what}.{name}: a column name or a list of column names is expected, got {columns!r}")
    return dict(fields)


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def extract_answer(value: Any, answer_format: str) -> str:
    """The reference answer of a row's answer column in `answer_format` (see the module docstring)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"`answer` must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(f"`answer` is not finite ({value})")
    text = str(value)
    if answer_format == "gsm8k":
        if "####" not in text:
            raise RowError("`answer` has no `#### ANSWER` line (answer_format gsm8k)")
        text = text.rpartition("####")[2].strip()
        if _THOUSANDS.match(text):
            text = text.replace(",", "")
    elif answer_format == "boxed":
        from magistral_jax.rl.magistral_rewards import last_boxed

        boxed = last_boxed(text)
        if boxed is None:
            raise RowError("`answer` has no complete \\boxed{...} (answer_format boxed)")
        text = boxed
    elif answer_format != "raw":
        raise ValueError(f"answer_format: {answer_format!r}; expected {', '.join(ANSWER_FORMATS)}")
    text = text.strip()
    if not text:
        raise RowError("`answer` is empty")
    return text


class _PrimitiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name} (only plain data is accepted)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: the pickle holds a persistent reference")


_PLAIN = (str, bytes, list, dict, int)


def _check_plain(value: Any, depth: int = 0) -> None:
    if type(value) not in _PLAIN:
        raise pickle.UnpicklingError(f"refused: the pickle holds a {type(value).__name__}")
    if depth > 100:
        raise pickle.UnpicklingError("refused: the pickle is nested more than 100 deep")
    if isinstance(value, list):
        for v in value:
            _check_plain(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)


def restricted_unpickle(data: bytes) -> Any:
    """The value pickled in `data`, if it is made of str, bytes, list, dict and int only; no class or
    function is ever looked up, so nothing in the pickle runs."""
    value = _PrimitiveUnpickler(io.BytesIO(data)).load()
    _check_plain(value)
    return value


def decode_compressed(text: str) -> Any:
    """LiveCodeBench's compressed tests: JSON inside a pickled string, zlib-compressed, base64-encoded."""
    try:
        packed = base64.b64decode(text, validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, MAX_DECOMPRESSED)
        if inflate.unconsumed_tail:
            raise RowError(f"compressed tests inflate to more than {MAX_DECOMPRESSED} bytes")
        inner = restricted_unpickle(raw)
    except (binascii.Error, zlib.error) as e:
        raise RowError(f"tests are neither JSON nor base64/zlib/pickle ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError) as e:
        if isinstance(e, RowError):
            raise
        raise RowError(f"compressed tests: {e}") from None
    if isinstance(inner, bytes):
        try:
            inner = inner.decode("utf-8")
        except UnicodeDecodeError:
            raise RowError("compressed tests: the pickled bytes are not UTF-8") from None
    if not isinstance(inner, str):
        raise RowError(f"compressed tests: a pickled JSON string is expected, got {type(inner).__name__}")
    return loads(inner, "compressed tests")


def loads(text: str, what: str) -> Any:
    """`json.loads` whose failures (syntax, nesting beyond Python's recursion limit) are `RowError`s."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(f"{what}: broken JSON ({e.msg})") from None
    except RecursionError:
        raise RowError(f"{what}: JSON nested too deeply") from None


def _as_list(value: Any, column: str) -> list[Any]:
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return []
        value = loads(value, column) if stripped[:1] in ("[", "{") else decode_compressed(stripped)
    if isinstance(value, dict):  # parallel lists, as deepmind/code_contests and APPS / TACO store them
        inputs = value.get("input", value.get("inputs"))
        outputs = value.get("output", value.get("outputs"))
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise RowError(f"`{column}`: a dict of tests needs `input` and `output` lists")
        if len(inputs) != len(outputs):
            raise RowError(f"`{column}`: {len(inputs)} inputs but {len(outputs)} outputs")
        return [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    if not isinstance(value, list):
        raise RowError(f"`{column}`: a list of tests is expected, got {type(value).__name__}")
    return value


def parse_tests(value: Any, column: str) -> tuple[list[dict[str, str]], set[str | None]]:
    """The tests in a row's `column` as `{"input", "output"}` strings, and the kinds their
    `testtype` names (LiveCodeBench's `stdin` and `functional`; None where there is none)."""
    if value is None:
        return [], set()
    tests, kinds = [], set()
    for k, test in enumerate(_as_list(value, column), start=1):
        if not isinstance(test, dict):
            raise RowError(f"`{column}` test {k}: an object with `input` and `output` is expected")
        if test.get("output") is None:
            raise TrustError(f"`{column}` test {k} has no expected output (any program would pass it)")
        given, expected = test.get("input", ""), test["output"]
        if not isinstance(given, str) or not isinstance(expected, str):
            raise RowError(f"`{column}` test {k}: `input` and `output` must be strings")
        kind = test.get("testtype")
        if kind not in (None, "stdin", "functional"):
            raise RowError(f"`{column}` test {k}: testtype {kind!r}; expected stdin or functional")
        kinds.add(kind)
        tests.append({"input": given, "output": expected})
    return tests, kinds


def as_functional(tests: list[dict[str, str]]) -> list[dict[str, str]]:
    """Tests of a method call: each expected output (a JSON value) rendered as the driver prints
    the method's result (`json.dumps`), so that equal values compare equal as text."""
    return [{**t, "output": json.dumps(loads(t["output"], f"test {k} output"))} for k, t in enumerate(tests, 1)]
