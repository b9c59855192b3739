"""Procedural data sets: deterministic, endless, token-level (no tokenizer needed).

Example `i` of a source is a function of `(seed, i)` alone, so a source's whole state is the
index of the next example: saving it with the train state makes a resumed run draw exactly the
examples an uninterrupted one would have drawn.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOS, EOS, SEP = 1, 2, 4  # <s>, </s>, [/INST]
DIGIT0 = 48  # digit d is token 48 + d


@dataclass
class Example:
    """A prompt (token ids), the reference answer's token ids if any, and fields for rewards."""

    prompt: list[int]
    answer: list[int] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class Source(abc.ABC):
    """Base of the procedural sources: `next(n)` draws the next n examples."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.index = 0

    @abc.abstractmethod
    def example(self, rng: np.random.Generator) -> Example:
        """The example drawn with `rng` (seeded by the source's seed and the example's index)."""

    def next(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            out.append(self.example(np.random.default_rng((self.seed, self.index))))
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


class RandomPrompts(Source):
    """Prompts of random tokens in [low, high), of `min_len` to `max_len` tokens after `<s>`.

    `budget: [lo, hi]` gives each prompt a budget of new tokens drawn uniformly from it (the
    `max_new_tokens` field, which GRPO honours): a workload with a chosen spread of completion
    lengths even for a model that never stops by itself.
    """

    def __init__(
        self,
        seed: int = 0,
        low: int = 3,
        high: int = 100,
        min_len: int = 4,
        max_len: int = 8,
        budget: list[int] | None = None,
    ):
        super().__init__(seed)
        if not 0 <= low < high or not 1 <= min_len <= max_len:
            raise ValueError(f"random_prompts: bad ranges low={low} high={high} min_len={min_len} max_len={max_len}")
        if budget is not None and (len(budget) != 2 or not 1 <= budget[0] <= budget[1]):
            raise ValueError(f"random_prompts: budget must be [lo, hi] with 1 <= lo <= hi, got {budget}")
        self.low, self.high, self.min_len, self.max_len, self.budget = low, high, min_len, max_len, budget

    def example(self, rng: np.random.Generator) -> Example:
        n = int(rng.integers(self.min_len, self.max_len + 1))
        prompt = [BOS, *rng.integers(self.low, self.high, n).tolist()]
        if self.budget is None:
            return Example(prompt)
        return Example(prompt, fields={"max_new_tokens": int(rng.integers(self.budget[0], self.budget[1] + 1))})


class ReverseDigits(Source):
    """`<s> d1 .. dn [/INST]` -> `dn .. d1 </s>`, n in [min_len, max_len]."""

    def __init__(self, seed: int = 0, min_len: int = 3, max_len: int = 8):
        super().__init__(seed)
        if not 1 <= min_len <= max_len:
            raise ValueError(f"reverse_digits: bad lengths min_len={min_len} max_len={max_len}")
        self.min_len, self.max_len = min_len, max_len

    def example(self, rng: np.random.Generator) -> Example:
        digits = rng.integers(0, 10, int(rng.integers(self.min_len, self.max_len + 1))).tolist()
        answer = [*(DIGIT0 + d for d in reversed(digits)), EOS]
        return Example([BOS, *(DIGIT0 + d for d in digits), SEP], answer, {"answer": answer})


SOURCES: dict[str, type[Source]] = {"random_prompts": RandomPrompts, "reverse_digits": ReverseDigits}
