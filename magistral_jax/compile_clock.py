"""Time spent compiling JAX programs, per thread, so that callers report compilation apart from running.

JAX reports every trace of a Python function, every lowering to StableHLO and every XLA compile
as a time span (`jax.monitoring`). A trace of a jitted function that calls other jitted
functions contains their traces, so the clock adds up the union of the spans, not their sum. A
cache hit compiles nothing and reports nothing. Spans are kept per thread: an asynchronous run's
generator compiling on its own thread does not count towards the trainer's figure.

    before = compile_seconds()
    ...  # run programs
    seconds_compiling = compile_seconds() - before
"""

from __future__ import annotations

import threading

import jax

_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_local = threading.local()
_lock = threading.Lock()
_listening = False


def _record(event: str, start: float, end: float, **_: object) -> None:
    if event not in _EVENTS:
        return
    spans: list[tuple[float, float]] = getattr(_local, "spans", None) or []
    # Keep the spans disjoint: a span that overlaps earlier ones (an outer trace around the
    # traces it triggered) replaces them with their union.
    kept = [(s, e) for s, e in spans if e < start or s > end]
    merged = [(s, e) for s, e in spans if not (e < start or s > end)]
    lo = min([start, *(s for s, _ in merged)])
    hi = max([end, *(e for _, e in merged)])
    _local.spans = [*kept, (lo, hi)]


def compile_seconds() -> float:
    """Seconds this thread has spent tracing, lowering and compiling JAX programs since the clock
    started (at the process's first call: call it once before the work to measure)."""
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_time_span_listener(_record)
            _listening = True
    return sum(e - s for s, e in getattr(_local, "spans", ()))
