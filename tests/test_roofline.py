"""roofline.py: costs read off compiled HLO text, checked by hand on small modules written as XLA
prints them (the compiled programs of GPUs and TPUs are checked in tests/test_aot.py)."""

import pytest

from nanollama_jax import roofline

# A matmul of [64, 128] x [128, 32] in float32, as XLA's GPU compiler prints one.
MATMUL = """HloModule jit_f, is_scheduled=true

%gemm_fusion_dot.1_computation (parameter_0: f32[64,128], parameter_1: f32[128,32]) -> f32[64,32] {
  %parameter_0 = f32[64,128]{1,0} parameter(0)
  %parameter_1 = f32[128,32]{1,0} parameter(1)
  ROOT %dot.0 = f32[64,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.1 (a.1: f32[64,128], b.1: f32[128,32]) -> f32[64,32] {
  %b.1 = f32[128,32]{1,0} parameter(1), sharding={replicated}
  %a.1 = f32[64,128]{1,0} parameter(0), sharding={replicated}
  ROOT %gemm_fusion_dot.1 = f32[64,32]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""

# A scan over 6 stacked [128, 128] weights in bfloat16 (the loop's trip count only in its
# condition, as libtpu prints it), then an all-gather over 4 devices.
SCAN = """HloModule jit_g, is_scheduled=true

%fused_slice_dot (param_0.1: bf16[6,128,128], param_1.1: s32[], param_2.1: bf16[16,128]) -> bf16[16,128] {
  %param_0.1 = bf16[6,128,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.1 = s32[]{:T(128)} parameter(1)
  %constant.1 = s32[]{:T(128)} constant(0)
  %dynamic-slice.1 = bf16[1,128,128]{2,1,0:T(8,128)(2,1)} dynamic-slice(%param_0.1, %param_1.1, %constant.1, %constant.1), dynamic_slice_sizes={1,128,128}
  %bitcast.1 = bf16[128,128]{1,0:T(8,128)(2,1)} bitcast(%dynamic-slice.1)
  %param_2.1 = bf16[16,128]{1,0:T(8,128)(2,1)} parameter(2)
  ROOT %convolution.1 = bf16[16,128]{1,0:T(8,128)(2,1)} convolution(%param_2.1, %bitcast.1), dim_labels=bf_io->bf
}

%body (p.2: (s32[], bf16[16,128], bf16[6,128,128])) -> (s32[], bf16[16,128], bf16[6,128,128]) {
  %p.2 = (s32[]{:T(128)}, bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[6,128,128]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%p.2), index=0
  %gte.1 = bf16[16,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p.2), index=1
  %gte.2 = bf16[6,128,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p.2), index=2
  %fusion.1 = bf16[16,128]{1,0:T(8,128)(2,1)} fusion(%gte.2, %gte.0, %gte.1), kind=kOutput, calls=%fused_slice_dot
  %constant.2 = s32[]{:T(128)} constant(1)
  %add.1 = s32[]{:T(128)} add(%gte.0, %constant.2)
  ROOT %tuple.1 = (s32[]{:T(128)}, bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[6,128,128]{2,1,0:T(8,128)(2,1)}) tuple(%add.1, %fusion.1, %gte.2)
}

%cond (p.3: (s32[], bf16[16,128], bf16[6,128,128])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(6)
  %p.3 = (s32[]{:T(128)}, bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[6,128,128]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %gte.3 = s32[]{:T(128)} get-tuple-element(%p.3), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte.3, %constant.3), direction=LT
}

ENTRY %main.2 (x.1: bf16[16,128], w.1: bf16[6,128,128]) -> bf16[64,128] {
  %x.1 = bf16[16,128]{1,0:T(8,128)(2,1)} parameter(0)
  %w.1 = bf16[6,128,128]{2,1,0:T(8,128)(2,1)} parameter(1)
  %constant.4 = s32[]{:T(128)} constant(0)
  %tuple.2 = (s32[]{:T(128)}, bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[6,128,128]{2,1,0:T(8,128)(2,1)}) tuple(%constant.4, %x.1, %w.1)
  %while.1 = (s32[]{:T(128)}, bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[6,128,128]{2,1,0:T(8,128)(2,1)}) while(%tuple.2), condition=%cond, body=%body
  %gte.4 = bf16[16,128]{1,0:T(8,128)(2,1)} get-tuple-element(%while.1), index=1
  ROOT %all-gather.1 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%gte.4), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, use_global_device_ids=true
}
"""


def test_a_matmul_costs_its_flops_and_its_operands_and_output():
  costs = roofline.hlo_costs(MATMUL)
  assert costs.flops == 2 * 64 * 32 * 128
  assert costs.bytes == (64 * 128 + 128 * 32 + 64 * 32) * 4
  assert (costs.collective_bytes, costs.loops, costs.uncounted_loops) == (0, [], 0)


def test_a_loop_counts_its_body_once_per_trip_and_a_slice_reads_the_slice():
  costs = roofline.hlo_costs(SCAN, devices=4)
  assert costs.loops == [6]
  assert costs.flops == 6 * 2 * 16 * 128 * 128
  # Per trip the fusion reads one [128, 128] slice of the stacked weights (not all six), the
  # [16, 128] activations and the index, and writes [16, 128]; the counter's add and compare
  # move 12 and 9 bytes. Then the all-gather reads 16 rows and writes 64.
  per_trip = (128 * 128 + 16 * 128 + 16 * 128) * 2 + 4 + 12 + 9
  assert costs.bytes == 6 * per_trip + (16 * 128 + 64 * 128) * 2
  # Each device sends the 3 quarters of the gathered rows it did not hold.
  assert costs.collective_bytes == 64 * 128 * 2 * 3 / 4


def test_a_loop_with_a_known_trip_count_uses_it():
  text = SCAN.replace("condition=%cond, body=%body",
                      'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}')
  assert roofline.hlo_costs(text).loops == [3]


@pytest.mark.parametrize("groups, size", [
  ("replica_groups={{0,1},{2,3}}", 2),
  ("replica_groups=[2,4]<=[8]", 4),
  ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4),
  ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", 8),
  ("", 8),  # none named: all the devices
])
def test_the_size_of_a_collective_group_is_read_in_each_form(groups, size):
  assert roofline._group_size(groups, 8) == size  # pylint: disable=protected-access


def test_an_all_reduce_sends_twice_its_share_and_a_reduce_scatter_once():
  shapes = {"x": "f32[1024]{0}"}
  ar = roofline.Instruction("ar", "f32[1024]{0}", "all-reduce", ["x"], "%x",
                            ", replica_groups={{0,1,2,3}}")
  rs = roofline.Instruction("rs", "f32[256]{0}", "reduce-scatter", ["x"], "%x",
                            ", replica_groups={{0,1,2,3}}")
  assert roofline._collective_bytes(ar, shapes, 4) == 2 * 4096 * 3 / 4  # pylint: disable=protected-access
  assert roofline._collective_bytes(rs, shapes, 4) == 4096 * 3 / 4  # pylint: disable=protected-access


def test_a_padded_convolution_counts_the_taps_that_read_real_input():
  # Width 5, a kernel of 3 padded by 1 on each side: the two edge outputs see 2 real inputs,
  # the three inside ones 3: 13 (output, tap) pairs, each 3 input x 2 output features.
  conv = roofline.Instruction(
    "c", "f32[1,5,2]{2,1,0}", "convolution", ["x", "w"], "%x, %w",
    ", window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f")
  flops = roofline._dot_flops(conv, {"x": "f32[1,5,3]{2,1,0}", "w": "f32[3,3,2]{2,1,0}"})  # pylint: disable=protected-access
  assert flops == 2 * 13 * 3 * 2


def test_the_bound_is_the_slowest_of_compute_memory_and_collectives():
  b = roofline.Bound(compute_s=0.002, memory_s=0.005, collective_s=0.001)
  assert (b.step_s, b.serial_s, b.limit) == (0.005, 0.008, "memory")
