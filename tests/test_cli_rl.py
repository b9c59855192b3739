"""`magistral-jax score`, `eval` and `filter`, end to end."""

import json

import pytest
from helpers import run_cli
from test_evaluation import PROBLEMS, SAMPLES

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
