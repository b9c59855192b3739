"""Problem files, the grain source, and the bundled sets."""

import json
import os
import subprocess
import sys

import pytest

from magistral_jax.data.generated import LANGUAGES
from magistral_jax.data.problems import DataError, Problem, ProblemSource, read_problems
from magistral_jax.data.procedural import Example
from magistral_jax.rl.magistral_rewards import magistral

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD = [
    {"id": "a", "problem": "What is 2 + 2?", "answer": "4", "language": "english"},
    {"id": "b", "problem": "Print hello.", "tests": [{"input": "", "output": "hello\n"}]},
]


def write_jsonl(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_malformed_rows_are_skipped_with_a_count_and_reasons(tmp_path):
    lines = [
        json.dumps(GOOD[0]),
        json.dumps({"id": "c", "problem": "What is 1 + 1?"}),  # no answer
        json.dumps({"id": "d", "problem": "   ", "answer": "1"}),  # empty problem
        '{"id": "e", "problem": "broken',  # broken JSON
        json.dumps(GOOD[1]),
        json.dumps({"id": "f", "problem": "x", "answer": "1", "task": "poetry"}),
    ]
    data = read_problems(write_jsonl(tmp_path / "p.jsonl", lines))
    assert [p.id for p in data.problems] == ["a", "b"]
    assert data.problems[1].task == "code" and data.problems[0].task == "math"
    assert data.skipped == 4
    assert "line 2" in data.reasons[0] and "neither `answer` nor `tests`" in data.reasons[0]
    assert "line 3" in data.reasons[1] and "empty" in data.reasons[1]
    assert "line 4" in data.reasons[2] and "broken JSON" in data.reasons[2]
    assert "poetry" in data.reasons[3]
    assert len(read_problems(str(tmp_path / "p.jsonl"), keep_reasons=2).reasons) == 2
    with pytest.raises(DataError, match="line 2: neither"):
        read_problems(str(tmp_path / "p.jsonl"), strict=True)


def test_unreadable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no usable problems"):
        read_problems(write_jsonl(tmp_path / "bad.jsonl", ["{}", "[1]"]))
    with pytest.raises(DataError, match=r"\.jsonl, \.parquet or \.csv"):
        read_problems(write_jsonl(tmp_path / "p.txt", ["a,b"]))
    with pytest.raises(DataError, match="bundled: math_multilingual, python_tasks"):
        read_problems("bundled:nope")


def test_parquet_rows_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**GOOD[0], "tests": None}, {**GOOD[1], "answer": None, "language": None, "id": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    data = read_problems(str(tmp_path / "p.parquet"))
    assert [(p.id, p.task, p.answer) for p in data.problems] == [("a", "math", "4"), ("b", "code", None)]
    assert data.problems[1].tests == GOOD[1]["tests"]


def ids_source(n=20, seed=0, **kw):
    problems = [Problem(id=str(i), problem=f"p{i}", answer="0") for i in range(n)]
    return ProblemSource(problems, lambda p: Example([int(p.id)], None, {}), seed=seed, **kw)


def draw(source, n):
    return [e.prompt[0] for e in source.next(n)]


def test_source_is_a_seeded_shuffle_of_every_problem_each_epoch():
    a, b, c = draw(ids_source(seed=1), 40), draw(ids_source(seed=1), 40), draw(ids_source(seed=2), 40)
    assert a == b and a != c
    assert sorted(a[:20]) == list(range(20)) and sorted(a[20:]) == list(range(20))
    assert a[:20] != list(range(20)) and a[:20] != a[20:]  # shuffled, and reshuffled per epoch


def test_source_state_resumes_exactly():
    src = ids_source(seed=3)
    draw(src, 13)
    state = json.loads(json.dumps(src.state()))  # what the checkpoint stores
    expected = draw(src, 30)
    resumed = ids_source(seed=3)
    resumed.restore(state)
    assert draw(resumed, 30) == expected


def test_hosts_draw_disjoint_shards_that_cover_the_set():
    shards = [set(draw(ids_source(n=21, seed=0, shard_index=i, shard_count=3), 7)) for i in range(3)]
    assert set().union(*shards) == set(range(21)) and sum(map(len, shards)) == 21
    with pytest.raises(DataError, match="holds no problems"):
        ids_source(n=2, shard_index=2, shard_count=3)


def test_bundled_files_are_reproducible():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_datasets.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_bundled_math_covers_languages_and_levels_and_its_traces_earn_the_full_reward():
    problems = read_problems("bundled:math_multilingual").problems
    assert {p.language for p in problems} == set(LANGUAGES)
    assert {p.level for p in problems} == {1, 2, 3, 4}
    sample = problems[::40]  # one problem of every (level, language) cell
    out = magistral([p.problem for p in sample], [p.trace for p in sample], answer=[p.answer for p in sample])
    assert out.rewards == [pytest.approx(1.1)] * len(sample), [r for r in out.reasons if r]


def test_bundled_code_tasks_have_tests():
    problems = read_problems("bundled:python_tasks").problems
    assert len(problems) >= 10 and all(p.task == "code" and len(p.tests) >= 10 for p in problems)
