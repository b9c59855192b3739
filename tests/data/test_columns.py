"""Public data sets read without code: column maps, answer formats, code tests in their published
forms (LiveCodeBench's compressed ones through a restricted unpickler), and the rows the grader
cannot trust."""

import base64
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from magistral_jax.data.columns import restricted_unpickle
from magistral_jax.data.problems import DataError, read_problems
from magistral_jax.data.sources import make_source


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pickled(value) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(value))).decode()


def compress(value) -> str:
    """LiveCodeBench's published encoding of private tests."""
    return pickled(json.dumps(value))


GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    {"question": "No final line here.", "answer": "The answer is 5."},
]
MATH = [
    {
        "problem": "Simplify $\\frac{1}{\\sqrt{2}}$.",
        "solution": "First $\\boxed{x}$ is a guess. Rationalise: $\\boxed{\\frac{\\sqrt{2}}{2}}$.",
        "level": "Level 2",
    },
    {"problem": "Unfinished.", "solution": "so the answer is \\boxed{\\frac{1}{2}"},
]


def test_gsm8k_math_and_deepscaler_columns_map_without_code(tmp_path):
    gsm = read_problems(jsonl(tmp_path / "gsm8k.jsonl", GSM8K), fields={"problem": "question"}, answer_format="gsm8k")
    assert [(p.problem[:12], p.answer) for p in gsm.problems] == [("Natalia sold", "72"), ("A farm has 1", "1234")]
    assert gsm.skipped == 1 and "gsm8k.jsonl line 3: `answer` has no `#### ANSWER`" in gsm.reasons[0]

    pq.write_table(pa.Table.from_pylist(MATH), tmp_path / "math.parquet")
    math = read_problems(tmp_path / "math.parquet", fields={"answer": "solution"}, answer_format="boxed")
    # the last \boxed{}, nested braces kept whole; the unbalanced one is skipped
    assert [p.answer for p in math.problems] == ["\\frac{\\sqrt{2}}{2}"]
    assert math.skipped == 1 and "row 1: `answer` has no complete \\boxed{...}" in math.reasons[0]
    assert math.problems[0].level == 2  # MATH writes "Level 2"

    deepscaler = [{"problem": "Compute $2^{10}$.", "answer": "1024", "solution": "... \\boxed{1024}"}]
    (p,) = read_problems(jsonl(tmp_path / "deepscaler.jsonl", deepscaler)).problems
    assert (p.problem, p.answer, p.task) == ("Compute $2^{10}$.", "1024", "math")


def test_candidate_columns_and_a_mapping_that_names_no_field(tmp_path):
    rows = [
        {"Problem": "1+1?", "Answer": 2},
        {"question": "2+2?", "answer": 4.0},
        {"question": "no", "problem": "3?", "answer": "3"},
    ]
    fields = {"problem": ["problem", "Problem", "question"], "answer": ["answer", "Answer"]}
    problems = read_problems(jsonl(tmp_path / "p.jsonl", rows), fields=fields).problems
    assert [(p.problem, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4.0"), ("3?", "3")]
    with pytest.raises(ValueError, match="'question' is not a problem field"):
        read_problems(tmp_path / "p.jsonl", fields={"question": "problem"})


TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]


def test_code_tests_in_each_published_form(tmp_path):
    apps_tests = json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]})
    rows = [
        {"id": "list", "problem": "Add.", "tests": TESTS},
        # deepmind/code_contests: parallel lists
        {
            "id": "parallel",
            "problem": "Add.",
            "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
            "private_tests": {"input": ["5 5\n"], "output": ["10\n"]},
        },
        # APPS / TACO: JSON text of parallel lists
        {"id": "apps", "problem": "Add.", "tests": apps_tests},
        # LiveCodeBench: JSON public tests, compressed private tests
        {
            "id": "lcb",
            "problem": "Add.",
            "public_tests": json.dumps([{**TESTS[0], "testtype": "stdin"}]),
            "private_tests": compress([{**TESTS[1], "testtype": "stdin"}]),
        },
    ]
    data = read_problems(jsonl(tmp_path / "code.jsonl", rows))
    assert data.skipped == 0
    for p in data.problems:
        assert (p.task, p.tests, p.fn_name) == ("code", TESTS, None), p.id


def test_functional_tests_are_rendered_as_the_driver_prints_results(tmp_path):
    tests = [{"input": "[2,7,11,15]\n9", "output": "[0,1]", "testtype": "functional"}]
    rows = [
        {"id": "f", "problem": "Two sum.", "public_tests": json.dumps(tests), "fn_name": "twoSum"},
        {"id": "no-name", "problem": "Two sum.", "public_tests": json.dumps(tests)},
        # an explicit stdin test ignores a stray method name
        {"id": "stdin", "problem": "Add.", "tests": [{**TESTS[0], "testtype": "stdin"}], "fn_name": "solve"},
    ]
    data = read_problems(jsonl(tmp_path / "f.jsonl", rows))
    assert [(p.id, p.fn_name, p.tests) for p in data.problems] == [
        ("f", "twoSum", [{"input": "[2,7,11,15]\n9", "output": "[0, 1]"}]),
        ("stdin", None, [TESTS[0]]),
    ]
    assert data.skipped == 1 and "line 2: functional tests need `fn_name`" in data.reasons[0]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = pickled(Exploit(marker))
    with pytest.raises(pickle.UnpicklingError, match=r"refused: the pickle names (posix|os)\.system"):
        restricted_unpickle(zlib.decompress(base64.b64decode(evil)))
    rows = [
        {"id": "good", "problem": "Add.", "private_tests": compress(TESTS)},
        {"id": "evil", "problem": "Add.", "private_tests": evil},
        # plain data of a type the tests never hold (a float, a tuple) is refused too
        {"id": "float", "problem": "Add.", "private_tests": pickled(1.5)},
        {"id": "tuple", "problem": "Add.", "private_tests": pickled(("a",))},
    ]
    data = read_problems(jsonl(tmp_path / "lcb.jsonl", rows))
    assert [p.id for p in data.problems] == ["good"] and data.problems[0].tests == TESTS
    assert data.skipped == 3
    assert "line 2: compressed tests: refused: the pickle names" in data.reasons[0]
    assert "holds a float" in data.reasons[1] and "holds a tuple" in data.reasons[2]
    with pytest.raises(DataError, match="line 2: compressed tests: refused"):
        read_problems(tmp_path / "lcb.jsonl", strict=True)
    assert not marker.exists()
    assert restricted_unpickle(pickle.dumps({"a": [1, "x", b"y"]})) == {"a": [1, "x", b"y"]}


def test_rows_the_grader_cannot_trust_are_errors_naming_the_line(tmp_path):
    good = {"id": "a", "problem": "Add.", "tests": TESTS}
    for bad, message in [
        ({"id": "b", "problem": "Add.", "tests": [TESTS[0], {"input": "1 1\n"}]}, "`tests` test 2 has no expected"),
        ({"id": "b", "problem": "Add.", "tests": [{"input": "1\n", "output": None}]}, "`tests` test 1 has no expected"),
        ({"id": "b", "problem": "Add.", "tests": [{"input": "1\n", "output": " \n"}]}, "every test expects an empty"),
        ({"id": "a", "problem": "Again.", "answer": "1"}, r"duplicate id 'a' \(first at p.jsonl line 1\)"),
    ]:
        path = jsonl(tmp_path / "p.jsonl", [good, bad])
        with pytest.raises(DataError, match=f"p.jsonl line 2: {message}"):
            read_problems(path)  # not skipped, even without --strict
    pq.write_table(pa.Table.from_pylist([{"id": 7, "problem": "x", "answer": "1"}] * 2), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet row 1: duplicate id '7' \(first at p.parquet row 0\)"):
        read_problems(tmp_path / "p.parquet")


def test_files_that_are_not_utf8_are_errors_naming_the_line(tmp_path):
    lines = [json.dumps({"problem": "1+1?", "answer": "2"}).encode()] * 2 + [b'{"problem": "caf\xe9?", "answer": "1"}']
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl line 3: not UTF-8 \(byte 0xe9 at column 17\)"):
        read_problems(tmp_path / "latin1.jsonl")
    (tmp_path / "latin1.csv").write_bytes(b'problem,answer\n1+1?,2\n"two\nlines",3\ncaf\xe9?,4\n')
    with pytest.raises(DataError, match=r"latin1.csv line 5: not UTF-8 \(byte 0xe9\)"):
        read_problems(tmp_path / "latin1.csv")
    # a BOM (as spreadsheets write it) is not a problem; quoted newlines keep line numbers right
    (tmp_path / "ok.csv").write_bytes('\ufeffproblem,answer\n"two\nlines",3\n,4\n'.encode())
    data = read_problems(tmp_path / "ok.csv")
    assert [(p.problem, p.answer) for p in data.problems] == [("two\nlines", "3")]
    assert data.reasons == ["ok.csv line 4: empty or missing `problem`"]


class FirstLetter:
    """Stands in for a tokenizer: the prompt is the problem's first character."""

    def encode_chat(self, text, system_prompt):
        return [ord(text[0])]


def test_the_training_source_reports_skipped_rows_on_stderr(tmp_path, capsys):
    rows = [
        {"id": "a", "problem": "1+1?", "answer": "2"},
        {"id": "b", "problem": "No answer."},
        "{broken",
        {
            "id": "f",
            "problem": "Two sum.",
            "fn_name": "twoSum",
            "tests": [{"input": "[1]\n1", "output": "[0]", "testtype": "functional"}],
        },
    ]
    spec = {"name": "problems", "path": jsonl(tmp_path / "train.jsonl", rows), "system_prompt": "none"}
    source = make_source(spec, seed=0, tokenizer=FirstLetter())
    err = capsys.readouterr().err
    assert "train.jsonl: skipped 2 malformed rows; first: train.jsonl line 2: neither `answer` nor `tests`" in err
    assert "train.jsonl line 3: broken JSON" in err
    assert "left out 1 problems with functional tests" in err
    assert {e.fields["problem"] for e in source.next(4)} == {"1+1?"}  # the only problem the reward can grade
    with pytest.raises(DataError, match=r"train\.jsonl line 2: neither"):
        make_source({**spec, "strict": True}, seed=0, tokenizer=FirstLetter())
    mapped = {**spec, "path": jsonl(tmp_path / "gsm.jsonl", GSM8K[:2]), "fields": {"problem": "question"}}
    make_source({**mapped, "answer_format": "gsm8k"}, seed=0, tokenizer=FirstLetter())
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="answer_format: 'latex'"):
        make_source({**mapped, "answer_format": "latex"}, seed=0, tokenizer=FirstLetter())
