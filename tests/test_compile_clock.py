"""The compile clock: the union of JAX's compilation spans on this thread, nested traces counted once."""

import threading

import jax

from magistral_jax.compile_clock import compile_seconds

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


def test_nested_spans_count_once_and_other_events_and_threads_not_at_all():
    start = compile_seconds()
    t0 = 1.0e9  # spans far from any real compilation of this process
    # An outer trace of 4 s containing an inner trace of 1.5 s (recorded first, as JAX does when
    # the inner one ends), then lowering 0.25 s and compiling 2 s after it.
    jax.monitoring.record_event_time_span(TRACE, t0 + 1.0, t0 + 2.5, fun_name="inner")
    jax.monitoring.record_event_time_span(TRACE, t0, t0 + 4.0, fun_name="outer")
    jax.monitoring.record_event_time_span(LOWER, t0 + 4.0, t0 + 4.25, fun_name="outer")
    jax.monitoring.record_event_time_span(COMPILE, t0 + 4.5, t0 + 6.5, fun_name="outer")
    jax.monitoring.record_event_time_span("/jax/other/event", t0 + 10.0, t0 + 20.0)
    other = threading.Thread(
        target=lambda: jax.monitoring.record_event_time_span(COMPILE, t0 + 30.0, t0 + 40.0, fun_name="elsewhere")
    )
    other.start()
    other.join()
    assert compile_seconds() - start == 4.0 + 0.25 + 2.0


def test_a_real_compile_is_timed_and_a_cache_hit_is_not():
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    start = compile_seconds()
    f(jax.numpy.float32(2.0)).block_until_ready()
    first = compile_seconds() - start
    f(jax.numpy.float32(5.0)).block_until_ready()
    assert first > 0 and compile_seconds() - start == first
