"""`magistral-jax plan`: the 24B compiled ahead of time for TPU slices from abstract shapes.

Each 24B case is compiled once (a module-scoped fixture used by one test, so two pytest-xdist
workers never compile the same case); the FLOP oracle and the command-line tests use the tiny
preset.
"""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("libtpu", reason="TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'")

from magistral_jax.aot import planner as P
from magistral_jax.aot import topologies as T
from magistral_jax.aot.programs import param_counts
from magistral_jax.cli import main
from magistral_jax.cli.plan import format_plan
from magistral_jax.config import get_preset

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)

SMALL_2509 = "magistral-small-2509"


@pytest.fixture(scope="module")
def grpo_32k():
    # One sequence of 32,768 tokens per chip on a v5p-64 slice (32 chips), every chip on fsdp.
    return P.plan(get_preset(SMALL_2509), "v5p-64", "grpo", batch=32, seq_len=32768)


@pytest.fixture(scope="module")
def sample_40k():
    # 8 prompts of 1,024 tokens, generating into a 40,960-slot KV cache, kv heads over 8 chips.
    return P.plan(get_preset(SMALL_2509), "v5e-8", "sample", batch=8, seq_len=40960, mesh="tensor=8,fsdp=1")


def test_grpo_step_of_the_24b_at_32k_tokens_fits_a_v5p_slice(grpo_32k):
    r = grpo_32k
    assert (r.chip, r.chips) == ("v5p", 32)
    assert (r.task, r.batch, r.seq_len) == ("grpo", 32, 32768)
    assert (r.attention, r.remat, r.param_dtype, r.dtype) == ("chunked", "full", "float32", "bfloat16")
    grads, update = r.programs
    assert (grads.name, update.name) == ("gradients", "update")
    assert grads.error is None and update.error is None
    assert r.fits and grads.fits and update.fits
    # While the gradients are computed, the optimizer state (two float32 Adam moments) waits beside.
    assert grads.resident_bytes == pytest.approx(8 * r.params / 32, rel=0.02)
    assert 0 < r.peak_bytes == max(grads.step_peak_bytes, update.step_peak_bytes) < 95e9
    # The update takes float32 parameters, two Adam moments and the gradients of the ~24.0B
    # parameters, split over 32 chips, and hands the donated parameters and state back in place.
    assert update.argument_bytes == pytest.approx(16 * r.params / 32, rel=0.02)
    assert update.alias_bytes > 0.99 * update.output_bytes > 0
    # Full remat computes at least 8 N T (forward, its recomputation, backward), and attention on
    # top; XLA's own analysis counts the 40-layer scan once, far below.
    ratio = r.flops * r.chips / r.model_flops
    assert 8 / 6 < ratio < 2.5
    assert grads.xla_flops * 10 < grads.flops
    assert grads.collectives["all-gather"]["ops"] > 0 and grads.collectives["all-gather"]["executed"] > 40
    assert r.step_s == grads.time_s + update.time_s > 0 and 0 < r.mfu < 1
    text = format_plan(r)
    assert "-> fits" in text and "result: fits" in text and "roofline estimate" in text


def test_sampler_of_the_24b_with_a_40k_cache_fits_a_v5e_8(sample_40k):
    r = sample_40k
    assert (r.chip, r.chips, r.mesh) == ("v5e", 8, {"data": 1, "fsdp": 1, "tensor": 8})
    assert (r.task, r.batch, r.seq_len, r.prompt_len, r.param_dtype) == ("sample", 8, 40960, 1024, "bfloat16")
    prefill, decode = r.programs
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert r.fits and prefill.fits and decode.fits
    assert 0 < prefill.peak_bytes < 16e9 and 0 < decode.peak_bytes < 16e9
    assert r.peak_bytes == max(prefill.peak_bytes, decode.peak_bytes)
    # The decode step reads the bf16 cache (40 layers, 8 rows x 8 kv heads x 128 x K and V) and
    # holds it: 53.7 GB split over 8 chips must be in its arguments.
    cache = 2 * 40 * 8 * 40960 * 8 * 128 * 2
    assert decode.argument_bytes > cache / 8
    assert decode.executions == 40960 - 1024
    assert r.tokens == 8 * (40960 - 1024)
    assert r.bound == "memory"  # decoding a batch of 8 is bandwidth-bound
    # What a decode step must move per chip: every bf16 matmul weight once, plus the cache's filled
    # part (on average the prompt and half the new tokens). The step reads its layer's blocks
    # from the cache and writes one slot in place; a step that copied the cache (as one carrying
    # per-layer cache slices through the layer scan did: 44.9 GB) would exceed this by far.
    must = (r.matmul_params * 2 + cache * (1024 + (40960 - 1024) / 2) / 40960) / 8
    assert must < decode.hbm_bytes < 1.15 * must, (decode.hbm_bytes, must)


def _hand_count(cfg, batch: int, seq: int, attention_units: float) -> float:
    """Matmul FLOPs of a train step without remat, counted by hand: each dense matmul once
    forward and twice backward; the head (chunked under jax.checkpoint) once more; attention
    `attention_units` x 2 B T^2 N K per layer (xla: 2 forward, 4 backward; chunked, every block:
    2 forward, 7 backward; splash: 2 forward, 3 for dq and 4 for dk and dv, on the blocks its
    causal mask computes)."""
    t = cfg.text
    tokens = batch * seq
    per_token = t.dim * (2 * t.n_heads * t.head_dim + 2 * t.n_kv_heads * t.head_dim + 3 * t.hidden_dim)
    dense = 2 * tokens * per_token * t.n_layers
    attention = 2 * batch * seq * seq * t.n_heads * t.head_dim * t.n_layers
    head = 2 * tokens * t.dim * t.vocab_size
    return 3 * dense + attention_units * attention + 4 * head


@pytest.mark.parametrize(
    ("attention", "block", "units"),
    [
        ("xla", 512, 6),
        ("chunked", 512, 9),
        # The TPU kernel in 2 x 2 blocks of 128: the causal mask computes 3 of the 4.
        ("splash", 128, 9 * 3 / 4),
    ],
)
def test_compiled_flops_of_a_tiny_train_step_match_a_hand_count(attention, block, units):
    cfg = get_preset("tiny").replace(**{"text.n_layers": 4})
    r = P.plan(cfg, "v5e-4", "grpo", batch=4, seq_len=256, remat="none", attention=attention, attention_block=block)
    expected = _hand_count(cfg, 4, 256, units)
    # One row per chip: nothing is computed twice; the count is exact up to rounding.
    assert r.flops * r.chips == pytest.approx(expected, rel=1e-3)
    grads = r.programs[0]
    # XLA's cost_analysis counts the scanned layers (and attention blocks) once.
    assert grads.xla_flops * r.chips < 0.5 * expected
    assert grads.custom_calls == (3 if attention == "splash" else 0) and grads.dense_kernel_masks == 0


def test_parameter_counts_are_the_closed_form_of_the_24b():
    cfg = get_preset(SMALL_2509)
    t = cfg.text
    layer = 2 * t.dim + t.dim * t.head_dim * (2 * t.n_heads + 2 * t.n_kv_heads) + 3 * t.dim * t.hidden_dim
    text = t.vocab_size * t.dim + t.n_layers * layer + t.dim + t.dim * t.vocab_size
    total, matmul = param_counts(cfg)
    assert matmul == text - t.vocab_size * t.dim
    assert total > text  # the Pixtral encoder and projector
    assert param_counts(cfg.replace(vision=None)) == (text, matmul)
    assert 23.5e9 < text < 23.6e9


def test_topology_names_map_to_chips():
    assert T.topology("v5p-64") == T.Topology("v5p-64", "v5p:2x4x4", T.CHIPS["v5p"], 32)
    assert T.topology("v4-16").chips == 8 and T.topology("v5e-8").chips == 8 and T.topology("v6e-1").chips == 1
    assert len(T.topology_devices("v4-16")) == 8  # one device per chip (megacore)
    with pytest.raises(ValueError, match=r"known: .*v5p-64"):
        T.topology("v5p-63")


def test_cli_bad_topology_lists_the_known_names(capsys):
    assert main("plan --config tiny --topology v7-8 --task grpo --batch 1 --seq-len 64".split()) == 1
    err = capsys.readouterr().err
    assert "unknown TPU slice 'v7-8'" in err and "v5p-64" in err and "v6e-8" in err


def test_cli_text_says_when_it_does_not_fit(capsys):
    # The full 24B in float32 with Adam on one v5e chip: XLA refuses it at compile time.
    args = f"plan --config {SMALL_2509} --topology v5e-1 --task grpo --batch 1 --seq-len 512"
    assert main(args.split()) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "result: does not fit in 16.00 GiB per chip on v5e-1" in out


def test_cli_search_exits_1_when_nothing_fits(capsys):
    # One chip: a single mesh; remat full does not fit, so the policies that save more are skipped.
    args = f"plan --config {SMALL_2509} --topology v5e-1 --task grpo --batch 1 --seq-len 512 --search"
    assert main(args.split()) == 1
    out = capsys.readouterr().out
    assert "no candidate fits" in out
    assert out.count("needs more memory than data=1,tensor=1 remat full") == 3


def test_cli_plans_a_recipe_from_its_run_config(capsys):
    recipe = os.path.join(ROOT, "configs", "sft-tiny.yaml")
    overrides = "row_len=256 microbatch_tokens=1024 sft.batch_size=8 model_overrides.remat=full"
    assert main(f"plan --config {recipe} --topology v5e-4 {overrides} --json".split()) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("fits", "peak_bytes", "flops", "model_flops", "hbm_bytes", "step_s", "mfu", "compute_s", "memory_s"):
        assert key in out
    assert out["fits"] is True and out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and out["remat"] == "full"
    # The run's 8 examples in microbatches of 4 rows of 256: the gradient program twice and one
    # accumulation per step, then the update; the model from the recipe's `model: tiny`.
    grads = out["programs"][0]
    assert [(p["name"], p["executions"]) for p in out["programs"]] == [
        ("gradients", 2),
        ("accumulate", 1),
        ("update", 1),
    ]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "collectives", "xla_flops"):
        assert key in grads
    assert max(p["step_peak_bytes"] for p in out["programs"]) == out["peak_bytes"] > 0
    # While the second microbatch's gradients are computed, the optimizer state (two Adam moments)
    # and the first microbatch's gradients wait beside the program: 12 bytes a parameter, over 4 chips.
    params, _ = param_counts(get_preset("tiny"))
    assert grads["resident_bytes"] == pytest.approx(12 * params / 4, rel=0.05)
    assert out["tokens"] == 2 * 4 * 256 and "model config from model: tiny" in out["notes"]


def test_cli_recipe_form_refuses_flags_and_needs_sft_rows(capsys):
    recipe = os.path.join(ROOT, "configs", "sft-tiny.yaml")
    assert main(f"plan --config {recipe} --topology v5e-4 --batch 4".split()) == 1
    assert "is a run config: --batch belong to the model-and-flags form" in capsys.readouterr().err
    assert main(f"plan --config {recipe} --topology v5e-4".split()) == 1
    assert "row_len: plan needs the SFT rows' length" in capsys.readouterr().err


def test_cli_sample_plan_reports_the_capacity_of_both_caches(capsys):
    # The tiny model (2 layers, 2 kv heads of 32, float32) on fsdp 2 x tensor 2; a 64-token prompt
    # pads to 128, plus a budget of 256 - 64 = 192 new tokens: 384 slots per contiguous sequence.
    args = (
        "plan --config tiny --topology v5e-4 --task sample --batch 4 --seq-len 256 --prompt-len 64 "
        "--mesh fsdp=2,tensor=2 --lengths uniform:0.5 --page-size 16 --group-size 4 --reserve 16 --json"
    )
    assert main(args.split()) == 0
    out = json.loads(capsys.readouterr().out)
    c = out["capacity"]
    assert (c["lengths"], c["budget"], c["mean_length"], c["prompt_len"]) == ("uniform:0.5", 192, 96, 64)
    assert (c["group_size"], c["page_size"], c["reserve"], c["decode_rows"]) == (4, 16, 16, 4)
    per_token = 2 * 2 * 2 * 32 * 4
    assert (c["kv_bytes_per_token"], c["cache_replication"]) == (per_token, 1)
    # The compiled decode program's 4 rows x 384 slots, split 2 ways by row and 2 by kv head; the
    # rest of its rows' state holds at least their slots' int32 positions (2 rows a chip).
    assert c["decode_cache_bytes"] == 4 * 384 * per_token // 4
    assert c["decode_row_bytes"] >= 2 * 384 * 4 and c["row_bytes"] == c["decode_row_bytes"]
    decode = next(p for p in out["programs"] if p["name"] == "decode")
    assert c["decode_peak_bytes"] == decode["step_peak_bytes"]
    free = 4 * (16 * 2**30 - decode["step_peak_bytes"] + c["decode_cache_bytes"] + c["decode_row_bytes"])
    assert c["free_bytes"] == free
    assert c["contiguous"]["sequences"] == free // (384 * per_token + c["row_bytes"])
    # Lengths uniform on 1..191 (mean 96): 4 shared prompt pages per group of 4, 1 page of
    # reserve, and ceil(t / 16) own pages at step t, averaged over the sequences in flight.
    own = sum(math.ceil(t / 16) * (192 - t) for t in range(1, 192)) / (191 * 96)
    longest = sum(1 - ((t - 1) / 191) ** 4 for t in range(1, 192))
    pages = 4 * longest / (4 * 96) + own + 1
    assert c["paged"]["tokens_per_sequence"] == pytest.approx(pages * 16)
    assert c["paged"]["sequences"] == math.floor(free / (pages * 16 * per_token + c["row_bytes"]))
    assert c["ratio"] == pytest.approx(c["paged"]["sequences"] / c["contiguous"]["sequences"])
