"""The HLO cost model on hand-written HLO text: loops unrolled by their trip counts, Pallas kernels
whose attributes span several lines, and the splash-attention kernel's FLOPs and bytes."""

from magistral_jax.aot import hlo_costs as H

LOOP = """HloModule m, entry_computation_layout={()->f32[8,32]{1,0}}

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


def test_loops_are_unrolled_by_their_trip_counts():
    # A loop of 5 trips around a [8,16] x [16,32] matmul and an all-gather, then one more matmul.
    costs = H.hlo_costs(LOOP)
    assert costs.flops == 6 * 2 * 8 * 16 * 32
    assert costs.loops == 1 and costs.unknown_trip_loops == 0
    assert costs.collectives["all-gather"] == {"ops": 1, "executed": 5, "bytes": 5 * 8 * 16 * 4}


TYPE = "(s32[], s32[], s8[1,2,2], s8[1,2,2], f32[2,256,64], f32[256,64], f32[8,16], f32[16,32])"
LAYOUT = (
    "(s32[], s32[], s8[1,2,2]{2,1,0}, s8[1,2,2]{2,1,0}, f32[2,256,64]{2,1,0}, f32[256,64]{1,0}, "
    "f32[8,16]{1,0}, f32[16,32]{1,0})"
)

# A loop of 6 trips whose bound (6) travels in the loop's tuple, as XLA emits once it has hoisted
# constants out of the loop. Its body calls a splash-attention forward kernel as libtpu prints one:
# the attributes run over three lines, with quotes and brackets inside strings; a matmul follows.
# Queries f32[2, 256, 64] (2 heads), keys and values f32[256, 64], blocks of 128 x 128, and a
# causal block mask [[1, 0], [2, 1]]: 3 of the 4 blocks are computed, for each head.
SPLASH = """HloModule m, entry_computation_layout={()->f32[8,32]{1,0}}

%body (p: TYPE) -> TYPE {
  %p = LAYOUT parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %bound = s32[] get-tuple-element(%p), index=1
  %next_block = s8[1,2,2]{2,1,0} get-tuple-element(%p), index=2
  %mask = s8[1,2,2]{2,1,0} get-tuple-element(%p), index=3
  %q = f32[2,256,64]{2,1,0} get-tuple-element(%p), index=4
  %k = f32[256,64]{1,0} get-tuple-element(%p), index=5
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=6
  %w = f32[16,32]{1,0} get-tuple-element(%p), index=7
KERNEL
  %y = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %inc = s32[] add(%i, %one)
  ROOT %t = LAYOUT tuple(%inc, %bound, %next_block, %mask, %q, %k, %x, %w)
}

%cond (c: TYPE) -> pred[] {
  %c = LAYOUT parameter(0)
  %j = s32[] get-tuple-element(%c), index=0
  %b = s32[] get-tuple-element(%c), index=1
  ROOT %lt = pred[] compare(%j, %b), direction=LT
}

ENTRY %main () -> f32[8,32] {
  %zero = s32[] constant(0)
  %six = s32[] constant(6)
  %next0 = s8[1,2,2]{2,1,0} constant({ { { 0, 0 }, { 0, 1 } } })
  %mask0 = s8[1,2,2]{2,1,0} constant({ { { 1, 0 }, { 2, 1 } } })
  %q0 = f32[2,256,64]{2,1,0} constant({...})
  %k0 = f32[256,64]{1,0} constant({...})
  %x0 = f32[8,16]{1,0} constant({...})
  %w0 = f32[16,32]{1,0} constant({...})
  %init = LAYOUT tuple(%zero, %six, %next0, %mask0, %q0, %k0, %x0, %w0)
  %loop = LAYOUT while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,32]{1,0} get-tuple-element(%loop), index=6
}
"""

KERNEL = (
    "  %splash_mqa_fwd_no_residuals.1 = (f32[128,128]{1,0}, f32[2,256,64]{2,1,0}) "
    'custom-call(%next_block, %mask, %q, %k, %k), custom_call_target="tpu_custom_call", '
    "frontend_attributes={kernel_metadata={\n"
    '"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128, \\"block_kv_compute\\": 128, '
    '\\"block_q_dq\\": 64}"\n'
    '}}, metadata={op_name="jit(step)/attention/splash_mqa_fwd_no_residuals/pallas_call"}, '
    'backend_config={"custom_call_config":{"body":"TUzvUgF{(["}}'
)
SPLASH = SPLASH.replace("KERNEL", KERNEL).replace("LAYOUT", LAYOUT).replace("TYPE", TYPE)
SPLASH_BLOCK_FLOPS = 2 * 2 * 128 * 128 * 64  # scores and probabilities x values, one 128 x 128 block
MATMUL_FLOPS = 2 * 8 * 16 * 32


def test_a_multi_line_pallas_kernel_keeps_the_rest_of_its_loop_body():
    costs = H.hlo_costs(SPLASH)
    assert costs.loops == 1 and costs.unknown_trip_loops == 0  # the bound, read through the tuple: 6
    assert costs.custom_calls == 1 and costs.uncounted_kernels == 0 and costs.dense_kernel_masks == 0
    # Per trip: the matmul after the kernel, and 3 computed blocks for each of the 2 heads.
    assert costs.flops == 6 * (MATMUL_FLOPS + 2 * 3 * SPLASH_BLOCK_FLOPS)


def test_splash_kernel_bytes_stream_the_key_blocks_of_every_computed_block():
    module = H.Module(SPLASH)
    kernel = next(i for comp in module.comps.values() for i in comp if i.op == "custom-call")
    costs = module.kernel_costs(kernel)
    assert costs is not None and not costs.dense_mask
    q_bytes = 2 * 256 * 64 * 4
    out_bytes = 128 * 128 * 4 + q_bytes
    # Queries read once, the output written once; a 128-row block of keys and one of values
    # fetched for each of the 6 computed (head, query block, key block) steps.
    assert costs.hbm_bytes == q_bytes + out_bytes + 6 * 2 * 128 * 64 * 4
    assert costs.flops == 2 * 3 * SPLASH_BLOCK_FLOPS


def test_an_elided_block_mask_counts_every_block():
    costs = H.hlo_costs(SPLASH.replace("{ { { 1, 0 }, { 2, 1 } } }", "{...}"))
    assert costs.dense_kernel_masks == 1
    assert costs.flops == 6 * (MATMUL_FLOPS + 2 * 4 * SPLASH_BLOCK_FLOPS)


def test_splash_dkv_streams_the_query_side_blocks():
    # dk and dv of 2 heads over a shared [256, 64] key: the kernel walks key blocks outer, query
    # blocks inner, fetching per computed block a 128-row block of the queries and output
    # gradients ([head, 256, 64]) and of the softmax statistics (broadcast over 8 sublanes:
    # [head, 8, 256]); keys and values are read once, dk and dv written once.
    f32 = "f32"
    floats = [
        (f32, [2, 256, 64]),  # q
        (f32, [256, 64]),  # k
        (f32, [256, 64]),  # v
        (f32, [2, 8, 256]),  # logsumexp
        (f32, [2, 256, 64]),  # output gradients
        (f32, [2, 8, 256]),  # di
    ]
    outputs = 2 * 256 * 64 * 4
    costs = H.splash_kernel_costs("dkv", floats, outputs, 128, 128, ([1, 2, 2], [1, 0, 2, 1]))
    per_block = 2 * (128 * 64 * 4) + 2 * (8 * 128 * 4)
    assert costs.hbm_bytes == outputs + 2 * 256 * 64 * 4 + 6 * per_block
    assert costs.flops == 6 * 2 * 4 * 128 * 128 * 64
