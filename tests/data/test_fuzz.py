"""Seeded random mutations of valid data rows (JSONL, Parquet, the benchmarks' schemas) thrown at the
readers: each case must end in a clean `DataError` naming the file, or a load whose problems are well
formed and whose untouched rows read exactly as before."""

import base64
import json
import os
import pickle
import random
import zlib

import pyarrow as pa
import pyarrow.parquet as pq

from magistral_jax.data.benchmarks import read_benchmark
from magistral_jax.data.problems import DataError, Problem, read_problems

TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "4 4\n", "output": "8\n"}]
LCB_TESTS = json.dumps([{**t, "testtype": "stdin"} for t in TESTS])
# (reader, valid rows): the generic reader, and each benchmark's schema
CASES = {
    None: [
        {"id": "m", "problem": "What is 2 + 2?", "answer": "4", "language": "english", "level": 1},
        {"id": "c", "problem": "Add two numbers.", "tests": TESTS, "task": "code"},
        {
            "id": "f",
            "problem": "Two sum.",
            "fn_name": "twoSum",
            "tests": [{"input": "[1, 2]\n3", "output": "[0, 1]", "testtype": "functional"}],
        },
    ],
    "aime24": [
        {"id": 1, "problem": "Find $x$.", "answer": "042"},
        {"ID": "2024-I-2", "Problem": "Find $y$.", "Answer": 7},
    ],
    "gpqa-diamond": [
        {
            "Question": "Which?",
            "Correct Answer": "a",
            "Incorrect Answer 1": "b",
            "Incorrect Answer 2": "c",
            "Incorrect Answer 3": "d",
            "Record ID": "rec1",
        },
    ],
    "livecodebench-v5": [
        {
            "question_id": "q1",
            "question_content": "Add.",
            "starter_code": "",
            "metadata": "{}",
            "public_test_cases": LCB_TESTS,
            "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(LCB_TESTS))).decode(),
        },
    ],
}
ID_COLUMNS = ("id", "ID", "Record ID", "question_id")
JUNK = [None, 0, -1, 2**70, 1.5, float("nan"), True, "", " ", "x", [], {}, [1, "a"], {"a": [None]}, [[[[]]]], "\x00"]


def junk(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(JUNK)
    if kind == 1:
        return "é" * rng.choice([10, 100_000])  # huge strings
    if kind == 2:  # nested junk
        value = rng.choice(JUNK)
        for _ in range(rng.randrange(1, 40)):
            value = rng.choice([[value], {"input": value, "output": value}, {"k": value}])
        return value
    if kind == 3:
        return {"input": rng.choice(JUNK), "output": rng.choice(JUNK), "testtype": rng.choice([*JUNK, "functional"])}
    return base64.b64encode(zlib.compress(pickle.dumps(rng.choice(JUNK)))).decode()  # odd "compressed tests"


def mutate_row(rng: random.Random, row: dict) -> dict:
    row = json.loads(json.dumps(row))
    keys = list(row)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        key = rng.choice(keys)
        if op == 0 and key in row:
            del row[key]  # missing field
        elif op == 1:
            row[key] = junk(rng)  # type swap
        elif op == 2 and isinstance(row.get(key), list) and row[key]:
            row[key][rng.randrange(len(row[key]))] = junk(rng)  # junk inside a list (tests)
        else:
            row[rng.choice(["id", "tests", "fn_name", "task", "level", "private_tests", "metadata"])] = junk(rng)
    return row


def mutate_line(rng: random.Random, line: bytes) -> bytes:
    op = rng.randrange(6)
    cut = rng.randrange(len(line) + 1)
    if op == 0:
        return line[:cut] + bytes([rng.choice([0x80, 0xC3, 0xE9, 0xFF, 0xED])]) + line[cut:]  # invalid UTF-8
    if op == 1:
        return line[:cut]  # truncated
    if op == 2:
        return b"[" * rng.choice([10, 20_000]) + b"]" * rng.choice([0, 10, 20_000])  # deep nesting
    if op == 3:
        return line.replace(b'"', b"", 1)
    if op == 4:
        return line[:-1] + b', "problem": "\\ud800"}'  # a lone surrogate, a duplicate key
    return line.replace(b"4", b"NaN", 1)


def well_formed(p: Problem) -> bool:
    ok = isinstance(p.id, str) and isinstance(p.problem, str) and p.problem.strip() and p.task in ("math", "code")
    ok = ok and (p.answer is None or (isinstance(p.answer, str) and p.answer.strip()))
    ok = ok and (p.tests is None or all(set(t) == {"input", "output"} for t in p.tests))
    ok = ok and all(isinstance(v, str) for t in p.tests or [] for v in t.values())
    ok = ok and (p.answer is not None or bool(p.tests)) and (p.level is None or type(p.level) is int)
    ok = ok and (p.fn_name is None or p.fn_name.isidentifier()) and (p.language is None or isinstance(p.language, str))
    try:
        json.dumps([p.problem, p.answer, p.tests, p.language], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(ok)


def read(path, benchmark):
    return read_benchmark(benchmark, path) if benchmark else read_problems(path)


def check(path, benchmark, baseline, failures, label):
    try:
        loaded = read(path, benchmark).problems
    except DataError as e:
        if os.path.basename(path) not in str(e) or "\n" in str(e):
            failures.append(f"{label}: unclear error {str(e)[:200]!r}")
        return
    except Exception as e:  # anything else is a bug of the reader
        failures.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
        return
    bad = [p.id for p in loaded if not well_formed(p)]
    if bad:
        failures.append(f"{label}: malformed problems loaded: {bad}")
    untouched = [p for p in loaded if p.id in baseline and p.id != "mutated"]
    if any(p != baseline[p.id] for p in untouched):
        failures.append(f"{label}: an untouched row read differently")


def test_mutated_rows_give_clean_errors_or_correct_loads(tmp_path):
    rng = random.Random(2509)
    failures, parquet_cases, cases = [], 0, 0
    for benchmark, rows in CASES.items():
        good = tmp_path / f"good-{benchmark}.jsonl"
        good.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        baseline = {p.id: p for p in read(str(good), benchmark).problems}
        for i in range(75):
            cases += 1
            original = rng.choice(rows)
            label = f"case {benchmark}/{i}"
            path = tmp_path / f"case{i}.jsonl"
            line = json.dumps({**original, **{k: "mutated" for k in ID_COLUMNS if k in original}}).encode()
            if i % 3 == 0:
                line = mutate_line(rng, line)
            else:
                line = json.dumps(mutate_row(rng, json.loads(line))).encode()
            path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + line + b"\n")
            check(str(path), benchmark, baseline, failures, label)
            if i % 5 == 0:  # the same mutated row as Parquet, when pyarrow can store it
                try:
                    row = mutate_row(rng, {**original, **{k: "mutated" for k in ID_COLUMNS if k in original}})
                    pq.write_table(pa.Table.from_pylist([row]), tmp_path / f"case{i}.parquet")
                except (pa.ArrowException, OverflowError, ValueError, TypeError):
                    continue  # a row Parquet cannot store is not a case for the reader
                parquet_cases += 1
                check(str(tmp_path / f"case{i}.parquet"), benchmark, baseline, failures, label + " parquet")
    # corrupted Parquet files: flipped and truncated bytes
    pq.write_table(pa.Table.from_pylist(CASES[None][:2]), tmp_path / "valid.parquet")
    valid = (tmp_path / "valid.parquet").read_bytes()
    for i in range(40):
        cases += 1
        data = bytearray(valid)
        if i % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
        check(str(tmp_path / "corrupt.parquet"), None, {}, failures, f"corrupt parquet {i}")
    assert cases >= 300 and parquet_cases >= 20
    assert not failures, "\n".join(failures[:20])
