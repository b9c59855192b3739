"""Evaluation figures (pass@1 over k, maj@k, per language, lengths) on hand-worked samples."""

import pytest

from magistral_jax.data.problems import Problem
from magistral_jax.evaluation import Sample, answer_classes, majority_correct, pass_rates, summarize, thinking_length
from magistral_jax.tokenizer import load_tokenizer, write_standin_tekken


def sample(index, boxed, correct, length=10, thinking=4, language_ok=True, formatted=True):
    comps = {"format": 0.1, "correct": 0.9 * correct, "length": 0.0, "language": 0.1 * language_ok}
    if not formatted:  # nothing else is graded
        comps = dict.fromkeys(comps, 0.0)
    return Sample(index, "", sum(comps.values()), comps, None, length, thinking, boxed)


PROBLEMS = [
    Problem(id="en", problem="1+1?", answer="2", language="english"),
    Problem(id="fr", problem="2+2 ?", answer="4", language="french"),
    Problem(id="code", problem="print 1", tests=[{"input": "", "output": "1"}], task="code", language="english"),
]
SAMPLES = [
    # en: 1 of 3 correct, but "3" is the majority -> maj wrong
    sample(0, "2", True, length=10, thinking=4),
    sample(0, "3", False, length=20, thinking=8),
    sample(0, "3", False, length=30, thinking=12, language_ok=False),
    # fr: 2 of 3 correct, majority "4" -> maj right; one sample without a boxed answer
    sample(1, "4", True, length=12, thinking=6),
    sample(1, None, False, length=6, thinking=0, formatted=False),
    sample(1, "4", True, length=12, thinking=6),
    # code: 3 of 3 correct (no maj for code)
    sample(2, None, True),
    sample(2, None, True),
    sample(2, None, True),
]


def test_pass_rates_and_majority_votes():
    assert pass_rates(SAMPLES, 3).tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert majority_correct(SAMPLES[0:3]) is False
    assert majority_correct(SAMPLES[3:6]) is True
    assert majority_correct(SAMPLES[6:9]) is None
    # a tie goes to the answer seen first; whitespace does not split votes
    assert majority_correct([sample(0, " 2", True), sample(0, "3", False)]) is True
    assert majority_correct([sample(0, "3", False), sample(0, "2 ", True)]) is False


def test_summary_overall_and_per_language():
    report = summarize(PROBLEMS, SAMPLES, k=3)
    assert report["problems"] == 3 and report["k"] == 3
    assert report["pass@1"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert report["maj@3"] == pytest.approx(0.5)  # math problems only: en wrong, fr right
    assert report["format"] == pytest.approx(8 / 9)
    assert report["language"] == pytest.approx(7 / 9)
    assert report["length"] == pytest.approx((10 + 20 + 30 + 12 + 6 + 12 + 30) / 9)
    assert report["thinking_length"] == pytest.approx((4 + 8 + 12 + 6 + 0 + 6 + 12) / 9)
    en, fr = report["per_language"]["english"], report["per_language"]["french"]
    assert en["problems"] == 2 and en["pass@1"] == pytest.approx((1 / 3 + 1) / 2) and en["maj@3"] == 0.0
    assert fr["problems"] == 1 and fr["pass@1"] == pytest.approx(2 / 3) and fr["maj@3"] == 1.0


def test_thinking_length_in_tokens(tmp_path):
    tok = load_tokenizer(write_standin_tekken(tmp_path / "tekken.json"))
    inner = tok.encode_completion("I add two and two.", eos=False)
    answer = tok.encode_completion("\\boxed{4}", eos=True)
    assert thinking_length(tok, [tok.think_id, *inner, tok.end_think_id, *answer]) == len(inner)
    assert thinking_length(tok, [tok.think_id, *inner]) == len(inner)  # never closed
    assert thinking_length(tok, answer) == 0


def test_answers_vote_together_when_the_verifier_finds_them_equal():
    answers = ["0.5", "1/2", "\\frac{1}{2}", "2/3", "042", "42", " 0.5 ", "B", "(B)", "\\text{B}", "A"]
    assert answer_classes(answers) == [0, 0, 0, 1, 2, 2, 0, 3, 3, 3, 4]
    # by string, "41" would win (2 votes to 1 each); by value 42 has 3 votes
    votes = [sample(0, "042", True), sample(0, "41", False), sample(0, "42", True), sample(0, "41", False)]
    assert majority_correct([*votes, sample(0, "42.0", True)]) is True
    # three spellings of one wrong value outvote two of the right one
    half = [sample(0, a, False) for a in ("0.5", "1/2", "\\frac{1}{2}")]
    assert majority_correct([sample(0, "2/3", True), *half, sample(0, "\\frac{2}{3}", True)]) is False


def test_sets_without_languages_have_no_per_language_rows():
    problems = [Problem(id=str(i), problem="?", answer="1") for i in range(2)]
    report = summarize(problems, [sample(0, "1", True), sample(1, "2", False)], k=1)
    assert report["per_language"] == {} and report["pass@1"] == 0.5 and report["maj@1"] == 0.5
