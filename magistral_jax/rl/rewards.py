"""Reward functions: a registry, and a process pool that runs them beside the training loop.

A reward function has one plain signature,

    fn(prompts: list[str], completions: list[str], **fields) -> list[float] | RewardOutput

where every field is a list aligned with `completions` (the problem's `answer` or `tests`, the
completion's token ids as `completion_ids`, ...) and configuration values arrive as keyword
arguments too. A function may return named components and a reason for each zero reward
(`RewardOutput`); a plain list is its own single component.

Functions are registered by name, so a config can select them and worker processes (fresh
interpreters, which never inherit the trainer's accelerator state) can find them.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardOutput:
    """Rewards of a batch, their named components, and why a reward is what it is (or None)."""

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.reasons:
            self.reasons = [None] * len(self.rewards)


RewardFn = Callable[..., "list[float] | RewardOutput"]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`, or the function that `name` = `package.module:function`
    names, imported here: worker processes resolve the name themselves, so they import it too."""
    from magistral_jax.plugins import is_import_path, load_object

    if is_import_path(name):
        return load_object(name, "reward.name")
    if name not in REWARDS:
        import magistral_jax.rl.magistral_rewards  # noqa: F401  (registers `magistral`)
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"reward: unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}") from None


def as_output(result: list[float] | RewardOutput, name: str) -> RewardOutput:
    if isinstance(result, RewardOutput):
        return result
    rewards = [float(r) for r in result]
    return RewardOutput(rewards, {name: rewards})


@register_reward("token_frequency")
def token_frequency(prompts, completions, *, completion_ids, token: int = 7, tokens=None, **_) -> list[float]:
    """The share of the completion's tokens equal to `token` (or in `tokens`): a trivial,
    verifiable reward for tests and demos."""
    wanted = {int(t) for t in tokens} if tokens is not None else {int(token)}
    return [sum(1 for t in ids if t in wanted) / max(len(ids), 1) for ids in completion_ids]


@register_reward("exact_answer")
def exact_answer(prompts, completions, *, completion_ids, answer, **_) -> RewardOutput:
    """1 when the completion's token ids are exactly the answer's (its stop token included), else 0."""
    rewards = [float(list(ids) == list(a)) for ids, a in zip(completion_ids, answer, strict=True)]
    reasons = [None if r else "the completion differs from the answer" for r in rewards]
    return RewardOutput(rewards, {"correct": rewards}, reasons)


def _score(name: str, kwargs: dict[str, Any], prompts, completions, fields) -> RewardOutput:
    return as_output(get_reward(name)(prompts, completions, **kwargs, **fields), name)


DEFAULT_TIMEOUT = 300.0  # per completion: 20 code tests of 4 s and a 10 s compile, with room for a loaded machine


class RewardPool:
    """Scores batches with a registered reward, in `workers` processes (0: in this process).

    With workers, each completion is scored by one worker within `timeout` seconds: a worker
    past it (or dying) is killed and replaced, and the completion gets 0 with the reason, so a
    completion cannot stall or crash the grader. Workers are plain subprocesses exchanging pickles
    over pipes (no multiprocessing semaphores, nothing in /dev/shm), in sessions of their own, and
    end with this process however it ends, SIGKILL included: each watches a pipe whose other end
    only this process holds. Calls from several threads (asynchronous GRPO's verifiers) share the
    workers, never more than `workers` in all. An exception raised by the reward itself (a
    configuration or data error) is raised here.
    """

    def __init__(
        self, name: str, kwargs: dict[str, Any] | None = None, workers: int = 0, timeout: float = DEFAULT_TIMEOUT
    ):
        get_reward(name)  # fail early on an unknown name
        if workers < 0 or timeout <= 0:
            raise ValueError(f"reward pool: workers >= 0 and timeout > 0 expected, got {workers} and {timeout}")
        self.name, self.kwargs, self.workers, self.timeout = name, dict(kwargs or {}), workers, timeout
        self._idle: list[_Worker] = []
        self._live = 0  # workers started and not ended, idle or busy: at most `workers`
        self._changed = threading.Condition()  # callers (verifier threads) share the workers
        self._lifeline = os.pipe() if workers > 0 else None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]) -> RewardOutput:
        n = len(completions)
        for key, values in fields.items():
            if len(values) != n:
                raise ValueError(f"reward field {key!r}: {len(values)} values for {n} completions")
        if self._lifeline is None:
            out = _score(self.name, self.kwargs, list(prompts), list(completions), fields)
        else:
            out = _merge(self.name, self._score_in_workers(prompts, completions, fields))
        if len(out.rewards) != n:
            raise ValueError(f"reward {self.name!r} returned {len(out.rewards)} rewards for {n} completions")
        return out

    def _score_in_workers(self, prompts, completions, fields) -> list[RewardOutput | str]:
        """One result per completion: its RewardOutput, or why the grader gave up on it."""
        results: list[RewardOutput | str | None] = [None] * len(completions)
        pending = deque(range(len(completions)))
        running: dict[_Worker, tuple[int, float]] = {}
        try:
            while pending or running:
                # Take workers while there is work; wait for one only when this call has none busy.
                while pending and (worker := self._acquire(wait=not running)) is not None:
                    i = pending.popleft()
                    one = {k: [v[i]] for k, v in fields.items()}
                    task = (self.name, self.kwargs, [prompts[i]], [completions[i]], one)
                    running[worker] = (i, time.monotonic() + self.timeout)
                    if not worker.send(task):
                        del running[worker]
                        results[i] = self._discard(worker)
                if not running:
                    continue
                wait = max(0.0, min(deadline for _, deadline in running.values()) - time.monotonic())
                for worker in _readable(list(running), wait):
                    i, _ = running[worker]
                    reply = worker.receive()
                    if reply is None:
                        continue  # part of a message so far
                    del running[worker]
                    if reply is _DIED:
                        results[i] = self._discard(worker)
                        continue
                    self._release(worker)
                    if reply[0] == "error":
                        raise reply[1]
                    results[i] = reply[1]
                now = time.monotonic()
                for worker, (i, deadline) in list(running.items()):
                    if now >= deadline:
                        del running[worker]
                        self._discard(worker)
                        results[i] = f"grader: time limit: scoring took more than {self.timeout:g} s"
        except BaseException:
            for worker in running:  # they hold tasks of this call: their answers must not reach the next
                self._discard(worker)
            raise
        return results

    def _acquire(self, wait: bool) -> _Worker | None:
        """An idle worker, a new one while fewer than `workers` live, or (without `wait`) None."""
        with self._changed:
            while not self._idle and self._live >= self.workers:
                if not wait:
                    return None
                self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker(self._lifeline[0])
        except BaseException:
            with self._changed:
                self._live -= 1
                self._changed.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        with self._changed:
            self._idle.append(worker)
            self._changed.notify()

    def _discard(self, worker: _Worker) -> str:
        """Kills a worker (past its time, or dead); returns why it ended."""
        why = worker.died()
        with self._changed:
            self._live -= 1
            self._changed.notify()
        return why

    def close(self) -> None:
        """Ends the workers (they exit when their input closes; stragglers are killed)."""
        with self._changed:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.stop()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_DIED = object()
# The worker's first act: the parent's import path, then the loop.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[3:]; "
    "from magistral_jax.rl.rewards import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)


class _Worker:
    """A scoring process and its pipes; messages are 8-byte lengths and pickles."""

    def __init__(self, lifeline: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(lifeline), str(os.getpid()), *sys.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[lifeline],
            start_new_session=True,  # a terminal's Ctrl-C reaches the trainer, which then closes the pool
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""

    def send(self, task: tuple) -> bool:
        data = pickle.dumps(task)
        try:
            self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
            self.proc.stdin.flush()
            return True
        except OSError:  # it died
            return False

    def receive(self) -> tuple | object | None:
        """A whole reply, None while it is incomplete, or _DIED."""
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return None
        if not chunk:
            return _DIED
        self.buffer += chunk
        if len(self.buffer) < 8 or len(self.buffer) < 8 + int.from_bytes(self.buffer[:8], "little"):
            return None
        size = int.from_bytes(self.buffer[:8], "little")
        data, self.buffer = self.buffer[8 : 8 + size], self.buffer[8 + size :]
        return pickle.loads(data)

    def died(self) -> str:
        self.kill()
        return f"grader: the scoring process died ({_status(self.proc.returncode)})"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._close_pipes()

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _readable(workers: list[_Worker], timeout: float) -> list[_Worker]:
    if not workers:
        return []
    ready = select.select([w.fd for w in workers], [], [], timeout)[0]
    return [w for w in workers if w.fd in ready]


def _merge(name: str, results: list[RewardOutput | str]) -> RewardOutput:
    """One RewardOutput from per-completion ones; a completion the grader gave up on gets 0 in
    every component, with the reason."""
    keys: list[str] = []
    for r in results:
        if isinstance(r, RewardOutput):
            keys += [k for k in r.components if k not in keys]
    keys = keys or [name]
    out = RewardOutput([], {k: [] for k in keys}, [])
    for r in results:
        if isinstance(r, RewardOutput):
            if len(r.rewards) != 1:
                raise ValueError(f"reward {name!r} returned {len(r.rewards)} rewards for 1 completion")
            out.rewards.append(r.rewards[0])
            out.reasons.append(r.reasons[0])
            for k in keys:
                out.components[k].append(r.components[k][0] if k in r.components else 0.0)
        else:
            out.rewards.append(0.0)
            out.reasons.append(r)
            for k in keys:
                out.components[k].append(0.0)
    return out


def _watch_parent(lifeline: int, parent: int) -> None:
    """Ends this worker when its parent ends: the lifeline's write end closes (or, should another
    process have inherited it, the parent changes)."""
    while True:
        if select.select([lifeline], [], [], 1.0)[0] or os.getppid() != parent:
            os._exit(1)


def _worker_main(lifeline: int, parent: int) -> None:
    """A reward worker: scores each task it reads, in its main thread (math-verify's timeouts
    need it), until its input ends."""
    threading.Thread(target=_watch_parent, args=(lifeline, parent), daemon=True).start()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (also from native code) must not corrupt the replies
    tasks = sys.stdin.buffer
    while True:
        head = tasks.read(8)
        if len(head) < 8:
            return
        name, kwargs, prompts, completions, fields = pickle.loads(tasks.read(int.from_bytes(head, "little")))
        try:
            reply = ("ok", _score(name, kwargs, prompts, completions, fields))
        except Exception as e:  # raised again in the parent
            reply = ("error", e)
        try:
            data = pickle.dumps(reply)
        except Exception:  # an exception that does not pickle
            data = pickle.dumps(("error", RuntimeError(f"reward {name!r}: {reply[1]!r}")))
        replies.write(len(data).to_bytes(8, "little") + data)
        replies.flush()
