"""The SFT step (the cold start): cross-entropy on the answer (assistant) tokens only, the mean over
the batch's answer tokens, packed into fixed-token microbatches.

Several processes: each holds its own examples; the mean is over the global batch.
"""

from __future__ import annotations

import time

from magistral_jax.config import ConfigError
from magistral_jax.data.procedural import Example
from magistral_jax.distributed import global_max, global_sum
from magistral_jax.train.config import RunConfig
from magistral_jax.train.packing import Item, microbatch_rows, pack_across_processes, row_length
from magistral_jax.train.step import Trainer


class SFTStep:
    """One SFT step: cross-entropy on the answer tokens, mean over the batch's answer tokens."""

    def __init__(self, cfg: RunConfig, trainer: Trainer):
        self.cfg, self.trainer = cfg, trainer

    def __call__(self, examples: list[Example], step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if any(e.answer is None for e in examples):
            raise ConfigError("data: SFT needs examples with answers")
        # With several processes, each holds its own examples; the mean is over the global batch.
        total = global_sum(sum(len(e.answer) for e in examples))
        items = [Item(tokens=e.prompt + e.answer, loss_start=len(e.prompt), weight=1.0 / total) for e in examples]
        length = row_length(self.cfg.row_len, global_max(max(len(i.tokens) for i in items)))
        model = self.trainer.model
        packing = pack_across_processes(
            items, length, microbatch_rows(self.cfg.microbatch_tokens, length, model.mesh, model.cfg.rules)
        )
        metrics = self.trainer.train_step(packing.microbatches)
        seconds = time.perf_counter() - t0
        metrics.update(
            padding_saved=packing.padding_saved,
            time_training=seconds,
            tokens_per_s=global_sum(sum(len(i.tokens) for i in items)) / seconds,
        )
        return metrics
