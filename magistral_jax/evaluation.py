"""Evaluation as the Magistral paper reports it: k samples per problem, scored by the training reward.

- pass@1: the share of correct samples, averaged over the k samples of every problem (the paper's
  AIME protocol with k = 64);
- maj@k: the most frequent `\\boxed{}` answer of the k samples is correct (math problems; samples
  without a boxed answer do not vote, ties go to the answer seen first);
- format rate and language consistency (the reward's components), mean completion and thinking
  length in tokens; all of them overall and per language.

`sample_and_score` is shared by `magistral-jax eval`, `magistral-jax filter` and the demo.
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
) -> list[Sample]:
    """`k` completions of every problem (in batches of `batch_problems` prompts) scored by the
    Magistral reward with `reward` settings (`style`, `l_max`, `l_cache`, ...)."""
    from tqdm.auto import tqdm

    from magistral_jax.data.sources import problem_fields
    from magistral_jax.rl.magistral_rewards import last_boxed, split_format
    from magistral_jax.rl.rewards import RewardPool
    from magistral_jax.sampling import Sampler

    if k < 1 or batch_problems < 1:
        raise ValueError(f"k ({k}) and the problems per batch ({batch_problems}) must be positive")
    sampler = Sampler(model, stop_ids=(tokenizer.eos_id,))
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
            scored = pool(
                [f["problem"] for f in fields],
                texts,
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


def majority_correct(samples: Sequence[Sample]) -> bool | None:
    """Whether the most frequent boxed answer among `samples` (one problem's) is a correct one;
    None when no sample has a boxed answer."""
    votes = Counter(s.boxed.strip() for s in samples if s.boxed is not None)
    if not votes:
        return None
    answer = votes.most_common(1)[0][0]
    chosen = [s for s in samples if s.boxed is not None and s.boxed.strip() == answer]
    return any(s.components.get("correct", 0.0) > 0 for s in chosen)


def _summary(problems: Sequence[Problem], samples: Sequence[Sample], k: int) -> dict[str, float]:
    by_problem: dict[int, list[Sample]] = {}
    for s in samples:
        by_problem.setdefault(s.index, []).append(s)
    rates = [np.mean([s.components.get("correct", 0.0) > 0 for s in group]) for group in by_problem.values()]
    maj = [bool(majority_correct(group)) for i, group in by_problem.items() if problems[i].task == "math"]
    return {
        "problems": len(by_problem),
        "pass@1": float(np.mean(rates)),
        f"maj@{k}": float(np.mean(maj)) if maj else float("nan"),
        "format": float(np.mean([s.components.get("format", 0.0) > 0 for s in samples])),
        "language": float(np.mean([s.components.get("language", 0.0) > 0 for s in samples])),
        "reward": float(np.mean([s.reward for s in samples])),
        "length": float(np.mean([s.length for s in samples])),
        "thinking_length": float(np.mean([s.thinking_length for s in samples])),
    }


def summarize(problems: Sequence[Problem], samples: Sequence[Sample], k: int) -> dict[str, Any]:
    """The report: the overall figures, then the same per language (problems without one: `unknown`)."""
    languages = sorted({p.language or "unknown" for p in problems})
    per_language = {}
    for language in languages:
        chosen = [s for s in samples if (problems[s.index].language or "unknown") == language]
        if chosen:
            per_language[language] = _summary(problems, chosen, k)
    return {"k": k, **_summary(problems, samples, k), "per_language": per_language}


def plot_report(report: dict[str, Any], path: str) -> str:
    """A bar chart of pass@1 and maj@k per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    names = [*report["per_language"], "all"]
    rows = [*report["per_language"].values(), report]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.5))
    ax.bar(x - 0.2, [r["pass@1"] for r in rows], 0.4, label="pass@1")
    ax.bar(x + 0.2, [np.nan_to_num(r[f"maj@{k}"]) for r in rows], 0.4, label=f"maj@{k}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"pass@1 (mean of {k} samples) and maj@{k}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
