"""`magistral-jax score`, `eval` and `filter`, end to end."""

import json

import pytest
from helpers import run_cli
from test_evaluation import PROBLEMS, SAMPLES, sample

from magistral_jax.cli import evaluate, main
from magistral_jax.data.problems import ProblemSet

PROBLEMS_ROWS = [
    {"id": "m1", "problem": "Tom has 3 apples and gets 4 more. How many apples does Tom have now?", "answer": "7"},
    {"id": "m2", "problem": "Marie a 3 pommes et en reçoit 4 de plus. Combien de pommes a-t-elle ?", "answer": "7"},
    {"id": "c1", "problem": "Print the sum of two integers.", "tests": [{"input": "1 2\n", "output": "3\n"}]},
]
CODE = "[THINK]Read, add, print.[/THINK]\n```python\nprint(sum(map(int, input().split())))\n```"
THINK = "I add the two numbers: three plus four makes seven apples in total."
COMPLETIONS = [
    ({"id": "m1", "completion": f"[THINK]{THINK}[/THINK]The answer is \\boxed{{7}}."}, 1.1, None),
    ({"id": "m1", "completion": f"[THINK]{THINK}[/THINK]The answer is \\boxed{{8}}."}, 0.2, "incorrect"),
    ({"id": "m1", "completion": f"{THINK} The answer is \\boxed{{7}}."}, 0.0, "format: does not start"),
    ({"id": "m2", "completion": f"[THINK]{THINK}[/THINK]La réponse est \\boxed{{7}}."}, 1.0, "languages differ"),
    (
        {
            "id": "c1",
            "completion": "[THINK]Read, add, print.[/THINK]\n```python\nprint(sum(map(int, input().split())))\n```",
        },
        1.1,
        None,
    ),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_score_writes_one_line_per_completion(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS_ROWS)
    comps = write_jsonl(tmp_path / "completions.jsonl", [c for c, _, _ in COMPLETIONS])
    out = run_cli("score", "--data", data, "--completions", comps, "--workers", 1)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in lines] == [c["id"] for c, _, _ in COMPLETIONS]
    for r, (_, reward, reason) in zip(lines, COMPLETIONS, strict=True):
        assert r["reward"] == pytest.approx(reward)
        assert set(r["components"]) == {"format", "correct", "length", "language"}
        assert r["reward"] == pytest.approx(sum(r["components"].values()))
        assert (r["reason"] is None) if reason is None else r["reason"].startswith(reason)


def test_score_think_tags_style_and_the_length_penalty(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS_ROWS)
    rows = [{"id": "m1", "completion": f"<think>{THINK}</think>The answer is \\boxed{{7}}.", "n_tokens": 950}]
    comps = write_jsonl(tmp_path / "c.jsonl", rows)
    out = run_cli("score", "--data", data, "--completions", comps, "--style", "think-tags", "--workers", 0,
                  "--l-max", 1000, "--l-cache", 100, "--out", tmp_path / "out.jsonl")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (r,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert r["components"]["length"] == pytest.approx(-0.05) and r["reward"] == pytest.approx(1.05)
    out = run_cli("score", "--data", data, "--completions", comps, "--workers", 0)  # v13: the tags are text
    assert json.loads(out.stdout)["reward"] == 0.0


def test_score_refuses_bad_completion_files(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS_ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "m1", "completion": "x"}\n{"id": "zz", "completion": "x"}\nnot json\n{"id": "m1"}\n')
    out = run_cli("score", "--data", data, "--completions", bad, "--workers", 0)
    assert out.returncode == 1 and out.stdout == ""
    assert "line 2: id 'zz' names no problem" in out.stderr
    assert "line 3: not JSON" in out.stderr and "line 4: an object with a string `completion`" in out.stderr
    comps = write_jsonl(tmp_path / "c.jsonl", [{"id": "m1", "completion": "x"}])
    out = run_cli("score", "--data", data, "--completions", comps, "--l-max", 10)
    assert out.returncode == 1 and "needs an integer `n_tokens`" in out.stderr


@pytest.fixture
def fake_sampling(monkeypatch):
    monkeypatch.setattr(evaluate, "_problems", lambda args, path, benchmark: ProblemSet(list(PROBLEMS)))
    monkeypatch.setattr(evaluate, "_open", lambda args: None)
    monkeypatch.setattr(evaluate, "_sample", lambda args, opened, s: SAMPLES)


def test_filter_keeps_the_band(tmp_path, fake_sampling, capsys):
    out = tmp_path / "kept.jsonl"
    assert main(["filter", "--checkpoint", "x", "--data", "x", "--out", str(out)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["pass_rate"]) for r in kept] == [("en", pytest.approx(1 / 3)), ("fr", pytest.approx(2 / 3))]
    assert kept[0]["answer"] == "2" and "tests" not in kept[0]
    assert "kept 2 of 3" in capsys.readouterr().out
    out2 = tmp_path / "kept2.jsonl"
    assert main(["filter", "--checkpoint", "x", "--data", "x", "--out", str(out2), "--min-pass-rate", "0.5"]) == 0
    assert [json.loads(line)["id"] for line in out2.read_text().splitlines()] == ["fr"]
    assert main(["filter", "--checkpoint", "x", "--data", "x", "--out", str(out)]) == 1  # exists
    assert main(["filter", "--checkpoint", "x", "--data", "x", "--out", "y", "--min-pass-rate", "1"]) == 1


def test_eval_writes_report_samples_and_plot(tmp_path, fake_sampling, capsys):
    assert main(["eval", "--checkpoint", "x", "--data", "x", "--k", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pass@1"] == pytest.approx(2 / 3) and report["maj@3"] == pytest.approx(0.5)
    assert set(report["per_language"]) == {"english", "french"}
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 9
    assert (tmp_path / "report.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "maj@3" in table and "66.7%" in table


def test_eval_end_to_end_on_a_random_checkpoint(tekken_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS_ROWS)
    out = run_cli("eval", "--checkpoint", tekken_checkpoint, "--data", data, "--k", 2, "--max-new-tokens", 6,
                  "--dtype", "float32", "--workers", 0, "--out", tmp_path / "ev")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(1 <= s["length"] <= 6 for s in samples)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    # a random model never opens a thinking block: the figures follow from the samples
    assert report["format"] == sum(s["components"]["format"] > 0 for s in samples) / 6
    assert report["pass@1"] == 0.0 and all(s["reason"].startswith("format:") for s in samples)


def _benchmark_files(tmp_path):
    aime = write_jsonl(
        tmp_path / "aime24.jsonl", [{"id": i, "problem": f"Find {i}.", "answer": f"0{i}"} for i in (1, 2)]
    )
    gpqa = tmp_path / "gpqa.csv"
    gpqa.write_text(
        "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3,Record ID\n"
        "Which?,yes,no,maybe,never,rec1\n",
        encoding="utf-8",
    )
    tests = json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}])
    lcb = write_jsonl(tmp_path / "lcb.jsonl", [{"question_id": "q", "question_content": "Add one.",
                                               "public_test_cases": tests, "private_test_cases": "[]"}])  # fmt: skip
    return aime, gpqa, lcb


def test_eval_benchmarks_follow_the_protocol_and_print_the_papers_table(tmp_path, monkeypatch, capsys):
    aime, gpqa, lcb = _benchmark_files(tmp_path)
    seen = {}

    def fake_sample(args, opened, s):  # hand-made scored samples per benchmark
        seen[s.name] = (s.k, s.max_new_tokens, s.reward, args.temperature, args.top_p)
        if s.benchmark == "aime24":  # problem 1: 1 of 4 correct but "01" and "1" win the vote; problem 2: 0 of 4
            boxed = [("01", True), ("1", True), ("7", False), ("1.0", True)], [("3", False)] * 4
            return [sample(i, b, c) for i, group in enumerate(boxed) for b, c in group]
        if s.benchmark == "gpqa-diamond":
            return [sample(0, "B", False), sample(0, "C", True), sample(0, "B", False)]
        return [sample(0, None, True), sample(0, None, False)]

    monkeypatch.setattr(evaluate, "_open", lambda args: None)
    monkeypatch.setattr(evaluate, "_sample", fake_sample)
    out = tmp_path / "ev"
    argv = ["eval", "--checkpoint", "ckpts/m2509", "--out", str(out)]
    for name, path in (("aime24", aime), ("gpqa-diamond", gpqa), ("livecodebench-v5", lcb)):
        argv += ["--benchmark", name, "--data", str(path)]
    assert main(argv) == 0
    # the paper's protocol: temperature 0.7, top-p 0.95, 40,960 tokens, k 64 (AIME) and 16
    assert seen == {
        "aime24": (64, 40960, {}, 0.7, 0.95),
        "gpqa-diamond": (16, 40960, {}, 0.7, 0.95),
        "livecodebench-v5": (16, 40960, {"max_tests": 1 << 30}, 0.7, 0.95),
    }
    report = json.loads((out / "report.json").read_text())
    aime_r, gpqa_r, lcb_r = (report["benchmarks"][n] for n in ("aime24", "gpqa-diamond", "livecodebench-v5"))
    assert aime_r["pass@1"] == pytest.approx((3 / 4 + 0) / 2) and aime_r["maj@64"] == 0.5
    assert gpqa_r["pass@1"] == pytest.approx(1 / 3) and gpqa_r["maj@16"] == 0.0
    assert lcb_r["pass@1"] == 0.5 and lcb_r["maj@16"] is None  # code has no vote
    assert aime_r["per_language"] == {} and report["temperature"] == 0.7 and report["top_p"] == 0.95
    header, row = capsys.readouterr().out.splitlines()[:2]
    # one row per checkpoint, one column per figure, as the paper's table
    assert header.split() == ["AIME'24", "pass@1", "AIME'24", "maj@64", "GPQA", "Diamond", "pass@1", "GPQA",
                              "Diamond", "maj@16", "LiveCodeBench", "v5", "pass@1"]  # fmt: skip
    assert row.split() == ["m2509", "37.50", "50.00", "33.33", "0.00", "50.00"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in rows].count("aime24") == 8 and rows[0]["id"] == "1"
    seen.clear()
    argv += ["--k", "4", "--max-new-tokens", "100", "--top-p", "1.0", "--overwrite"]
    assert main(argv) == 0 and seen["aime24"] == (4, 100, {}, 0.7, 1.0)


def test_eval_checks_its_output_before_sampling(tmp_path, monkeypatch, capsys):
    def must_not_run(args):
        raise AssertionError("the checkpoint was opened before --out was checked")

    monkeypatch.setattr(evaluate, "_open", must_not_run)
    (tmp_path / "a-file").write_text("")
    data = write_jsonl(tmp_path / "p.jsonl", PROBLEMS_ROWS)
    base = ["eval", "--checkpoint", "x", "--data", str(data), "--out"]
    assert main([*base, str(tmp_path / "a-file" / "ev")]) == 1
    assert f"--out {tmp_path}/a-file/ev: not writable (Not a directory)" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "a-file")]) == 1
    assert "is a file; a directory is expected" in capsys.readouterr().err
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "report.json").write_text("{}")
    assert main([*base, str(tmp_path / "ev")]) == 1
    assert "holds a report already; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "ev" / "report.json").read_text() == "{}"


def test_eval_overwrites_a_report_only_when_asked(tmp_path, fake_sampling):
    argv = ["eval", "--checkpoint", "x", "--data", "x", "--k", "3", "--out", str(tmp_path)]
    assert main(argv) == 0 and main(argv) == 1
    (tmp_path / "report.json").write_text("{}")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["maj@3"] == pytest.approx(0.5)


def test_score_reads_mapped_columns_and_refuses_files_that_are_not_utf8(tmp_path, capsys):
    gsm = write_jsonl(
        tmp_path / "gsm8k.jsonl", [{"question": PROBLEMS_ROWS[0]["problem"], "answer": "3 + 4 = 7\n#### 7"}]
    )
    comps = tmp_path / "c.jsonl"
    comps.write_text(json.dumps({"id": "gsm8k.jsonl line 1", "completion": COMPLETIONS[0][0]["completion"]}) + "\n")
    argv = ["score", "--data", str(gsm), "--field", "problem=question", "--answer-format", "gsm8k", "--workers", "0",
            "--completions", str(comps), "--out", str(tmp_path / "s.jsonl")]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "s.jsonl").read_text())["reward"] == pytest.approx(1.1)
    comps.write_bytes(comps.read_bytes() + b'{"id": "gsm8k.jsonl line 1", "completion": "\xff"}\n')
    assert main([*argv[:-2], "--out", str(tmp_path / "s2.jsonl")]) == 1
    assert "c.jsonl line 2: not UTF-8 (byte 0xff at column 45)" in capsys.readouterr().err
    gsm.write_bytes(gsm.read_bytes().replace(b"#### 7", b"#### 7\xe9"))
    assert main([*argv[:-2], "--out", str(tmp_path / "s3.jsonl")]) == 1
    assert "gsm8k.jsonl line 1: not UTF-8" in capsys.readouterr().err
    assert main([*argv, "--field", "question"]) == 1
    assert "--field 'question': FIELD=COLUMN is expected" in capsys.readouterr().err
