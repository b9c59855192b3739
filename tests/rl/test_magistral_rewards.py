"""The Magistral reward against hand-worked cases (reference/magistral-rl-recipe.md, section 2)."""

import re
import shutil
import time

import math_verify
import pytest

from magistral_jax.rl import magistral_rewards
from magistral_jax.rl.magistral_rewards import (
    code_correct,
    detect_language,
    language_consistent,
    language_sample,
    last_boxed,
    length_penalty,
    magistral,
    math_correct,
    split_format,
    strip_latex_and_code,
)
from magistral_jax.rl.rewards import get_reward
from magistral_jax.rl.sandbox import Limits

PROBLEM_EN = "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
PROBLEM_FR = "Marie a 3 pommes et en reçoit 4 de plus. Combien de pommes Marie a-t-elle maintenant ?"
THINK_EN = "I add the two numbers: three plus four makes seven, so the total is seven apples."
THINK_FR = "J'additionne les deux nombres : trois plus quatre font sept, donc le total est de sept pommes."
ANSWER_EN = "The answer is \\boxed{7}."
ANSWER_FR = "La réponse est \\boxed{7}."


def score(completion, answer="7", problem=PROBLEM_EN, **kw):
    out = magistral([problem], [completion], answer=[answer], problem=[problem], **kw)
    return out.rewards[0], {k: v[0] for k, v in out.components.items()}, out.reasons[0]


def test_a_correct_consistent_answer_gets_1_1():
    reward, comps, reason = score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}")
    assert reward == pytest.approx(1.1)
    assert comps == pytest.approx({"format": 0.1, "correct": 0.9, "length": 0.0, "language": 0.1})
    assert reason is None


@pytest.mark.parametrize(
    ("completion", "why"),
    [
        (f"{THINK_EN}[/THINK]{ANSWER_EN}", "does not start with [THINK]"),
        (f"[THINK]{THINK_EN}{ANSWER_EN}", "0 [/THINK]"),
        (f"[THINK]{THINK_EN}[/THINK][THINK]x[/THINK]{ANSWER_EN}", "2 [THINK] and 2 [/THINK]"),
        (f"[THINK]{THINK_EN}[/THINK]The answer is 7.", "no \\boxed{}"),
        (f"[THINK]{THINK_EN} \\boxed{{7}}[/THINK]The answer is 7.", "no \\boxed{}"),  # boxed inside the thinking only
        (f"[/THINK][THINK]{THINK_EN}{ANSWER_EN}", "does not start with [THINK]"),
    ],
)
def test_format_failures_get_0_and_no_further_grading(completion, why):
    reward, comps, reason = score(completion)
    assert reward == 0.0 and set(comps.values()) == {0.0}
    assert reason.startswith("format:") and why in reason


def test_think_tags_style_for_2506():
    good = f"<think>{THINK_EN}</think>{ANSWER_EN}"
    assert score(good, style="think-tags")[0] == pytest.approx(1.1)
    assert score(good, style="v13")[0] == 0.0  # tags are not control tokens
    assert score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}", style="think_tags")[0] == 0.0


@pytest.mark.parametrize(
    ("boxed", "gold", "correct"),
    [
        ("7", "7", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "\\frac{1}{2}", True),
        ("x = 3", "3", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("8", "7", False),
        ("7.1", "7", False),
    ],
)
def test_math_verify_decides_correctness(boxed, gold, correct):
    _, comps, reason = score(f"[THINK]{THINK_EN}[/THINK]The answer is \\boxed{{{boxed}}}.", answer=gold)
    assert comps["format"] == 0.1
    assert comps["correct"] == (0.9 if correct else 0.0)
    assert (reason is None) == correct


def test_the_last_boxed_answer_counts():
    text = "First \\boxed{3}, no wait: \\boxed{\\frac{7}{1}}"
    assert last_boxed(text) == "\\frac{7}{1}"
    assert score(f"[THINK]{THINK_EN}[/THINK]{text}")[1]["correct"] == 0.9
    assert score(f"[THINK]{THINK_EN}[/THINK]\\boxed{{7}} then \\boxed{{8}}")[1]["correct"] == 0.0
    assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 0.0), (600, 0.0), (700, 0.0), (750, -0.05), (775, -0.075), (800, -0.1), (801, -0.1), (5000, -0.1)],
)
def test_length_penalty_closed_form(n, expected):
    # l_max 800, l_cache 100: 0 up to 700, then linear to -0.1 at 800, -0.1 beyond.
    assert length_penalty(n, 800, 100) == pytest.approx(expected)
    reward, comps, _ = score(
        f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}", completion_ids=[list(range(n))], l_max=800, l_cache=100
    )
    assert comps["length"] == pytest.approx(expected)
    assert reward == pytest.approx(1.1 + expected)
    assert length_penalty(10**6, None, 100) == 0.0


def test_language_consistency_across_problem_thinking_and_answer():
    assert score(f"[THINK]{THINK_FR}[/THINK]{ANSWER_FR}", problem=PROBLEM_FR)[0] == pytest.approx(1.1)
    reward, comps, reason = score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_FR}", problem=PROBLEM_FR)
    assert comps["language"] == 0.0 and reward == pytest.approx(1.0)
    assert reason.startswith("languages differ") and "thinking: english" in reason
    reward, comps, _ = score(f"[THINK]{THINK_FR}[/THINK]{ANSWER_EN}", problem=PROBLEM_FR)
    assert comps["language"] == 0.0
    # switched off
    assert score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_FR}", problem=PROBLEM_FR, language_reward=False)[0] == 1.0


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Ich addiere die beiden Zahlen und erhalte sieben Äpfel insgesamt.", "german"),
        ("Sumo los dos números y obtengo siete manzanas en total.", "spanish"),
        ("Sommo i due numeri e ottengo sette mele in tutto.", "italian"),
        ("Я складываю два числа и получаю семь яблок.", "russian"),
        ("我把两个数相加，得到七个苹果。", "chinese"),
        ("The sum of $\\frac{a}{b}$ and `x + y` is what we want.", "english"),
    ],
)
def test_detects_the_seven_languages_with_latex_and_code_removed(text, language):
    assert detect_language(text) == language


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Bonjour toi", "french"),  # 10 letters: MIN_LETTERS, identified
        ("Bonjour to", None),  # 9 letters: too short
        ("苹果树", "chinese"),  # three CJK ideographs, 4 letters each: 12
        ("苹果", None),  # two: 8
        ("一苹果", "chinese"),  # U+4E00 and U+9FFF, the block's first and last, count 4 too
        ("\u9fff苹果", "chinese"),
    ],
)
def test_a_part_needs_ten_letters_a_cjk_ideograph_counting_four(text, language):
    assert detect_language(text) == language


@pytest.mark.parametrize(
    ("problem", "thinking", "answer"),
    [
        (PROBLEM_FR, "$3 + 4 = 7$", ANSWER_FR),  # a thinking block of formulas only
        (PROBLEM_FR, "3+4=7", "\\boxed{7}"),  # only the problem has words: nothing to compare it with
        ("$3 + 4$?", THINK_FR, ANSWER_FR),  # a problem too short to tell its language
    ],
)
def test_the_language_bonus_needs_problem_and_thinking_identified(problem, thinking, answer):
    # The paper: the bonus is given "if ... all three parts used the same language". A problem or a
    # thinking block too short to identify (fewer than MIN_LETTERS letters once LaTeX and code are
    # gone) cannot show that: no bonus, so a wordless thinking block cannot collect it.
    assert detect_language("$x^2 + 1$ = 7") is None  # nothing but LaTeX and a number
    agree, found = language_consistent(problem, thinking, answer)
    assert not agree and "too short to identify" in found
    reward, comps, reason = score(f"[THINK]{thinking}[/THINK]{answer}", problem=problem)
    assert comps["language"] == 0.0 and reward == pytest.approx(1.0) and "too short to identify" in reason


def test_an_answer_without_prose_does_not_block_the_language_bonus():
    # A bare boxed answer, or a code answer that is a code block alone, has no language to mix.
    assert language_consistent(PROBLEM_FR, THINK_FR, "\\boxed{7}")[0]
    assert language_consistent(PROBLEM_FR, THINK_FR, "```python\nprint(7)\n```")[0]
    assert score(f"[THINK]{THINK_FR}[/THINK]\\boxed{{7}}", problem=PROBLEM_FR)[0] == pytest.approx(1.1)
    # An answer with prose must agree.
    assert not language_consistent(PROBLEM_FR, THINK_FR, ANSWER_EN)[0]
    assert language_consistent(PROBLEM_FR, THINK_FR, ANSWER_FR)[0]


@pytest.mark.parametrize("style", ["think_tokens", "think_tags"])
def test_the_training_system_prompt_agrees_with_the_reward_format(style, tmp_path):
    from magistral_jax.rl.magistral_rewards import TAGS, prompt_conflicts
    from magistral_jax.tokenizer import SYSTEM_PROMPTS, TRAINING_SYSTEM_PROMPT

    prompt = SYSTEM_PROMPTS[TRAINING_SYSTEM_PROMPT[style]]
    opening, closing = TAGS[style]
    # The prompt teaches the very tags the format reward checks, and nothing in it forbids the
    # \boxed{} answer the math reward reads.
    assert opening in prompt and closing in prompt
    assert prompt_conflicts(prompt, style) is None
    # An answer written as the prompt's template asks, with a boxed result, earns the format reward.
    template = f"{opening}{THINK_EN}{closing}{ANSWER_EN}"
    assert score(template, style=style)[1]["format"] == 0.1


def test_a_system_prompt_that_contradicts_the_reward_is_named():
    from magistral_jax.rl.magistral_rewards import prompt_conflicts
    from magistral_jax.tokenizer import SYSTEM_PROMPTS

    # The 2506 card's chat prompt forbids \boxed{}: a math RL run that trained on it would score every
    # obedient answer 0.
    assert "forbids" in prompt_conflicts(SYSTEM_PROMPTS["magistral-small-2506"], "think_tags")
    assert "<think>" in prompt_conflicts(SYSTEM_PROMPTS["magistral-rl"], "think_tokens")
    assert "[THINK]" in prompt_conflicts(SYSTEM_PROMPTS["magistral-small-2509"], "think_tags")
    assert prompt_conflicts("Solve it. Put the final answer in \\boxed{}.", "think_tokens") is None


def test_code_answers_need_a_fenced_block_with_a_language_tag():
    fields = {"task": ["code"], "tests": [[{"input": "1 2\n", "output": "3\n"}]]}
    untagged = "[THINK]Read and add.[/THINK]```\nprint(sum(map(int, input().split())))\n```"
    out = magistral(["Add two numbers."], [untagged], **fields, language_reward=False)
    assert out.rewards == [0.0] and "language tag" in out.reasons[0]
    tagged = untagged.replace("```\n", "```python\n", 1)
    out = magistral(["Add two numbers."], [tagged], **fields, language_reward=False)
    assert out.rewards == [pytest.approx(1.0)] and out.reasons == [None]


ADD_TESTS = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in [(1, 2), (-5, 9), (100, 23), (0, 0)]]


def code_reward(program: str, lang: str = "python", tests=ADD_TESTS, **kw):
    completion = f"[THINK]I read two integers and print their sum.[/THINK]Here it is:\n```{lang}\n{program}\n```"
    out = magistral(["Print a + b."], [completion], task=["code"], tests=[tests], language_reward=False, **kw)
    return out.rewards[0], out.reasons[0]


def test_python_code_passes_all_tests_or_gets_nothing():
    assert code_reward("a, b = map(int, input().split())\nprint(a + b)") == (pytest.approx(1.0), None)
    reward, reason = code_reward("a, b = map(int, input().split())\nprint(a + b if a > 0 else 0)")
    assert reward == pytest.approx(0.1) and "wrong output" in reason
    reward, reason = code_reward("raise SystemExit(3)")
    assert reward == pytest.approx(0.1) and "status 3" in reason
    reward, reason = code_reward("print(1)", lang="rust")
    assert reward == pytest.approx(0.1) and "not run" in reason


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")
def test_cpp_code_is_compiled_as_cpp20_and_run():
    program = (
        "#include <iostream>\n#include <span>\nint main() { long a, b; std::cin >> a >> b; "
        "int v[2] = {0, 0}; std::span<int> s(v); std::cout << a + b + s.size() - 2 << std::endl; }"
    )  # std::span is C++20
    assert code_reward(program, lang="cpp") == (pytest.approx(1.0), None)
    reward, reason = code_reward("int main() { return }", lang="cpp")
    assert reward == pytest.approx(0.1) and "compilation failed" in reason


def test_a_group_runs_the_same_subset_of_at_most_max_tests():
    # 10 tests; the program fails on exactly one of them: whether it is drawn depends on the seed,
    # never on the completion, and a draw has 5 tests.
    tests = [{"input": f"{i} 0\n", "output": f"{i}\n"} for i in range(10)]
    program = "a, b = map(int, input().split())\nprint(a + b + (a == 7))"
    completion = f"[THINK]Add them.[/THINK]```python\n{program}\n```"
    outcomes = set()
    for seed in range(6):
        out = magistral(
            ["Add."] * 2,
            [completion] * 2,
            task=["code"] * 2,
            tests=[tests] * 2,
            test_seed=[seed] * 2,
            max_tests=5,
            language_reward=False,
        )
        assert out.rewards[0] == out.rewards[1]  # the same draw for every completion of the group
        outcomes.add(round(out.rewards[0], 6))
    assert outcomes == {0.1, 1.0}  # some draws hold the failing test, some do not


def test_split_format_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="task"):
        split_format("[THINK]x[/THINK]\\boxed{1}", "v13", "poetry")


def test_math_verify_scores_off_the_main_thread():
    # math-verify refuses to run its signal-based timeouts outside the main thread.
    import threading

    got = []
    worker = threading.Thread(
        target=lambda: got.extend([math_correct("\\boxed{12}", "12"), math_correct("\\boxed{1}", "12")])
    )
    worker.start()
    worker.join()
    assert got == [True, False]


def test_a_megabyte_completion_is_graded_in_bounded_time():
    # 1 MB of thinking with a 30,000-character run of unclosed `\[` in the middle: removing LaTeX
    # from the whole text is quadratic in that run, and the classifier linear in the length.
    score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}")  # the classifier and math-verify loaded
    filler = THINK_EN * (500_000 // len(THINK_EN))
    thinking = filler + "\\[" * 15_000 + filler
    start = time.perf_counter()
    reward, _, reason = score(f"[THINK]{thinking}[/THINK]{ANSWER_EN}")
    assert time.perf_counter() - start < 2.0
    assert len(thinking) > 10**6 and reward == pytest.approx(1.1) and reason is None


def test_a_part_of_three_windows_or_fewer_is_classified_whole():
    assert language_sample("a" * 3000) == ["a" * 3000]  # 3 x SAMPLE_CHARS
    assert language_sample("a" * 3001) == ["a" * 1000] * 3


@pytest.mark.parametrize("earlier", ["", "```sh\nls -l\n```\n"], ids=["one-block", "after-a-closed-block"])
def test_a_long_part_is_classified_by_its_start_middle_and_end_with_code_still_removed(earlier):
    # French prose around a long code block whose middle window falls inside the block: its
    # English identifiers and comments must not count. After a closed block, the middle window
    # starts past three fences (inside: an odd count), the last past four (outside).
    code = "total = sum(values)  # compute the total of all the values we have read\n" * 30
    prose = THINK_FR * 20
    text = f"{earlier}{prose}\n```python\n{code}```\n{prose}"
    middle = (len(text) - 1000) // 2
    assert text.index("```python") < middle and middle + 1000 < text.rindex("```")
    windows = language_sample(text)
    assert [w[-20:] for w in windows] == [text[999 - 19 : 1000], text[middle + 980 : middle + 1000], text[-20:]]
    assert not any("values" in strip_latex_and_code(w) for w in windows)
    assert detect_language(text) == "french"


@pytest.mark.parametrize(
    ("tests", "where", "got"),
    [
        ([{"input": "1 2\n"}], "tests[0]", "['input']"),  # no expected output: `pass` would score 1.0
        ([{"input": "1 2\n", "output": "3\n"}, {"input": "1 1\n", "output": None}], "tests[1]", "['input', 'output']"),
        ([{"output": "3\n"}], "tests[0]", "['output']"),
        (["1 2 -> 3"], "tests[0]", "str"),
    ],
)
def test_code_tests_without_input_and_output_strings_are_refused(tests, where, got):
    # The message names the test and what it holds: a dict's keys, or another value's type.
    message = f"code tests: {where} needs string `input` and `output`, got {got}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        code_reward("pass", tests=tests)


def test_an_overlong_boxed_answer_is_wrong_without_parsing():
    # 9^{9^{...}} sized to the cap: math-verify would spend its time limits on it
    tower = "9^{" * 340 + "9" + "}" * 340
    assert len(tower) > 1000
    start = time.perf_counter()
    assert score(f"[THINK]{THINK_EN}[/THINK]\\boxed{{{tower}}}", answer="9")[1]["correct"] == 0.0
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(("chars", "correct"), [(1000, True), (1001, False)])
def test_a_boxed_answer_of_up_to_1000_characters_is_parsed(chars, correct):
    # "7" padded with spaces to `chars` inside the braces: math-verify reads 7.
    assert math_correct("\\boxed{7" + " " * (chars - 1) + "}", "7") is correct


def test_the_reward_is_registered_under_its_name():
    assert get_reward("magistral") is magistral


def test_the_problem_defaults_to_the_prompt_and_no_length_means_no_penalty():
    # No `problem` field: the prompt is the problem (French here, so English reasoning disagrees);
    # no `completion_ids` nor `n_tokens`: nothing to penalise, whatever l_max.
    out = magistral([PROBLEM_FR], [f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}"], answer=["7"], l_max=1, l_cache=1)
    assert out.components["language"] == [0.0] and out.components["length"] == [0.0]
    assert out.rewards == [pytest.approx(1.0)] and out.reasons[0].startswith("languages differ")


def test_math_correct_without_a_boxed_answer_or_when_math_verify_fails(monkeypatch):
    assert math_correct("The answer is 7.", "7") is False
    assert math_correct("\\boxed{7}", "7") is True

    def broken(*args, **kwargs):
        raise RuntimeError("unparsable")

    monkeypatch.setattr(math_verify, "verify", broken)
    assert math_correct("\\boxed{7}", "7") is False


def test_code_correct_refuses_what_it_cannot_run(monkeypatch):
    program = "```python\nprint(3)\n```"
    assert code_correct("print(3)", ADD_TESTS, 0) == (False, "code: no fenced block")
    assert code_correct("```rust\nfn main() {}\n```", ADD_TESTS, 0) == (
        False,
        "code: language 'rust' is not run (python or cpp)",
    )
    assert code_correct(program, [], 0) == (False, "code: the problem has no tests")
    monkeypatch.setattr(magistral_rewards.shutil, "which", lambda name: None)
    assert code_correct("```cpp\nint main() {}\n```", ADD_TESTS, 0) == (False, "code: no C++ compiler on this machine")


def test_code_correct_names_the_failing_test_in_order_and_honours_its_limits():
    tests = [{"input": f"{i} 0\n", "output": f"{i}\n"} for i in range(3)]
    wrong = "```python\na, b = map(int, input().split())\nprint(a + b + (a == 1))\n```"
    # As many tests as max_tests: all run, in their order (seed 0 would shuffle a draw to 1, 2, 0).
    assert code_correct(wrong, tests, 0, max_tests=3) == (False, "code: test 2/3: wrong output")
    crash = "```python\na, b = map(int, input().split())\nassert a != 1\nprint(a + b)\n```"
    ok, reason = code_correct(crash, tests, 0, max_tests=3)
    assert not ok and reason.startswith("code: test 2/3: ")
    slow = "```python\nimport time\ntime.sleep(3)\n```"
    ok, reason = code_correct(slow, tests, 0, limits=Limits(timeout=0.5))
    assert not ok and "time" in reason


def test_code_correct_draws_at_most_20_tests_by_default():
    # 21 tests, the program fails only the last; seed 1 draws 20 without it.
    tests = [{"input": f"{i} 0\n", "output": f"{i + (i == 20)}\n"} for i in range(21)]
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert code_correct(program, tests, 1) == (True, None)
    assert code_correct(program, tests, 1, max_tests=21)[0] is False


def test_the_rewards_defaults_a_4096_token_cache_and_20_tests():
    # l_max 8192 and 6144 tokens: half-way through the default l_cache of 4096, -0.05.
    _, comps, _ = score(f"[THINK]{THINK_EN}[/THINK]{ANSWER_EN}", n_tokens=[6144], l_max=8192)
    assert comps["length"] == pytest.approx(-0.05, abs=1e-9)
    tests = [{"input": f"{i} 0\n", "output": f"{i + (i == 20)}\n"} for i in range(21)]  # fails the last only
    reward, reason = code_reward("a, b = map(int, input().split())\nprint(a + b)", tests=tests, test_seed=[1])
    assert (reward, reason) == (pytest.approx(1.0), None)  # seed 1 draws 20 tests without the last


def test_an_unknown_language_name_is_refused():
    with pytest.raises(ValueError, match="languages"):
        detect_language("A sentence long enough to be identified.", languages=("english", "klingon"))
