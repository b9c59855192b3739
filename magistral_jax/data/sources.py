"""Data sources by name, as run configs select them (`data: {name: ..., ...}`).

| name | examples | needs a tokenizer |
|---|---|---|
| `random_prompts` | random token prompts (trivial rewards) | no |
| `reverse_digits` | reverse a digit string, with the answer | no |
| `problems` | problems from a file (`path`, or `bundled:NAME`) as chat prompts, with reward fields | yes |
| `traces` | problems with a worked `trace`: prompt + completion for SFT | yes |

`problems` and `traces` accept `system_prompt` (`default`, `none` or a file), `levels` and
`languages` filters, and `strict` (stop at the first malformed row instead of skipping it).
"""

from __future__ import annotations

import zlib
from typing import Any

from magistral_jax.data.problems import DataError, Problem, ProblemSource, read_problems
from magistral_jax.data.procedural import SOURCES, Example


def system_prompt(choice: str, tokenizer) -> str | None:
    """The system prompt of training data: `none`, `default` (the tokenizer's training prompt: the
    model card's for the `[THINK]` style, the paper's RL prompt for the `<think>` style), or a file."""
    if choice == "none":
        return None
    if choice == "default":
        return tokenizer.training_system_prompt()
    with open(choice) as f:
        return f.read()


def problem_fields(p: Problem) -> dict[str, Any]:
    """What the rewards read of a problem (same for every completion of its group)."""
    return {
        "problem": p.problem,
        "task": p.task,
        "answer": p.answer,
        "tests": p.tests,
        "language": p.language,
        "test_seed": zlib.crc32(p.id.encode()),
    }


def make_source(spec: dict[str, Any], seed: int, tokenizer=None):
    """A source from a config section `{name: ..., **arguments}`."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name in SOURCES:
        try:
            return SOURCES[name](seed=seed, **spec)
        except TypeError as e:
            raise ValueError(f"data ({name}): {e}") from None
    if name not in ("problems", "traces"):
        raise ValueError(
            f"data.name: {name!r} is not a data source; known: {', '.join([*SOURCES, 'problems', 'traces'])}"
        )
    if tokenizer is None:
        raise ValueError(f"data ({name}): needs a tokenizer (set `tokenizer:` in the run config)")
    path = spec.pop("path", None)
    if path is None:
        raise ValueError(f"data ({name}): `path` is required")
    system = system_prompt(spec.pop("system_prompt", "default"), tokenizer)
    levels, languages = spec.pop("levels", None), spec.pop("languages", None)
    strict = bool(spec.pop("strict", False))
    if spec:
        raise ValueError(f"data ({name}): unknown keys {sorted(spec)}")
    problems = [
        p
        for p in read_problems(path, strict=strict).problems
        if (levels is None or p.level in levels) and (languages is None or p.language in languages)
    ]
    if name == "traces":
        problems = [p for p in problems if p.trace]
    if not problems:
        raise DataError(f"data ({name}): no problems in {path} pass the filters")

    def encode(p: Problem) -> Example:
        prompt = tokenizer.encode_chat(p.problem, system)
        answer = tokenizer.encode_completion(p.trace) if name == "traces" else None
        return Example(prompt, answer, problem_fields(p))

    return ProblemSource(problems, encode, seed=seed)
