"""The bugs the mutation check plants, one at a time (see run.py), and the tests that must fail.

Each is a realistic slip in one line; ``tests`` is a small pytest selection (the default run's
tests that should see it). Snippets must occur exactly once in their file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plant:
    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]


TRITON_GRID = "tests/backends/test_triton.py"
EMU = "tests/backends/test_cuda.py"
TRITON_INFER = "fastres/backends/triton/__init__.py"
PROLOGUE = "tests/backends/test_triton_prologue.py"
INFER_CALL = "x, weight, bias, conv, scale=scale, shift=shift, residual=residual, relu=relu"

PLANTS = [
    # which backend ran (issue 13, point 1)
    Plant("op layer routes every call to reference", "fastres/ops/conv_bn_relu.py",
          "    name = backends.select(call, backend)\n", '    name = "reference"\n',
          (TRITON_GRID, "-k", "grid_interpreter_fp32 and default-train")),
    Plant("ConvBNReLU ignores use_backend", "fastres/nn/conv_bn_relu.py",
          "        act=act,\n        process_group=",
          '        act=act,\n        backend="reference",\n        process_group=',
          ("tests/test_served_backend.py", "-k", "module_follows")),
    Plant("auto skips the availability check", "fastres/backends/__init__.py",
          "            if availability(candidate, call) is None:\n                return candidate",
          "            return candidate",
          ("tests/backends/test_dispatch.py",)),
    # the one-kernel inference path (point 2)
    Plant("triton inference drops the ReLU", TRITON_INFER, INFER_CALL,
          INFER_CALL.replace("relu=relu", "relu=False"),
          (TRITON_GRID, "-k", "grid_interpreter_fp32 and default-infer")),
    Plant("triton inference drops the residual", TRITON_INFER, INFER_CALL,
          INFER_CALL.replace("residual=residual", "residual=None"),
          (TRITON_GRID, "-k", "grid_interpreter_fp32 and residualTrue and infer")),
    # statistics with |mean| >> std (point 3)
    Plant("conv epilogue M2 as E[y^2] - E[y]^2", "fastres/backends/triton/conv.py",
          "        t_m2 = tl.sum(dev * dev, axis=0) - d_sum * d_sum / n_valid\n"
          "        t_mean += d_sum / n_valid",
          "        t_mean += d_sum / n_valid\n"
          "        t_m2 = tl.sum(tl.where(valid, vals * vals, 0.0), axis=0) "
          "- n_valid * t_mean * t_mean",
          (TRITON_GRID, "-k", "grid_interpreter_fp32 and mean_offset and train")),
    # the grid's half-precision cases stay meaningful (point 4): a bf16 offset beyond what
    # bf16 resolves leaves no output clear of the ReLU's rounding band
    Plant("bf16 mean offset of 1000", "tests/ops/cases.py",
          "torch.bfloat16: 6.0}", "torch.bfloat16: 1000.0}",
          ("tests/ops/test_conv_bn_relu.py", "-k", "mean_offset and bfloat16 and train")),
    # rectangular kernels, asymmetric stride / padding / dilation (point 6)
    Plant("triton launcher uses height stride/padding for width", "fastres/backends/triton/conv.py",
          "conv.stride[0], conv.stride[1], conv.padding[0], conv.padding[1],",
          "conv.stride[0], conv.stride[0], conv.padding[0], conv.padding[0],",
          (TRITON_GRID, "-k", "grid_interpreter_fp32 and r3x5 and train")),
    Plant("cuda implicit GEMM uses height dilation for width", "csrc/conv_igemm.cu",
          "iw = iw_base + s * a.dil_w;", "iw = iw_base + s * a.dil_h;",
          (EMU, "-k", "emulated_kernels_equivalence_grid and r3x5")),
    # host syncs on real tensors (point 7)
    Plant("triton forward reads a value on the host", TRITON_INFER,
          "        if batch_stats:\n", "        if batch_stats and bool(x.isfinite().all()):\n",
          ("tests/test_host_sync.py", "-k", "triton")),
    # the emulated CUDA grid's default subset (point 5)
    Plant("cuda apply drops the residual", "csrc/bn.cu",
          "        if (residual) v[j] += r[j];\n", "\n",
          (EMU, "-k", "emulated_kernels_equivalence_grid")),
    Plant("cuda eval-mode backward scales dy wrongly", "csrc/bn.cu",
          "  float d = g;\n", "  float d = batch_stats ? g : 0.5f * g;\n",
          (EMU, "-k", "emulated_kernels_equivalence_grid and eval")),
    Plant("cuda direct conv ignores height dilation", "csrc/conv_direct.cu",
          "const int hy = py * a.stride_h + r * a.dil_h;", "const int hy = py * a.stride_h + r;",
          (EMU, "-k", "emulated_kernels_equivalence_grid and dilation")),
    Plant("cuda finalize without affine scales by 2", "csrc/bn.cu",
          "const float scale = (gamma ? gamma[c] : 1.0f) * invstd;",
          "const float scale = (gamma ? gamma[c] : 2.0f) * invstd;",
          (EMU, "-k", "emulated_kernels_equivalence_grid and affineFalse")),
    Plant("cuda direct conv drops the bias", "csrc/conv_direct.cu",
          "if (k0 + v < kb1) acc[v] += to_f32(bias[k0 + v]);",
          "if (k0 + v < kb1) acc[v] += 0.0f * to_f32(bias[k0 + v]);",
          (EMU, "-k", "emulated_kernels_equivalence_grid and biasTrue")),
    # models against an independent definition (point 9)
    Plant("pre-activation nets lose the final ReLU", "fastres/models/resnet.py",
          "x = torch.relu(self.bn_final(x))", "x = self.bn_final(x)",
          ("tests/models/test_preact_reference.py",)),
    Plant("ImageNet stem loses its max-pool", "fastres/models/resnet.py",
          "            x = self.maxpool(x)\n", "            pass\n",
          ("tests/models/test_preact_reference.py",)),
    # per-tile statistics cut to the configuration that ran (point 10)
    Plant("partials cut to the smallest tile, not the one that ran",
          "fastres/backends/triton/conv.py",
          'tiles = triton.cdiv(m, tuner.last_config.kwargs["BLOCK_M"])',
          "tiles = triton.cdiv(m, _MIN_BLOCK_M)",
          (TRITON_GRID, "-k", "partials_cut")),
    # NaN through ReLU (point 11, issue 8 point 5)
    Plant("cuda ReLU as fmaxf (drops NaN)", "csrc/common.cuh",
          "{ return v < 0.0f ? 0.0f : v; }", "{ return fmaxf(v, 0.0f); }",
          (EMU, "-k", "emulated_nan_and_inf")),
    Plant("triton conv ReLU as tl.maximum (drops NaN on a GPU)", "fastres/backends/triton/conv.py",
          "        out = tl.where(out < 0.0, 0.0, out)", "        out = tl.maximum(out, 0.0)",
          ("tests/backends/test_relu_source.py",)),
    Plant("triton apply ReLU as tl.maximum (drops NaN on a GPU)", "fastres/backends/triton/bn.py",
          "        z = tl.where(z < 0.0, 0.0, z)", "        z = tl.maximum(z, 0.0)",
          ("tests/backends/test_relu_source.py",)),
    # the activation prologue of block-fused training (issue 10)
    Plant("prologue pads before the activation (padding becomes relu(shift))",
          "fastres/backends/triton/conv.py", "    a = tl.where(mask, a, 0.0)\n", "",
          (PROLOGUE, "-k", "padding_is_applied_after")),
    Plant("prologue reads scale/shift without the group's channel offset",
          "fastres/backends/triton/conv.py",
          "            if IN_AFFINE:\n                x_ch = g * Cg + ck  # absolute input channel",
          "            if IN_AFFINE:\n                x_ch = ck  # absolute input channel",
          (PROLOGUE, "-k", "prologue_matches_float64 and g2x16")),
    Plant("prologue ReLU as tl.maximum (drops NaN on a GPU)", "fastres/backends/triton/conv.py",
          "    a = tl.where(a < 0.0, 0.0, a)", "    a = tl.maximum(a, 0.0)",
          ("tests/backends/test_relu_source.py",)),
    # host overhead (issue 11, point 7): the fast paths must not change what anyone sees
    Plant("eager calls skip the dispatcher under the profiler", "fastres/ops/direct.py",
          "        or torch._C._autograd._profiler_enabled()\n", "",
          ("tests/ops/test_direct.py", "-k", "profiler")),
    Plant("block op's kept checks ignore the BatchNorms", "fastres/ops/block.py",
          "            tuple((_meta(n.weight), _meta(n.bias), _meta(n.running_mean), "
          "_meta(n.running_var),\n                   float(n.eps)) for n in norms),\n", "",
          ("tests/ops/test_call_cache.py", "-k", "block")),
    Plant("block running variance without Bessel's correction", "fastres/ops/block.py",
          "[bessel[i] for i in tracked]", "[1.0 for i in tracked]",
          ("tests/ops/test_block.py", "-k", "matches_eager_block and reference")),
    Plant("BN apply tiles reused across ReLU and no ReLU", "fastres/backends/triton/bn.py",
          'key=["M", "K", "BLOCK_K", "HAS_RES", "RES_AFFINE", "RELU", "SILU", "BRANCH_SCALE",',
          'key=["M", "K", "BLOCK_K", "HAS_RES", "RES_AFFINE", "SILU", "BRANCH_SCALE",',
          ("tests/backends/test_triton_tuning.py", "-k", "every_flag")),
    # SyncBatchNorm through the kernels (issue 20)
    Plant("SyncBN backward keeps the shard's centring δ", "fastres/backends/triton/sync.py",
          "    all_delta = all_y / total\n", "    all_delta = delta\n",
          ("tests/test_sync_batchnorm.py", "-k", "2-layer-triton")),
    Plant("SyncBN block running variance with the shard's count", "fastres/ops/block.py",
          "            bessel = [c / (c - 1) for c in counts]\n", "            pass\n",
          ("tests/test_sync_batchnorm.py", "-k", "2-post-proj-reference")),
    # the channel gate in the block op (issue 18, point 4): its pooled-mean gradient
    Plant("triton gated block drops the gate's pooled-mean gradient",
          "fastres/backends/triton/block.py",
          "branch_add=(dpooled / hw).contiguous()", "branch_add=(0 * dpooled).contiguous()",
          ("tests/ops/test_block_gate.py", "-k", "triton and bottleneck-se-identity-float32")),
    Plant("reference gated block forgets the drop path in dgate", "fastres/backends/reference.py",
          "    dpooled = gate.backward((dz_gate * a).sum((2, 3)))",
          "    dpooled = gate.backward((dz * a).sum((2, 3)))",
          ("tests/ops/test_block_gate.py", "-k", "reference and droppath-s2-float32")),
    # RegNetY's gate between conv b and conv c (issue 18)
    Plant("reference gate between convs drops the pooled-mean gradient",
          "fastres/backends/reference.py",
          "da = da * gate_values + (dpooled / hw)[:, :, None, None]", "da = da * gate_values",
          ("tests/test_graph_block.py", "-k", "reference and tv-regnety-se-identity")),
    Plant("triton gate between convs loses conv b's ReLU mask", "fastres/backends/triton/block.py",
          "dpooled / (y.shape[2] * y.shape[3])).contiguous(), act_mask=affine)",
          "dpooled / (y.shape[2] * y.shape[3])).contiguous(), act_mask=None)",
          ("tests/test_graph_block.py", "-k", "triton and tv-regnety-se-identity")),
]
