"""`magistral-jax plan`: the 24B compiled ahead of time for TPU slices from abstract shapes.

Each 24B case is compiled once (a module-scoped fixture used by one test, so two pytest-xdist
workers never compile the same case); the FLOP oracle and the command-line tests use the tiny
preset.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("libtpu", reason="TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'")

from magistral_jax import plan as P
from magistral_jax.cli import main
from magistral_jax.config import get_preset

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
    (step,) = r.programs
    assert step.error is None
    assert r.fits and step.fits
    assert 0 < r.peak_bytes == step.peak_bytes < 95e9
    # Donated parameters and optimizer state come back in place.
    assert step.alias_bytes > 0.99 * step.output_bytes > 0
    # float32 parameters plus two Adam moments of the ~24.0B parameters, split over 32 chips.
    assert step.argument_bytes == pytest.approx(12 * r.params / 32, rel=0.02)
    # Full remat computes at least 8 N T (forward, its recomputation, backward), and attention on
    # top; XLA's own analysis counts the 40-layer scan once, far below.
    ratio = r.flops * r.chips / r.model_flops
    assert 8 / 6 < ratio < 2.5
    assert step.xla_flops * 10 < step.flops
    assert step.collectives["all-gather"]["ops"] > 0 and step.collectives["all-gather"]["executed"] > 40
    assert r.step_s == max(r.compute_s, r.memory_s) > 0 and 0 < r.mfu < 1
    text = P.format_plan(r)
    assert "-> fits" in text and "result: fits" in text and "roofline estimate" in text


def test_sampler_of_the_24b_with_a_40k_cache_fits_a_v5e_8(sample_40k):
    r = sample_40k
    assert (r.chip, r.chips, r.mesh) == ("v5e", 8, {"data": 1, "fsdp": 1, "tensor": 8})
    assert (r.task, r.batch, r.seq_len, r.prompt_len, r.param_dtype) == ("sample", 8, 40960, 1024, "bfloat16")
    prefill, decode = r.programs
    assert (prefill.name, decode.name) == ("prefill", "decode_step")
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


def _hand_count(cfg, batch: int, seq: int, attention_units: int) -> int:
    """Matmul FLOPs of a train step without remat, counted by hand: each dense matmul once
    forward and twice backward; the head (chunked under jax.checkpoint) once more; attention
    `attention_units` x 2 B T^2 N K per layer (xla: 2 forward, 4 backward; chunked, every block:
    2 forward, 7 backward)."""
    t = cfg.text
    tokens = batch * seq
    per_token = t.dim * (2 * t.n_heads * t.head_dim + 2 * t.n_kv_heads * t.head_dim + 3 * t.hidden_dim)
    dense = 2 * tokens * per_token * t.n_layers
    attention = 2 * batch * seq * seq * t.n_heads * t.head_dim * t.n_layers
    head = 2 * tokens * t.dim * t.vocab_size
    return 3 * dense + attention_units * attention + 4 * head


@pytest.mark.parametrize(("attention", "units"), [("xla", 6), ("chunked", 9)])
def test_compiled_flops_of_a_tiny_train_step_match_a_hand_count(attention, units):
    cfg = get_preset("tiny").replace(**{"text.n_layers": 4})
    r = P.plan(cfg, "v5e-4", "grpo", batch=4, seq_len=256, remat="none", attention=attention)
    expected = _hand_count(cfg, 4, 256, units)
    # One row per chip: nothing is computed twice; the count is exact up to rounding.
    assert r.flops * r.chips == pytest.approx(expected, rel=1e-3)
    # XLA's cost_analysis counts the scanned layers (and attention blocks) once.
    assert r.programs[0].xla_flops * r.chips < 0.5 * expected


def test_parameter_counts_are_the_closed_form_of_the_24b():
    cfg = get_preset(SMALL_2509)
    t = cfg.text
    layer = 2 * t.dim + t.dim * t.head_dim * (2 * t.n_heads + 2 * t.n_kv_heads) + 3 * t.dim * t.hidden_dim
    text = t.vocab_size * t.dim + t.n_layers * layer + t.dim + t.dim * t.vocab_size
    total, matmul = P.param_counts(cfg)
    assert matmul == text - t.vocab_size * t.dim
    assert total > text  # the Pixtral encoder and projector
    assert P.param_counts(cfg.replace(vision=None)) == (text, matmul)
    assert 23.5e9 < text < 23.6e9


def test_hlo_costs_unroll_loops_by_their_trip_counts():
    # A loop of 5 trips around a [8,16] x [16,32] matmul, as XLA prints it.
    hlo = """HloModule m, entry_computation_layout={()->f32[8,32]{1,0}}

%body (p: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %p = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%p), index=2
  %y = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[8,16]{1,0} all-gather(%x), dimensions={0}
  ROOT %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%next, %g, %w)
}

%cond (q: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %q = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main () -> f32[8,32] {
  %zero = s32[] constant(0)
  %x0 = f32[8,16]{1,0} constant({...})
  %w0 = f32[16,32]{1,0} constant({...})
  %init = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%zero, %x0, %w0)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) while(%init), condition=%cond, body=%body
  %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
  ROOT %r = f32[8,32]{1,0} dot(%out, %w0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    costs = P.hlo_costs(hlo)
    assert costs.flops == 6 * 2 * 8 * 16 * 32
    assert costs.loops == 1 and costs.unknown_trip_loops == 0
    assert costs.collectives["all-gather"] == {"ops": 1, "executed": 5, "bytes": 5 * 8 * 16 * 4}


def test_topology_names_map_to_chips():
    assert P.topology("v5p-64") == P.Topology("v5p-64", "v5p:2x4x4", P.CHIPS["v5p"], 32)
    assert P.topology("v4-16").chips == 8 and P.topology("v5e-8").chips == 8 and P.topology("v6e-1").chips == 1
    assert len(P.topology_devices("v4-16")) == 8  # one device per chip (megacore)
    with pytest.raises(ValueError, match=r"known: .*v5p-64"):
        P.topology("v5p-63")


def test_cli_json_has_the_figures(capsys):
    args = "plan --config tiny --topology v5e-4 --task grpo --batch 4 --seq-len 256 --remat full --json"
    assert main(args.split()) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("fits", "peak_bytes", "flops", "model_flops", "hbm_bytes", "step_s", "mfu", "compute_s", "memory_s"):
        assert key in out
    assert out["fits"] is True and out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    (program,) = out["programs"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "collectives", "xla_flops"):
        assert key in program
    assert program["peak_bytes"] == out["peak_bytes"] > 0 and out["remat"] == "full"


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
