"""Data sources by name, as run configs select them (`data: {name: ..., ...}`).

| name | examples | needs a tokenizer |
|---|---|---|
| `random_prompts` | random token prompts (trivial rewards) | no |
| `reverse_digits` | reverse a digit string, with the answer | no |
| `problems` | problems from a file (`path`, or `bundled:NAME`) as chat prompts, with reward fields | yes |
| `traces` | problems with a worked `trace`: prompt + completion for SFT | yes |
| `package.module:factory` | whatever `factory(seed=..., [tokenizer=...,] **rest of the section)` returns | if it asks |

`problems` and `traces` accept `fields` (problem field -> the file's column, e.g. `{problem:
question}`), `answer_format` (`raw`, `gsm8k`, `boxed`), `system_prompt` (`default`, `none` or a
file), `levels` and `languages` filters, and `strict` (stop at the first malformed row instead of
skipping it; skipped rows are reported on stderr with the first reasons). A factory named by import
path must return an object with `next(n) -> list[Example]`, `state() -> dict` and
`restore(state)`, like `procedural.Source`.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

from magistral_jax.data.problems import DataError, Problem, ProblemSource, read_problems
from magistral_jax.data.procedural import SOURCES, Example
from magistral_jax.tokenizer import resolve_system_prompt


def system_prompt(choice: str, tokenizer) -> str | None:
    """The system prompt of training data (a data section's `system_prompt`): `none`, `default`
    (the tokenizer's training prompt: the model card's for the `[THINK]` style, the paper's RL
    prompt for the `<think>` style), or a file; see `tokenizer.resolve_system_prompt`."""
    return resolve_system_prompt(choice, tokenizer, "training", setting="data.system_prompt")


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


def _plugin_source(name: str, spec: dict[str, Any], seed: int, tokenizer):
    import inspect

    from magistral_jax.plugins import load_object

    factory = load_object(name, "data.name")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = dict(spec, seed=seed)
    if "tokenizer" in parameters or takes_any:
        kwargs["tokenizer"] = tokenizer
    try:
        source = factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"data ({name}): {e}") from None
    missing = [m for m in ("next", "state", "restore") if not callable(getattr(source, m, None))]
    if missing:
        raise ValueError(f"data ({name}): returned a {type(source).__name__} without {', '.join(missing)}")
    return source


def problem_section(name: str, spec: dict[str, Any], tokenizer) -> tuple[list[Problem], str | None]:
    """The problems a `problems` / `traces` data section selects (its file read with its `fields`,
    `answer_format` and `strict`, then its `levels` and `languages` filters; skipped rows reported)
    and the system prompt it names."""
    import jax

    spec = dict(spec)
    spec.pop("name", None)
    if tokenizer is None:
        raise ValueError(f"data ({name}): needs a tokenizer (set `tokenizer:` in the run config)")
    path = spec.pop("path", None)
    if path is None:
        raise ValueError(f"data ({name}): `path` is required")
    system = system_prompt(spec.pop("system_prompt", "default"), tokenizer)
    levels, languages = spec.pop("levels", None), spec.pop("languages", None)
    strict = bool(spec.pop("strict", False))
    fields, answer_format = spec.pop("fields", None), spec.pop("answer_format", "raw")
    if spec:
        raise ValueError(f"data ({name}): unknown keys {sorted(spec)}")
    data = read_problems(path, strict=strict, fields=fields, answer_format=answer_format)
    if jax.process_index() == 0:
        data.report_skipped(f"data ({name}): {path}")
    functional = sum(p.fn_name is not None for p in data.problems)
    if functional and jax.process_index() == 0:
        print(
            f"data ({name}): {path}: left out {functional} problems with functional tests (the training "
            "reward runs programs on stdin; `eval` and `score` grade them)",
            file=sys.stderr,
        )
    problems = [
        p
        for p in data.problems
        if p.fn_name is None
        and (levels is None or p.level in levels)
        and (languages is None or p.language in languages)
    ]
    if name == "traces":
        problems = [p for p in problems if p.trace]
    if not problems:
        raise DataError(f"data ({name}): no problems in {path} pass the filters")
    return problems, system


def make_source(spec: dict[str, Any], seed: int, tokenizer=None):
    """A source from a config section `{name: ..., **arguments}`."""
    from magistral_jax.plugins import is_import_path

    spec = dict(spec)
    name = spec.pop("name", None)
    if name in SOURCES:
        try:
            return SOURCES[name](seed=seed, **spec)
        except TypeError as e:
            raise ValueError(f"data ({name}): {e}") from None
    if is_import_path(name):
        return _plugin_source(name, spec, seed, tokenizer)
    if name not in ("problems", "traces"):
        raise ValueError(
            f"data.name: {name!r} is not a data source; known: {', '.join([*SOURCES, 'problems', 'traces'])} "
            "or package.module:factory"
        )
    problems, system = problem_section(name, spec, tokenizer)

    def encode(p: Problem) -> Example:
        prompt = tokenizer.encode_chat(p.problem, system)
        answer = tokenizer.encode_completion(p.trace) if name == "traces" else None
        return Example(prompt, answer, problem_fields(p))

    return ProblemSource(problems, encode, seed=seed)
