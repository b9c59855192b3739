"""Test set-up: 8 simulated CPU devices (before JAX creates its backend) and offline Hugging Face."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


import pytest

# The slowest test (a third of the suite's time), started first so that it never begins late on
# one pytest-xdist worker while the other has nothing left to do.
SLOWEST = "tests/test_cli.py::test_demo_improves_held_out_accuracy_with_grpo"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.nodeid != SLOWEST)  # stable: the rest keep their order


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
