"""Evaluation as the Magistral paper reports it: k samples per problem, scored by the training reward.

- pass@1: the share of correct samples, averaged over the k samples of every problem (the paper's
  AIME protocol with k = 64);
- maj@k: the most frequent `\\boxed{}` answer of the k samples is correct (math problems, GPQA's
  letters; samples without a boxed answer do not vote, ties go to the answer seen first). Answers
  vote together when the reward's verifier (`math_correct`, math-verify) finds them equal, so `0.5`,
  `1/2` and `\\frac{1}{2}` are one vote, and so are `042` and `42`;
- format rate and language consistency (the reward's components), mean completion and thinking
  length in tokens; all of them overall and per language.

`sample_and_score` is shared by `magistral-jax eval`, `magistral-jax filter` and the demo. Problems
with functional tests (LiveCodeBench's LeetCode problems: `fn_name`) are graded through a driver that
calls the completion's method on each test (`with_call_driver`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from magistral_jax.data.problems import Problem


@dataclass
class Sample:
    """One scored completion of problem `index`."""

    index: int
    text: str
    reward: float
    components: dict[str, float]
    reason: str | None
    length: int
    thinking_length: int
    boxed: str | None


# Runs the completion's code as a module (its `if __name__ == "__main__":` part stays idle, as in
# LiveCodeBench's harness) with what LeetCode's environment imports, then calls the method once per
# test with one JSON argument per input line and prints the result as JSON.
_DRIVER = """import json, sys
namespace = {{"__name__": "solution"}}
exec("from typing import *\\nfrom collections import *\\nfrom heapq import *\\nfrom bisect import *\\n"
     "from itertools import *\\nfrom functools import *\\nfrom math import *\\n"
     "import math, heapq, bisect, itertools, functools, collections, re, string", namespace)
exec(compile({source!r}, "solution.py", "exec"), namespace)
method = namespace["Solution"]().{fn_name} if "Solution" in namespace else namespace[{fn_name!r}]
arguments = [json.loads(line) for line in sys.stdin.read().splitlines() if line.strip()]
print(json.dumps(method(*arguments)))
"""


def with_call_driver(completion: str, fn_name: str | None, style: str) -> str:
    """The completion to grade for a problem whose tests call method `fn_name` (LiveCodeBench's
    functional tests): its first Python block in the answer replaced by a program that runs that
    block and calls the method on stdin's arguments. Unchanged without `fn_name`, or when the
    format or language is wrong (the reward then says why)."""
    from magistral_jax.rl.magistral_rewards import CODE_LANGUAGES, FENCE, split_format

    if fn_name is None:
        return completion
    if not fn_name.isidentifier():
        raise ValueError(f"fn_name: {fn_name!r} is not a Python identifier")
    _, answer, reason = split_format(completion, style, "code")
    if reason is not None or answer is None:
        return completion
    block = FENCE.search(answer)
    if block is None or CODE_LANGUAGES.get(block.group(1).lower()) != "python":
        return completion
    offset = len(completion) - len(answer)
    program = _DRIVER.format(source=block.group(2), fn_name=fn_name)
    return completion[: offset + block.start(2)] + program + completion[offset + block.end(2) :]


def thinking_length(tokenizer, ids: Sequence[int]) -> int:
    """Tokens inside the thinking block of completion `ids` (to its end when it is never closed)."""
    from magistral_jax.tokenizer import split_text

    ids = [int(i) for i in ids]
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    if tokenizer.think_id is not None:
        if tokenizer.think_id not in ids:
            return 0
        start = ids.index(tokenizer.think_id) + 1
        end = ids.index(tokenizer.end_think_id, start) if tokenizer.end_think_id in ids[start:] else len(ids)
        return end - start
    thinking = split_text(tokenizer.decode(ids), "think_tags").thinking
    return len(tokenizer.encode_completion(thinking, eos=False)) if thinking else 0


def sample_and_score(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    k: int,
    max_new_tokens: int,
    sampling,
    seed: int = 0,
    system_prompt: str | None = None,
    batch_problems: int = 8,
    reward: dict[str, Any] | None = None,
    workers: int = 0,
    progress: bool = True,
    cache: dict[str, Any] | None = None,
) -> list[Sample]:
    """`k` completions of every problem (in batches of `batch_problems` prompts) scored by the
    Magistral reward with `reward` settings (`style`, `l_max`, `l_cache`, ...), sampled over the
    KV cache `cache` describes (`sampling.continuous.make_sampler`'s options; default contiguous)."""
    from tqdm.auto import tqdm

    from magistral_jax.data.sources import problem_fields
    from magistral_jax.rl.magistral_rewards import last_boxed, split_format
    from magistral_jax.rl.pool import RewardPool
    from magistral_jax.sampling.continuous import make_sampler

    if k < 1 or batch_problems < 1:
        raise ValueError(f"k ({k}) and the problems per batch ({batch_problems}) must be positive")
    sampler = make_sampler(model, (tokenizer.eos_id,), **(cache or {}))
    settings = {"style": tokenizer.style, **(reward or {})}
    samples: list[Sample] = []
    with (
        RewardPool("magistral", settings, workers) as pool,
        tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress) as bar,
    ):
        for first in range(0, len(problems), batch_problems):
            batch = problems[first : first + batch_problems]
            prompts = [tokenizer.encode_chat(p.problem, system_prompt) for p in batch]
            out = sampler.sample(prompts, max_new_tokens=max_new_tokens, n=k, sampling=sampling, seed=seed + first)
            ids = [out.completion(r) for r in range(len(out.lengths))]
            texts = [tokenizer.decode(c[:-1] if c and c[-1] == tokenizer.eos_id else c, keep_special=True) for c in ids]
            fields = [problem_fields(batch[r // k]) for r in range(len(ids))]
            graded = [with_call_driver(t, batch[r // k].fn_name, settings["style"]) for r, t in enumerate(texts)]
            scored = pool(
                [f["problem"] for f in fields],
                graded,
                completion_ids=ids,
                **{key: [f[key] for f in fields] for key in ("problem", "task", "answer", "tests", "test_seed")},
            )
            for r, text in enumerate(texts):
                _, answer, _ = split_format(text, settings["style"], fields[r]["task"])
                samples.append(
                    Sample(
                        index=first + r // k,
                        text=text,
                        reward=scored.rewards[r],
                        components={name: v[r] for name, v in scored.components.items()},
                        reason=scored.reasons[r],
                        length=len(ids[r]),
                        thinking_length=thinking_length(tokenizer, ids[r]),
                        boxed=last_boxed(answer) if answer is not None and fields[r]["task"] == "math" else None,
                    )
                )
            bar.update(len(batch))
    return samples


def pass_rates(samples: Sequence[Sample], n_problems: int) -> np.ndarray:
    """The share of correct samples of every problem."""
    correct, total = np.zeros(n_problems), np.zeros(n_problems)
    for s in samples:
        total[s.index] += 1
        correct[s.index] += s.components.get("correct", 0.0) > 0
    return correct / np.maximum(total, 1)


def answer_classes(answers: Sequence[str]) -> list[int]:
    """For each answer, the index of its class: answers the reward's verifier finds equal (to the
    first answer of a class) share one; classes are numbered in order of first appearance."""
    from magistral_jax.rl.magistral_rewards import math_correct

    representatives: list[str] = []
    known: dict[str, int] = {}
    out = []
    for answer in answers:
        key = answer.strip()
        if key not in known:
            match = (i for i, r in enumerate(representatives) if math_correct(f"\\boxed{{{key}}}", r))
            known[key] = next(match, len(representatives))
            if known[key] == len(representatives):
                representatives.append(key)
        out.append(known[key])
    return out


def majority_correct(samples: Sequence[Sample]) -> bool | None:
    """Whether the most frequent boxed answer among `samples` (one problem's), counted by
    mathematical equivalence, is correct; None when no sample has a boxed answer."""
    voters = [s for s in samples if s.boxed is not None]
    if not voters:
        return None
    classes = answer_classes([s.boxed for s in voters])
    winner = Counter(classes).most_common(1)[0][0]  # ties: the class seen first
    first = voters[classes.index(winner)]
    return first.components.get("correct", 0.0) > 0


def _summary(problems: Sequence[Problem], samples: Sequence[Sample], k: int) -> dict[str, float]:
    by_problem: dict[int, list[Sample]] = {}
    for s in samples:
        by_problem.setdefault(s.index, []).append(s)
    rates = [np.mean([s.components.get("correct", 0.0) > 0 for s in group]) for group in by_problem.values()]
    maj = [bool(majority_correct(group)) for i, group in by_problem.items() if problems[i].task == "math"]
    return {
        "problems": len(by_problem),
        "pass@1": float(np.mean(rates)),
        f"maj@{k}": float(np.mean(maj)) if maj else None,  # None: no answer to vote on (code)
        "format": float(np.mean([s.components.get("format", 0.0) > 0 for s in samples])),
        "language": float(np.mean([s.components.get("language", 0.0) > 0 for s in samples])),
        "reward": float(np.mean([s.reward for s in samples])),
        "length": float(np.mean([s.length for s in samples])),
        "thinking_length": float(np.mean([s.thinking_length for s in samples])),
    }


def summarize(problems: Sequence[Problem], samples: Sequence[Sample], k: int) -> dict[str, Any]:
    """The report: the overall figures, then the same per language where the set has languages
    (problems without one: `unknown`)."""
    has_languages = any(p.language for p in problems)
    languages = sorted({p.language or "unknown" for p in problems}) if has_languages else []
    per_language = {}
    for language in languages:
        chosen = [s for s in samples if (problems[s.index].language or "unknown") == language]
        if chosen:
            per_language[language] = _summary(problems, chosen, k)
    return {"k": k, **_summary(problems, samples, k), "per_language": per_language}


def plot_report(report: dict[str, Any], path: str) -> str:
    """A bar chart of pass@1 and maj@k: per benchmark for a benchmark report, else per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "benchmarks" in report:
        from magistral_jax.data.benchmarks import BENCHMARKS

        names = [BENCHMARKS[name].title for name in report["benchmarks"]]
        rows = [(r["pass@1"], r[f"maj@{r['k']}"]) for r in report["benchmarks"].values()]
        title = "pass@1 (mean of k samples) and maj@k"
    else:
        k = report["k"]
        names = [*report["per_language"], "all"]
        rows = [(r["pass@1"], r[f"maj@{k}"]) for r in [*report["per_language"].values(), report]]
        title = f"pass@1 (mean of {k} samples) and maj@{k}"
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.5))
    ax.bar(x - 0.2, [p for p, _ in rows], 0.4, label="pass@1")
    ax.bar(x + 0.2, [m or 0.0 for _, m in rows], 0.4, label="maj@k")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
