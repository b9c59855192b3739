"""The paper's benchmarks read from a few rows in each published schema, and LiveCodeBench graded
through the training reward's sandbox (stdin programs and LeetCode-style method calls)."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import GPQA_HEADER, lcb_compressed

from magistral_jax.data.benchmarks import GPQA_INSTRUCTION, read_benchmark
from magistral_jax.data.sources import problem_fields
from magistral_jax.evaluation import with_call_driver
from magistral_jax.rl.magistral_rewards import magistral, math_correct


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_aime_in_the_common_schemas(tmp_path):
    # HuggingFaceH4/aime_2024 and AI-MO/aimo-validation-aime: lower-case, string answers
    h4 = [{"id": 60, "problem": "Every morning Aya goes for a $9$-kilometer-long walk...", "solution": "...",
           "answer": "204", "url": "https://artofproblemsolving.com/...", "year": "2024"}]  # fmt: skip
    # Maxwell-Jia/AIME_2024 (Parquet): capitalised, integer answers
    pq.write_table(
        pa.Table.from_pylist(
            [{"ID": "2024-I-2", "Problem": "There exist real numbers...", "Solution": "...", "Answer": 25}]
        ),
        tmp_path / "maxwell.parquet",
    )
    # opencompass/AIME2025: question / answer, no id
    oc = [{"question": "Find the sum of all integer bases $b>9$...", "answer": "70"}]
    assert [(p.id, p.answer, p.task) for p in read_benchmark("aime24", jsonl(tmp_path / "h4.jsonl", h4)).problems] == [
        ("60", "204", "math")
    ]
    (p,) = read_benchmark("aime24", str(tmp_path / "maxwell.parquet")).problems
    assert (p.id, p.problem, p.answer) == ("2024-I-2", "There exist real numbers...", "25")
    (p,) = read_benchmark("aime25", jsonl(tmp_path / "oc.jsonl", oc)).problems
    assert (p.id, p.answer) == ("oc.jsonl line 1", "70")
    bad = read_benchmark("aime25", jsonl(tmp_path / "bad.jsonl", [*oc, {"question": "no answer"}]))
    assert bad.skipped == 1 and "no answer column (answer / Answer)" in bad.reasons[0]


def gpqa_row(i):
    return {"Pre-Revision Question": "old", "Question": f"Question {i}: which particle, \"quoted\", decays?",
            "Correct Answer": f" right {i}\n", "Incorrect Answer 1": f"wrong a{i}", "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}", "Explanation": "long,\nmulti-line, text", "Record ID": f"rec{i}",
            "High-level domain": "Physics"}  # fmt: skip


def write_gpqa(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, GPQA_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def options(problem_text):
    lines = problem_text.split("\n\n")[1].split("\n")
    return {line[0]: line[3:] for line in lines}


def test_gpqa_options_are_shuffled_with_a_seed_fixed_per_question(tmp_path):
    rows = [gpqa_row(i) for i in range(24)]
    problems = read_benchmark("gpqa-diamond", write_gpqa(tmp_path / "gpqa_diamond.csv", rows)).problems
    assert len(problems) == 24
    for i, p in enumerate(problems):
        opts = options(p.problem)
        assert sorted(opts) == ["A", "B", "C", "D"] and p.problem.endswith(GPQA_INSTRUCTION)
        assert opts[p.answer] == f"right {i}"  # the answer is the correct option's letter (stripped)
        assert sorted(opts.values()) == sorted([f"right {i}", f"wrong a{i}", f"wrong b{i}", f"wrong c{i}"])
    letters = [p.answer for p in problems]
    assert set(letters) == {"A", "B", "C", "D"}  # shuffled, not always first
    # fixed per question: another file, another order of rows, the same letters
    again = read_benchmark("gpqa-diamond", write_gpqa(tmp_path / "copy.csv", rows[::-1])).problems
    assert {p.id: (p.problem, p.answer) for p in again} == {p.id: (p.problem, p.answer) for p in problems}
    # snake_case copies read the same
    snake = [{k.lower().replace(" ", "_"): v for k, v in r.items()} for r in rows[:3]]
    pq.write_table(pa.Table.from_pylist(snake), tmp_path / "snake.parquet")
    assert [p.answer for p in read_benchmark("gpqa-diamond", str(tmp_path / "snake.parquet")).problems] == letters[:3]
    # graded as a boxed letter by the reward's verifier
    assert math_correct(f"so \\boxed{{{letters[0]}}}", letters[0])
    assert not math_correct(f"\\boxed{{{'A' if letters[0] != 'A' else 'B'}}}", letters[0])


STDIN = [
    {"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
    {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
    {"input": "7 7\n", "output": "14\n", "testtype": "stdin"},
]
CALLS = [{"input": "[2,7,11,15]\n9", "output": "[0,1]", "testtype": "functional"},
         {"input": "[3,2,4]\n6", "output": "[1,2]", "testtype": "functional"}]  # fmt: skip
LCB = [
    {"question_title": "Sum", "question_content": "Read a and b; print a + b.", "platform": "atcoder",
     "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2024-08-03T00:00:00", "starter_code": "",
     "difficulty": "easy", "public_test_cases": json.dumps(STDIN[:1]), "private_test_cases": lcb_compressed(STDIN[1:]),
     "metadata": "{}"},
    {"question_title": "Two Sum", "question_content": "Return the indices of the two numbers adding up to target.",
     "platform": "leetcode", "question_id": "1", "contest_id": "weekly-1", "contest_date": "2024-09-01T00:00:00",
     "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
     "difficulty": "easy", "public_test_cases": json.dumps(CALLS[:1]), "private_test_cases": lcb_compressed(CALLS[1:]),
     "metadata": json.dumps({"func_name": "twoSum"})},
]  # fmt: skip
SUM = "[THINK]Read and add.[/THINK]\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
TWO_SUM = """[THINK]A dictionary of seen values.[/THINK]
```python
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i

if __name__ == "__main__":
    print(Solution().twoSum([1, 2], 3))
```"""


def score(problem, completions):
    f = problem_fields(problem)
    graded = [with_call_driver(c, problem.fn_name, "v13") for c in completions]
    n = len(completions)
    out = magistral([problem.problem] * n, graded, task=["code"] * n, tests=[problem.tests] * n,
                    test_seed=[f["test_seed"]] * n, language_reward=False, max_tests=1 << 30)  # fmt: skip
    return out.rewards, out.reasons


def test_livecodebench_rows_are_graded_in_the_sandbox_on_every_test(tmp_path):
    stdin, calls = read_benchmark("livecodebench-v5", jsonl(tmp_path / "lcb.jsonl", LCB)).problems
    assert (stdin.id, stdin.task, stdin.fn_name) == ("abc001_a", "code", None)
    assert stdin.tests == [{"input": t["input"], "output": t["output"]} for t in STDIN]  # public + decompressed private
    assert "standard input" in stdin.problem and "```python\nclass Solution" in calls.problem
    assert calls.fn_name == "twoSum" and [t["output"] for t in calls.tests] == ["[0, 1]", "[1, 2]"]

    wrong_last = SUM.replace("print(a + b)", "print(a + b if a != 7 else 0)")  # fails only a private test
    rewards, reasons = score(stdin, [SUM, wrong_last, "[THINK]x[/THINK]\n```python\npass\n```"])
    assert rewards == [pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.1)]
    assert reasons[1] == "code: test 3/3: wrong output" and reasons[2].startswith("code: test 1/3")

    swapped = TWO_SUM.replace("[seen[target - x], i]", "[i, seen[target - x]]")
    rewards, reasons = score(calls, [TWO_SUM, swapped, "[THINK]x[/THINK]\n```python\npass\n```"])
    # the `__main__` block of the answer does not run, the method is called on each test
    assert rewards == [pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.1)], reasons
    assert "wrong output" in reasons[1] and "KeyError: 'twoSum'" in reasons[2]
