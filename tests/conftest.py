"""Test set-up: 8 simulated CPU devices (before JAX creates its backend), offline Hugging Face, no
persistent compilation cache."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No persistent compilation cache, in this process or in the commands the tests start: the suite
# must not write into the user's cache, and no test may pass or fail because of programs an
# earlier run (or another checkout's code) left there. The cache's own test gives it a tmp dir.
os.environ["MAGISTRAL_COMPILATION_CACHE"] = "off"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


import pytest

# The slowest tests, started first so that none begins late on one pytest-xdist worker while the
# other has nothing left to do: the demo (a third of the suite's time) on the first worker, the
# others, which together take about as long, on the second.
DEMO = "tests/test_cli.py::test_demo_improves_held_out_accuracy_with_grpo"
SLOW = (
    "tests/test_plan.py::test_grpo_step_of_the_24b_at_32k_tokens_fits_a_v5p_slice",
    "tests/train/test_loop.py::test_a_killed_run_resumes_exactly",
    "tests/test_multihost.py::test_two_processes_equal_one",
    "tests/test_plan.py::test_sampler_of_the_24b_with_a_40k_cache_fits_a_v5e_8",
    "tests/train/test_async.py::test_async_run_bounds_the_queue_trains_in_completion_order_and_resumes",
)


def pytest_collection_modifyitems(config, items):
    first = [item for item in items if item.nodeid == DEMO]
    slow = [item for name in SLOW for item in items if item.nodeid == name]
    rest = [item for item in items if item.nodeid != DEMO and item.nodeid not in SLOW]
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    # xdist's load scheduler first hands each worker a chunk of consecutive tests (a quarter of its
    # share), then the rest as workers free up: the second worker's chunk starts with `slow`.
    chunk = max(len(items) // workers // 4, 2) if workers > 1 else 0
    head = first + rest[: max(chunk - len(first), 0)]
    items[:] = head + slow + rest[len(head) - len(first) :]


@pytest.fixture(scope="session")
def tekken_checkpoint(tmp_path_factory):
    """A tiny random HF checkpoint whose vocabulary takes every Tekken id, with the v13 stand-in
    tokenizer beside it."""
    import hf_reference as R

    from magistral_jax.tokenizer import write_standin_tekken

    directory = tmp_path_factory.mktemp("tekken-ckpt")
    R.causal_lm(seed=4, vocab=131072, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, hidden=48).save_pretrained(
        directory
    )
    write_standin_tekken(directory / "tekken.json")
    return directory
