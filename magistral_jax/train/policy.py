"""The policy that generation samples from, and how the trainer's newest weights reach it.

Both GRPO drivers hand weights to their generator the same way: `push(params, version)` after an
update, `pull()` on the generator's side when it may swap (the synchronous driver before its next
draw, the asynchronous generator between two decode chunks, without dropping in-flight sequences).
Colocated (synchronous), the pushed arrays are the trainer's own, nothing is copied. On a
generator mesh of its own (asynchronous), `push` moves them device to device (`weight_push`).
"""

from __future__ import annotations

import functools
import threading

import jax


class Policy:
    """Generation's weights: `model` (a `Model` on the generator's devices) at `version`.

    Args:
      model: the model generation runs, with the weights of `version`.
      version: the trainer step that produced them.
      shardings: the generator mesh's parameter shardings when it differs from the trainer's (pushed
        weights are moved there), or None when generation shares the trainer's devices.
    """

    def __init__(self, model, version: int = 0, shardings=None):
        self.model, self.version, self.shardings = model, version, shardings
        self._lock = threading.Lock()
        self._pending: tuple[object, int] | None = None

    def push(self, params, version: int) -> None:
        """New weights from the trainer (any thread); generation takes them at its next `pull`."""
        if self.shardings is not None:
            params = weight_push(params, self.shardings)
        with self._lock:
            self._pending = (params, version)

    def pull(self) -> tuple[object, int] | None:
        """Swaps in the weights pushed since the last pull, if any; returns (params, version) or None."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self.model.params, self.version = pending
        return pending


@functools.lru_cache(maxsize=8)
def _replicate(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))


def weight_push(trainer_params, generator_shardings):
    """The trainer's parameters on the generator mesh, device to device.

    One process: `jax.device_put` across the two meshes. Several: each leaf is first replicated over
    the trainer mesh (an all-gather, every process together), then this process's copy moves to its
    own generator devices; one leaf at a time, so at most one whole tensor is gathered at once.
    """
    if jax.process_count() == 1:
        return jax.block_until_ready(jax.device_put(trainer_params, generator_shardings))

    def one(x, sharding):
        whole = _replicate(x.sharding.mesh)(x)
        return jax.device_put(whole.addressable_shards[0].data, sharding)

    return jax.block_until_ready(jax.tree.map(one, trainer_params, generator_shardings))
