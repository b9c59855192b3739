"""The Magistral reward (`reference/magistral-rl-recipe.md`, section 2), registered as `magistral`.

    reward = 0                                    if the format is wrong (nothing else is graded)
           = 0.1 (format)
             + 0.9 if the answer is correct       (math: last \\boxed{} by math-verify;
                                                   code: first fenced block passes all tests)
             + length penalty in [-0.1, 0]        (soft overlong, with l_max and l_cache)
             + 0.1 if problem, thinking and answer are in one language

Completions are text with control tokens written out (`[THINK]`), as `Tokenizer.decode(...,
keep_special=True)` gives them, or with `<think>` tags for the 2506 style.

Format: the completion starts with the opening tag and holds exactly one opening and one closing
tag, in that order; a math answer has a `\\boxed{}` after the thinking, a code answer a fenced
block with a language tag (```python or ```cpp).

Code: the first fenced block of the answer runs against up to `max_tests` of the problem's tests
(`{"input": ..., "output": ...}`, stdin to stdout, compared line by line without trailing
whitespace), the same subset for every completion of a group (chosen by the `test_seed` field),
each in the sandbox (`rl.sandbox`) with 4 s and 300 MB; C++ is compiled as C++20 within 10 s.

Language: LaTeX, code blocks and inline code are removed from each part, and each is classified by
lingua (which ships its model) among `languages`; the bonus needs problem and thinking identified
and in one language, and the answer in the same one unless it has no prose to identify
(`language_consistent`; a part with fewer than `MIN_LETTERS` letters left cannot be identified). A
part longer than three `SAMPLE_CHARS` windows is classified by its start, middle and end.

Bounds: every component's work is bounded (a completion is hostile input). The language check
reads at most three windows per part; a boxed answer longer than `MAX_BOXED_CHARS` is wrong
without parsing, and math-verify's own time limits (5 s a step) hold in a process's main thread;
code runs under the sandbox's limits per test and compile. A test without string `input` and
`output` is an error (it would pass any program). `RewardPool` adds a time limit per completion
when it scores in worker processes (a worker past it is killed).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import threading
from collections.abc import Sequence
from typing import Any

from magistral_jax.rl.rewards import RewardOutput, register_reward
from magistral_jax.rl.sandbox import Limits, Sandbox

FORMAT, CORRECT, LANGUAGE, MAX_PENALTY = 0.1, 0.9, 0.1, 0.1
MIN_LETTERS = 10
MAX_BOXED_CHARS = 1000  # longer boxed answers are wrong without parsing (symbolic parsing is superlinear)
SAMPLE_CHARS = 1000  # the language of a longer part is told from three windows of this size
LANGUAGES = ("english", "french", "spanish", "italian", "german", "chinese", "russian")
TAGS = {"think_tokens": ("[THINK]", "[/THINK]"), "think_tags": ("<think>", "</think>")}
STYLE_ALIASES = {
    "v13": "think_tokens",
    "think_tokens": "think_tokens",
    "think-tags": "think_tags",
    "think_tags": "think_tags",
}
FENCE = re.compile(r"```([A-Za-z0-9_+#-]*)[ \t]*\n(.*?)```", re.DOTALL)
CODE_LANGUAGES = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp", "cxx": "cpp"}


def split_format(completion: str, style: str, task: str) -> tuple[str | None, str | None, str | None]:
    """(thinking, answer, None) for a well-formed completion, else (None, None, reason)."""
    opening, closing = TAGS[STYLE_ALIASES[style]]
    text = completion.lstrip()
    if not text.startswith(opening):
        return None, None, f"format: does not start with {opening}"
    n_open, n_close = text.count(opening), text.count(closing)
    if n_open != 1 or n_close != 1:
        return None, None, f"format: {n_open} {opening} and {n_close} {closing}, exactly one of each expected"
    thinking, _, answer = text[len(opening) :].partition(closing)
    if task == "math" and last_boxed(answer) is None:
        return None, None, "format: no \\boxed{} answer after the thinking"
    if task == "code" and not any(tag for tag, _ in FENCE.findall(answer)):
        return None, None, "format: no fenced code block with a language tag after the thinking"
    if task not in ("math", "code"):
        raise ValueError(f"task {task!r}: expected math or code")
    return thinking, answer, None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def math_correct(answer_text: str, gold: str) -> bool:
    """The last boxed answer equals the reference, by math-verify (symbolic, normalised)."""
    from math_verify import parse, verify

    boxed = last_boxed(answer_text)
    if boxed is None or len(boxed) > MAX_BOXED_CHARS:
        return False
    # math-verify's timeouts use signal.alarm, which only the main thread may set; elsewhere it
    # refuses to run at all unless they are off (reward pools score in worker processes' main
    # threads, so the timeouts hold there).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(
            verify(
                parse(f"${gold}$", parsing_timeout=timeout),
                parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout),
                timeout_seconds=timeout,
            )
        )
    except Exception:  # math-verify raises on unparsable or timed-out input
        return False


def _normalise_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return lines


def check_tests(tests: Sequence[Any]) -> None:
    """Every test is a dict with string `input` and `output`: a test without an expected output
    would pass any program."""
    for k, test in enumerate(tests):
        if not isinstance(test, dict) or not all(isinstance(test.get(key), str) for key in ("input", "output")):
            got = sorted(test) if isinstance(test, dict) else type(test).__name__
            raise ValueError(f"code tests: tests[{k}] needs string `input` and `output`, got {got}")


def code_correct(
    answer_text: str, tests: Sequence[dict[str, str]], seed: int, max_tests: int = 20, limits: Limits | None = None
) -> tuple[bool, str | None]:
    """Runs the first fenced block against a seeded subset of `tests`; (all passed, reason)."""
    limits = limits or Limits()
    check_tests(tests)
    match = FENCE.search(answer_text)
    if match is None:
        return False, "code: no fenced block"
    language = CODE_LANGUAGES.get(match.group(1).lower())
    if language is None:
        return False, f"code: language {match.group(1)!r} is not run (python or cpp)"
    if not tests:
        return False, "code: the problem has no tests"
    chosen = list(tests)
    if len(chosen) > max_tests:
        chosen = random.Random(seed).sample(chosen, max_tests)
    compiler = None
    if language == "cpp":
        compiler = shutil.which("g++")
        if compiler is None:
            return False, "code: no C++ compiler on this machine"
        compiler = os.path.realpath(compiler)
    with Sandbox(tools=[compiler] if compiler else []) as box:
        if language == "python":
            argv = [box.python, "-I", box.write("main.py", match.group(2))]
        else:
            source = box.write("main.cpp", match.group(2))
            built = box.run(
                [compiler, "-std=c++20", "-O2", "-o", box.path("main"), source],
                "",
                Limits(timeout=10.0, memory_mb=2048, processes=64, open_files=256),
                writable=True,
            )
            if not built.ok:
                return False, f"code: compilation failed ({built.reason})"
            argv = [box.path("main")]
        for k, test in enumerate(chosen):
            result = box.run(argv, test["input"], limits)
            if not result.ok:
                return False, f"code: test {k + 1}/{len(chosen)}: {result.reason}"
            if _normalise_output(result.stdout) != _normalise_output(test["output"]):
                return False, f"code: test {k + 1}/{len(chosen)}: wrong output"
    return True, None


def length_penalty(n_tokens: int, l_max: int | None, l_cache: int) -> float:
    """The soft overlong penalty: 0 up to l_max - l_cache, linear to -0.1 at l_max, -0.1 beyond."""
    if l_max is None:
        return 0.0
    if n_tokens <= l_max - l_cache:
        return 0.0
    if n_tokens > l_max:
        return -MAX_PENALTY
    return -MAX_PENALTY * (n_tokens - l_max + l_cache) / l_cache


_LATEX = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\[.*?\\\]|\\\(.*?\\\)|\\[A-Za-z]+(\{[^{}]*\})*", re.DOTALL)
_CODE = re.compile(r"```.*?(```|$)|`[^`]*`", re.DOTALL)


def strip_latex_and_code(text: str) -> str:
    return _LATEX.sub(" ", _CODE.sub(" ", text))


def language_sample(text: str) -> list[str]:
    """`text`, or for a longer text its start, middle and end (`SAMPLE_CHARS` each): classifying a
    part then costs the same at any length (LaTeX removal is quadratic on some inputs, the
    classifier linear). A window that starts inside a fenced block gets the opening fence back,
    so that the block is still removed."""
    if len(text) <= 3 * SAMPLE_CHARS:
        return [text]
    windows = []
    for start in (0, (len(text) - SAMPLE_CHARS) // 2, len(text) - SAMPLE_CHARS):
        inside_code = text.count("```", 0, start) % 2 == 1
        windows.append(("```" if inside_code else "") + text[start : start + SAMPLE_CHARS])
    return windows


_DETECTORS: dict[tuple[str, ...], Any] = {}


def detect_language(text: str, languages: Sequence[str] = LANGUAGES) -> str | None:
    """The language of `text` among `languages` (lowercase English names), or None when fewer than
    `MIN_LETTERS` letters are left to identify it by."""
    from lingua import Language, LanguageDetectorBuilder

    cleaned = "\n".join(strip_latex_and_code(window) for window in language_sample(text))
    # A CJK character says about as much as a short word.
    letters = sum(4 if "\u4e00" <= ch <= "\u9fff" else 1 for ch in cleaned if ch.isalpha())
    if letters < MIN_LETTERS:
        return None
    key = tuple(languages)
    if key not in _DETECTORS:
        try:
            chosen = [getattr(Language, name.upper()) for name in key]
        except AttributeError as e:
            raise ValueError(f"languages: {e}") from None
        _DETECTORS[key] = LanguageDetectorBuilder.from_languages(*chosen).build()
    found = _DETECTORS[key].detect_language_of(cleaned)
    return None if found is None else found.name.lower()


def language_consistent(
    problem: str, thinking: str, answer: str, languages: Sequence[str] = LANGUAGES
) -> tuple[bool, str]:
    """Whether problem, thinking and answer are in one language, and what was found.

    The paper grants the bonus when "all three parts used the same language". Problem and thinking
    must both be identified and agree: a thinking block without words (formulas only) or a problem
    too short to tell earns no bonus, so the bonus cannot be collected by leaving a part wordless.
    The answer must agree when it can be identified; one without prose (a bare `\\boxed{42}`, a
    code block alone, as code answers often are) has no language to mix and does not block it. A
    part cannot be identified with fewer than `MIN_LETTERS` letters once LaTeX and code are removed.
    """
    found = {
        part: detect_language(text, languages)
        for part, text in (("problem", problem), ("thinking", thinking), ("answer", answer))
    }
    named = {v for v in found.values() if v is not None}
    agree = found["problem"] is not None and found["thinking"] is not None and len(named) == 1
    return agree, ", ".join(f"{k}: {v or 'too short to identify'}" for k, v in found.items())


def prompt_conflicts(system_prompt: str | None, style: str) -> str | None:
    """Why a system prompt contradicts the math format this reward grades (None when it does not):
    it asks for the other style's thinking tags, or forbids `\\boxed{}`. A run whose model obeyed
    such a prompt would score 0 on every answer."""
    if not system_prompt:
        return None
    style = STYLE_ALIASES[style]
    opening, closing = TAGS[style]
    for other, (other_open, other_close) in TAGS.items():
        if other != style and other_open in system_prompt and opening not in system_prompt:
            return (
                f"the system prompt asks for {other_open}...{other_close}, the reward (style {style}) grades "
                f"{opening}...{closing}"
            )
    if re.search(r"\b(never|not|don't|dont)\b[^.\n]{0,20}\buse\s+\\boxed", system_prompt, re.IGNORECASE):
        return "the system prompt forbids \\boxed{}, where the reward reads math answers"
    return None


@register_reward("magistral")
def magistral(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    task: Sequence[str] | None = None,
    answer: Sequence[str] | None = None,
    tests: Sequence[Any] | None = None,
    problem: Sequence[str] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    n_tokens: Sequence[int] | None = None,
    test_seed: Sequence[int] | None = None,
    style: str = "think_tokens",
    l_max: int | None = None,
    l_cache: int = 4096,
    languages: Sequence[str] = LANGUAGES,
    language_reward: bool = True,
    max_tests: int = 20,
    **_: Any,
) -> RewardOutput:
    """The Magistral reward of each completion, with its components and, when 0, its reason.

    Fields (one per completion): `task` (`math` by default, or `code`), `answer` (math) or
    `tests` (code), `problem` (for the language check; the prompt by default), `completion_ids`
    or `n_tokens` (for the length penalty), `test_seed` (one per group).
    """
    if style not in STYLE_ALIASES:
        raise ValueError(f"style: {style!r}; expected think_tokens (v13) or think_tags")
    n = len(completions)
    out = RewardOutput([], {"format": [], "correct": [], "length": [], "language": []}, [])
    for i, completion in enumerate(completions):
        kind = task[i] if task is not None else "math"
        thinking, answer_text, reason = split_format(completion, style, kind)
        comps = dict.fromkeys(out.components, 0.0)
        if reason is None:
            comps["format"] = FORMAT
            if kind == "math":
                if answer is None:
                    raise ValueError("magistral reward: math completions need the `answer` field")
                correct = math_correct(answer_text, str(answer[i]))
                why = None if correct else "incorrect: the boxed answer does not match the reference"
            else:
                if tests is None:
                    raise ValueError("magistral reward: code completions need the `tests` field")
                seed = test_seed[i] if test_seed is not None else 0
                correct, why = code_correct(answer_text, tests[i], seed, max_tests)
            comps["correct"] = CORRECT if correct else 0.0
            length = len(completion_ids[i]) if completion_ids is not None else (n_tokens[i] if n_tokens else 0)
            comps["length"] = length_penalty(length, l_max, l_cache)
            if language_reward:
                text = problem[i] if problem is not None else prompts[i]
                agree, found = language_consistent(text, thinking, answer_text, languages)
                comps["language"] = LANGUAGE if agree else 0.0
                if not agree and why is None:
                    why = f"languages differ ({found})"
            reason = why
        total = sum(comps.values())
        out.rewards.append(total)
        for k, v in comps.items():
            out.components[k].append(v)
        out.reasons.append(reason if total == 0 or reason else None)
    assert len(out.rewards) == n
    return out
