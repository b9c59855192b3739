"""Magistral's asynchronous GRPO: generators that never wait for the trainer, weights updated in flight.

The devices are split into two disjoint sets (`async_rl.generator_devices` then
`async_rl.trainer_devices`), each with its own mesh and its own sharding of the same parameters.

- The generator (a thread) decodes `async_rl.slots` sequences at once with a
  `ContinuousBatcher`: every `async_rl.chunk` decode steps, finished sequences leave their slot and
  new prompts take it. Its KV cache is contiguous or paged (`async_rl.cache`); a paged batcher
  admits a group's samples as its pages allow and hands the others back to wait. When all
  samples of a group have finished, the group goes to a verifier thread (which scores it with the
  run's reward pool) and then into the queue.
- The trainer (the calling thread) takes scored groups from the queue, oldest first, until it holds
  `prompts_per_step` groups with signal (for variants that drop the others; at most `max_draws x
  prompts_per_step` groups a step), trains on them exactly as the synchronous step does
  (`train.grpo`: minibatches, advantages, packing; the sampler's log-probabilities are the loss's
  pi_old) and pushes the new weights to the generator's `Policy` (`train.policy`: device to device).
  Groups without signal are consumed, not trained: they count as drawn in the metrics and in the
  data ledger. The generator swaps them in
  between two decode chunks; in-flight sequences keep their KV cache, and every token records the
  policy version it was drawn from.
- The queue is bounded by `async_rl.max_async_ratio`: a group is admitted to generation only while
  the completions generating, being scored and waiting in the queue stay within `ratio * n_batch`
  (n_batch = prompts_per_step * group_size). This bounds how stale a trained token can be, and
  makes the generator wait (for room, not for weights) when the trainer is the bottleneck.
- Every admitted group with signal is trained once, in the order the groups finish: none is dropped
  for being slow, so the lengths of trained completions follow those generated (no bias toward
  short ones).

Metrics (beside the trainer's, per step): `policy_lag_mean` / `policy_lag_max` (trainer version
minus the version of each trained token), `queue_depth` (completions waiting when the trainer took
its batch), `outstanding_max` (the most completions ever generating, being scored or queued: at
most `ratio * n_batch`), `weight_push_s`, `generator_tokens_per_s` (since the previous step),
`generator_busy_tokens_per_s` (per second the generator spent prefilling and decoding, its waits
for room and weights left out), `trainer_utilisation` (share of the step's wall time spent training) and `wait_s`.

Resuming: group `g` is the g-th prompt drawn from the data source. A checkpoint stores the data
state at the oldest group not yet trained and the ids of the later groups already trained; a resumed
run draws again from there and skips the trained ones, so no prompt is lost or trained twice
(in-flight sequences are generated again, with the restored weights). Which groups share a batch
depends on timing, so asynchronous runs are not bit-reproducible, unlike synchronous ones.

Several processes (multi-host): every process generates on its own first `generator_devices`
devices from its own share of the data and contributes `prompts_per_step / process_count` groups to
each step; the trainer mesh is made of the next `trainer_devices` of every process; the weights
reach each process's generator through an all-gather over the trainer mesh.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from magistral_jax.config import ConfigError
from magistral_jax.data.procedural import Example
from magistral_jax.distributed import allgather, allgather_objects
from magistral_jax.sampling.continuous import ContinuousBatcher, Finished, Request
from magistral_jax.train.grpo import GRPOLearner, budget
from magistral_jax.train.policy import Policy, weight_push
from magistral_jax.train.rollouts import Rollouts, gather


@dataclass
class ScoredGroup:
    """The `group_size` completions of one prompt (in sample order) with their rewards."""

    gid: int
    example: Example
    finished: list[Finished]
    rewards: np.ndarray
    components: dict[str, np.ndarray]


class RolloutQueue:
    """Scored groups waiting for the trainer, with admission bounded by `capacity` completions
    (generating + being scored + queued)."""

    def __init__(self, capacity: int, group_size: int):
        self.capacity, self.group_size = capacity, group_size
        self.cond = threading.Condition()
        self.in_flight = 0  # groups admitted, not yet queued
        self.groups: collections.deque[ScoredGroup] = collections.deque()
        self.peak = 0  # the most completions ever outstanding

    def outstanding(self) -> int:
        return (self.in_flight + len(self.groups)) * self.group_size

    def try_admit(self) -> bool:
        """Admits one more group if the bound allows it."""
        with self.cond:
            if self.outstanding() + self.group_size > self.capacity:
                return False
            self.in_flight += 1
            self.peak = max(self.peak, self.outstanding())
            return True

    def put(self, group: ScoredGroup) -> None:
        with self.cond:
            self.in_flight -= 1
            self.groups.append(group)
            self.cond.notify_all()

    def take(self, n: int, check) -> tuple[list[ScoredGroup], int]:
        """The oldest `n` groups (blocking) and the completions queued before taking them;
        `check()` runs while waiting and raises if the producer failed."""
        with self.cond:
            while len(self.groups) < n:
                check()
                self.cond.wait(0.2)
            depth = len(self.groups) * self.group_size
            out = [self.groups.popleft() for _ in range(n)]
            self.cond.notify_all()
            return out, depth

    def wait_for_room(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.outstanding() + self.group_size <= self.capacity, timeout)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


def sample_seed(seed: int, gid: int, sample: int) -> int:
    """The seed of sample `sample` of group `gid`: a function of the run's seed and the ids only."""
    return int(np.random.default_rng((seed, gid, sample, 11)).integers(2**31))


class Generator(threading.Thread):
    """Draws groups, decodes them with continuous batching, sends finished groups to the verifiers.

    Args:
      batcher: the `ContinuousBatcher` on the generator mesh.
      policy: the `Policy` whose model the batcher runs; new weights are pulled between chunks.
      source: the data source (only this thread draws from it).
      queue: the bounded `RolloutQueue`.
      score: `score(example, finished) -> (rewards, components)` for one group (verifier threads).
      next_gid / skip: the id of the next group to draw and the ids to skip (trained already).
    """

    def __init__(
        self,
        batcher: ContinuousBatcher,
        policy: Policy,
        source,
        queue: RolloutQueue,
        score,
        *,
        group_size: int,
        max_new_tokens: int,
        seed: int,
        verifiers: int,
        next_gid: int = 0,
        skip: set[int] | None = None,
    ):
        super().__init__(name="magistral-generator", daemon=True)
        self.batcher, self.policy, self.source, self.queue, self.score = batcher, policy, source, queue, score
        self.group_size, self.max_new_tokens, self.seed = group_size, max_new_tokens, seed
        self.next_gid, self.skip = next_gid, set(skip or ())
        self.lock = threading.Lock()
        self.ledger: dict[int, Any] = {}  # gid -> the source's state before drawing it
        self.pending: collections.deque[Request] = collections.deque()
        self.collected: dict[int, list[Finished | None]] = {}
        self.examples: dict[int, Example] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.verifiers = ThreadPoolExecutor(max(1, verifiers), thread_name_prefix="magistral-verifier")
        self.busy_s = 0.0  # time spent prefilling and decoding (not waiting for room or weights)

    # ---- the trainer's side ----

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the generator thread failed") from self.error
        if not self.is_alive() and not self.stopping.is_set():
            raise RuntimeError("the generator thread stopped")

    def data_state(self, trained: set[int]) -> dict[str, Any]:
        """What a checkpoint keeps to resume the data: the source's state before the oldest group
        not yet trained, that group's id, and the ids after it trained already."""
        with self.lock:
            untrained = [g for g in self.ledger if g not in trained]
            first = min(untrained) if untrained else self.next_gid
            data = self.ledger[first] if untrained else copy.deepcopy(self.source.state())
            for g in [g for g in self.ledger if g < first]:
                del self.ledger[g]
        return {"data": data, "first_group": first, "trained_after": sorted(g for g in trained if g > first)}

    def stop(self) -> None:
        self.stopping.set()
        self.queue.wake()
        self.join()
        self.verifiers.shutdown(wait=True, cancel_futures=True)

    # ---- the generator thread ----

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                new = self.policy.pull()
                if new is not None:
                    self.batcher.set_params(*new)
                t0 = time.perf_counter()
                self._fill()
                self.busy_s += time.perf_counter() - t0
                if not self.batcher.busy:
                    self.queue.wait_for_room(0.1)
                    continue
                t0 = time.perf_counter()
                finished = self.batcher.step()
                self.busy_s += time.perf_counter() - t0
                for f in finished:
                    self._collect(f)
        except BaseException as e:  # reported to the trainer by `check`
            self.error = e
            self.queue.wake()

    def _draw(self) -> tuple[int, Example]:
        while True:
            with self.lock:
                gid = self.next_gid
                self.ledger[gid] = copy.deepcopy(self.source.state())
                (example,) = self.source.next(1)
                self.next_gid += 1
            if gid not in self.skip:
                return gid, example
            self.skip.discard(gid)

    def _fill(self) -> None:
        free = len(self.batcher.free_slots)
        while len(self.pending) < free and self.queue.try_admit():
            gid, example = self._draw()
            self.examples[gid] = example
            self.collected[gid] = [None] * self.group_size
            limit = budget(example, self.max_new_tokens)
            for i in range(self.group_size):
                self.pending.append(Request(example.prompt, limit, sample_seed(self.seed, gid, i), (gid, i)))
        take = [self.pending.popleft() for _ in range(min(free, len(self.pending)))]
        # A paged cache may admit fewer than the free slots (pages): the rest wait their turn.
        self.pending.extendleft(reversed(self.batcher.insert(take)))

    def _collect(self, f: Finished) -> None:
        gid, i = f.request.tag
        parts = self.collected[gid]
        parts[i] = f
        if any(p is None for p in parts):
            return
        del self.collected[gid]
        example = self.examples.pop(gid)
        future = self.verifiers.submit(self._score, gid, example, parts)
        future.add_done_callback(self._scored)

    def _score(self, gid: int, example: Example, finished: list[Finished]) -> ScoredGroup:
        rewards, components = self.score(example, finished)
        return ScoredGroup(gid, example, finished, rewards, components)

    def _scored(self, future: Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self.error = future.exception()
            self.queue.wake()
            return
        self.queue.put(future.result())


def split_devices(generator_devices: int, trainer_devices: int) -> tuple[list, list]:
    """The generator's devices (this process's first `generator_devices`) and the trainer's (the
    next `trainer_devices` of every process, 0: all the rest; in process order)."""
    local = jax.local_devices()
    trainer_devices = trainer_devices or len(local) - generator_devices
    if generator_devices < 1 or trainer_devices < 1 or generator_devices + trainer_devices > len(local):
        raise ConfigError(
            f"async_rl: {generator_devices} generator and {trainer_devices} trainer devices do not fit the "
            f"{len(local)} devices of a process here (on the CPU, `magistral-jax train` simulates as many as the "
            "config needs)"
        )
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    first = generator_devices
    trainers = [d for p in sorted(by_process) for d in by_process[p][first : first + trainer_devices]]
    return local[:generator_devices], trainers


def train_async(
    cfg, learner: GRPOLearner, source, generator_devices: list, steps, *, meta: dict[str, Any], finish
) -> dict[str, float]:
    """Runs the asynchronous GRPO steps `steps` (an iterable of step indices, a progress bar say).

    `learner` is the run's `GRPOLearner` (its trainer on the trainer devices), `meta` the restored
    checkpoint's metadata for this process (empty for a new run), and `finish(step, metrics,
    data_state)` logs and checkpoints a finished step (`data_state()` returns what the checkpoint
    keeps of the data).

    Several processes: each generates on its own devices from its own share of the data, into its
    own queue, and contributes up to `prompts_per_step / process_count` groups with signal to every
    step; the trainer mesh spans all processes, and the statistics that choosing groups and
    advantages need are gathered, so a step sees the whole batch as in one process.
    """
    from magistral_jax.api import Model
    from magistral_jax.model import param_specs
    from magistral_jax.model import params as P
    from magistral_jax.sharding import make_mesh, parse_mesh

    a, g = cfg.async_rl, cfg.grpo
    count, index = jax.process_count(), jax.process_index()
    trainer = learner.trainer
    model = trainer.model
    mesh = make_mesh(**parse_mesh(a.generator_mesh), devices=generator_devices)
    shardings = P.shardings(param_specs(model.cfg), mesh, model.cfg.rules)
    n_batch = g.prompts_per_step * g.group_size
    per_step = g.prompts_per_step // count  # groups with signal each process contributes to a step

    start = int(meta.get("step", 0))
    policy = Policy(Model(model.cfg, weight_push(model.params, shardings), mesh), version=start, shardings=shardings)
    batcher = ContinuousBatcher(
        policy.model,
        slots=a.slots or n_batch // count,
        max_prompt_len=a.max_prompt_len,
        max_new_tokens=g.max_new_tokens,
        chunk=a.chunk,
        sampling=learner.sampling,
        stop_ids=learner.stop_ids,
        version=start,
        cache=a.cache,
        page_size=a.page_size,
        pool_tokens=a.pool_tokens or None,
        reserve_tokens=a.reserve_tokens or None,
    )
    queue = RolloutQueue(int(a.max_async_ratio * n_batch) // count, g.group_size)

    def score(example: Example, finished: list[Finished]):
        out = learner.score([example.prompt] * len(finished), [f.tokens for f in finished], [example] * len(finished))
        return np.asarray(out.rewards, np.float64), {k: np.asarray(v, np.float64) for k, v in out.components.items()}

    # A run resumed from a synchronous checkpoint numbers its groups on from the ones trained.
    skip = set(meta.get("trained_after", ()))
    generator = Generator(
        batcher,
        policy,
        source,
        queue,
        score,
        group_size=g.group_size,
        max_new_tokens=g.max_new_tokens,
        seed=cfg.seed * count + index,
        verifiers=a.verifiers,
        next_gid=int(meta.get("first_group", start * per_step)),
        skip=skip,
    )
    consumed = set(skip)  # groups trained, or drawn and dropped for lack of signal

    def data_state() -> dict[str, Any]:
        state = generator.data_state(consumed)
        return state if count == 1 else {"async_per_process": allgather_objects(state)}

    metrics: dict[str, float] = {}
    generator.start()
    try:
        last_time, last_tokens, last_busy = time.perf_counter(), 0, 0.0
        for step in steps:
            t0 = time.perf_counter()
            taken, kept, depth = [], [], None
            while len(kept) < per_step and len(taken) < g.max_draws * per_step:
                want = min(per_step - len(kept), g.max_draws * per_step - len(taken))
                groups, queued = queue.take(want, generator.check)
                depth = queued if depth is None else depth
                taken += groups
                kept += [group for group in groups if learner.signal(group.rewards, group.components)[0]]
            t1 = time.perf_counter()
            finished = [f for group in taken for f in group.finished]
            drawn = gather(
                Rollouts(
                    g.group_size,
                    [group.example.prompt for group in taken],
                    [f.tokens for f in finished],
                    [f.logprobs for f in finished],
                    np.asarray([len(f.tokens) for f in finished]),
                    [f.finish_reason for f in finished],
                    np.concatenate([group.rewards for group in taken]),
                    {k: np.concatenate([group.components[k] for group in taken]) for k in taken[0].components},
                )
            )
            signal = learner.signal(drawn.rewards, drawn.components)
            chosen = np.flatnonzero(signal)
            metrics = learner.drawn_metrics(drawn, signal, len(chosen))
            metrics.update(learner.update(drawn.select(chosen)))
            t2 = time.perf_counter()
            policy.push(model.params, step + 1)
            t3 = time.perf_counter()
            consumed.update(group.gid for group in taken)
            versions = [f.versions for group in kept for f in group.finished]
            lag = step - np.concatenate(versions) if versions else np.zeros(0, np.int64)
            tokens, busy = batcher.generated, generator.busy_s
            # Summed or maxed over the processes (one row each): lag sum, lag tokens, lag max,
            # queue depth, outstanding completions, generated tokens/s, push time, generated
            # tokens/s of the generator's busy time.
            stats = allgather(
                np.array(
                    [
                        lag.sum(),
                        lag.size,
                        lag.max(initial=0),
                        depth,
                        queue.peak,
                        (tokens - last_tokens) / (t3 - last_time),
                        t3 - t2,
                        (tokens - last_tokens) / max(busy - last_busy, 1e-9),
                    ],
                    np.float64,
                )
            )
            metrics.update(
                policy_lag_mean=float(stats[:, 0].sum() / max(stats[:, 1].sum(), 1)),
                policy_lag_max=float(stats[:, 2].max()),
                queue_depth=float(stats[:, 3].sum()),
                outstanding_max=float(stats[:, 4].sum()),
                weight_push_s=float(stats[:, 6].max()),
                wait_s=t1 - t0,
                time_training=t2 - t1,
                time_step=t3 - t0,
                trainer_utilisation=(t2 - t1) / (t3 - t0),
                generator_tokens_per_s=float(stats[:, 5].sum()),
                generator_busy_tokens_per_s=float(stats[:, 7].sum()),
                tokens_per_s=float(drawn.lengths.sum() + metrics["trained_tokens"]) / (t3 - t0),
            )
            last_time, last_tokens, last_busy = t3, tokens, busy
            finish(step, metrics, data_state)
            generator.check()
    finally:
        generator.stop()
    return metrics
