"""Every configuration an autotuner may pick, forced once on the GPU against float64.

The GPU tests run with one configuration per kernel (``FASTRES_TRITON_AUTOTUNE=0``); the
benchmarks then autotune and may pick any other. Each GEMM, flat-K, direct and BN configuration
is forced here (``Tuned.forced``) on one representative shape: every dtype for the convolution
tiles with the training epilogue (raw output + BN partials, sliced to the tile's BLOCK_M), the
fused eval epilogue and the BN kernels in bf16 (~75 compilations in all); the sm_90 TMA tiles
in fp16/bf16 on a stride-1 3x3 and a 1x1 (skipped on other GPUs).
"""

from __future__ import annotations

import pytest
import torch
import triton

from fastres.backends.triton import bn, conv_bwd
from fastres.backends.triton import conv as tconv
from tests.backends.test_triton_conv import _check_tuned
from tests.ops.cases import Case, run_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DENSE = Case(n=4, c=64, k=64, h=15, w=15)
DENSE_1X1 = Case(n=3, c=64, k=128, r=1, padding=0, h=14, w=13)
STEM = Case(n=2, c=3, k=64, r=7, stride=2, padding=3, h=33, w=31)
GROUPED = Case(n=4, c=128, k=128, groups=32, h=14, w=14)  # ResNeXt 32x4d: 4 per group


def _label(config: triton.Config) -> str:
    return "_".join(f"{k}{v}" for k, v in config.kwargs.items()) + (
        f"_w{config.num_warps}s{config.num_stages}")


# (kernel, the shape it serves, dtypes, epilogues in bf16): the training epilogue in every
# dtype, the fused eval epilogue too in bf16
_PLAIN = [c for c in tconv.GPU_GEMM_CONFIGS if not c.kwargs.get("TMA")]
_TMA = [c for c in tconv.GPU_GEMM_CONFIGS if c.kwargs.get("TMA")]
_HALF = [torch.float16, torch.bfloat16]
_CONV = {
    "gemm": (tconv._gemm, _PLAIN, DENSE, DTYPES, ("raw_bias", "eval_res")),
    "gemm_flat": (tconv._gemm, _PLAIN, STEM, [torch.bfloat16], ("raw_bias",)),
    # the sm_90 TMA tiles (skipped elsewhere) on a stride-1 3x3 and a 1x1 (the GEMM over the
    # [N·H·W, C] matrix): shapes the pruner offers them for
    "gemm_tma": (tconv._gemm, _TMA, DENSE, _HALF, ("raw_bias", "eval_res")),
    "gemm_tma_1x1": (tconv._gemm, _TMA, DENSE_1X1, _HALF, ("raw_bias", "eval_res")),
    "direct": (tconv._direct, tconv.GPU_DIRECT_CONFIGS, GROUPED, DTYPES,
               ("raw_bias", "eval_res")),
}


@pytest.mark.parametrize("kernel, config, dtype", [
    pytest.param(name, c, d, id=f"{name}-{_label(c)}-{str(d).removeprefix('torch.')}")
    for name, (_, configs, _, dtypes, _) in _CONV.items() for c in configs for d in dtypes
])
def test_conv_config(kernel: str, config: triton.Config, dtype: torch.dtype) -> None:
    tuned, _, shape, _, bf16_epilogues = _CONV[kernel]
    if config.kwargs.get("TMA"):
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("TMA tiles are offered on sm_90 only")
        kernel = "gemm"
    assert tconv.kernel_for(shape.c // shape.groups, shape.groups) == kernel
    with tuned.forced(config):
        _check_tuned(shape, dtype, "cuda",
                     epilogues=bf16_epilogues if dtype == torch.bfloat16 else ("raw_bias",))
    assert tuned.last_config is config


# (kernel, the (BLOCK_M, num_warps) pairs a GPU offers it)
_BN = {
    "apply": (bn._bn_apply_kernel, bn._ELEMENTWISE_BLOCKS),
    "bwd_reduce": (bn._bn_bwd_reduce_kernel, bn._REDUCE_BLOCKS),
    "bwd_dx": (bn._bn_bwd_dx_kernel, bn._ELEMENTWISE_BLOCKS),
}


@pytest.mark.parametrize("kernel, config", [
    pytest.param(name, c, id=f"{name}-{_label(c)}")
    for name, (_, blocks) in _BN.items()
    for c in (triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in blocks)
])
def test_bn_config(kernel: str, config: triton.Config) -> None:
    tuned = _BN[kernel][0]
    with tuned.forced(config):
        run_case(Case(n=4, c=64, k=48, h=15, w=15, residual=True), torch.bfloat16, True,
                 "triton", device="cuda")
    assert tuned.last_config is config


# Backward convolutions (bf16, a training step through the whole op): dgrad and wgrad tiles on a
# 128-channel stride-2 conv, the flat wgrad on the stem, the direct kernels on ResNeXt's groups.
WIDE_S2 = Case(n=2, c=128, k=128, h=15, w=15, stride=2)
_BWD = {
    "dgrad": (conv_bwd._dgrad_gemm, conv_bwd.GPU_DGRAD_GEMM_CONFIGS, WIDE_S2),
    "wgrad": (conv_bwd._wgrad_gemm, conv_bwd.GPU_WGRAD_GEMM_CONFIGS, WIDE_S2),
    "wgrad_flat": (conv_bwd._wgrad_gemm, conv_bwd.GPU_WGRAD_GEMM_CONFIGS, STEM),
    "dgrad_direct": (conv_bwd._dgrad_direct, conv_bwd.GPU_DIRECT_CONFIGS, GROUPED),
    "wgrad_direct": (conv_bwd._wgrad_direct, conv_bwd.GPU_DIRECT_CONFIGS, GROUPED),
}


@pytest.mark.parametrize("kernel, config", [
    pytest.param(name, c, id=f"{name}-{_label(c)}")
    for name, (_, configs, _) in _BWD.items() for c in configs
])
def test_backward_config(kernel: str, config: triton.Config) -> None:
    tuned, _, shape = _BWD[kernel]
    with tuned.forced(config):
        run_case(shape, torch.bfloat16, True, "triton", device="cuda")
    assert tuned.last_config is config


# Block-fused training (a bottleneck through the block op, bf16): the forward conv with the
# activation prologue and its BN partials, and the dgrad with the join epilogue, whose per-tile
# partial rows are sized for the smallest BLOCK_M and sliced by the tile that ran: a 64-row tile
# of each (with autotuning off the GPU tests run 128-row tiles there).
def _first(configs: list[triton.Config], block_m: int) -> triton.Config:
    return next(c for c in configs if c.kwargs["BLOCK_M"] == block_m and not c.kwargs.get("TMA"))


_BLOCK_TILES = {
    "gemm": (tconv._gemm, _first(tconv.GPU_GEMM_CONFIGS, 64)),
    "dgrad": (conv_bwd._dgrad_gemm, _first(conv_bwd.GPU_DGRAD_GEMM_CONFIGS, 64)),
}


@pytest.mark.parametrize("kernel", _BLOCK_TILES)
def test_block_op_with_64_row_tiles(kernel: str) -> None:
    from fastres.nn import Bottleneck
    from tests.ops.test_block import Block, check_block

    tuned, config = _BLOCK_TILES[kernel]
    with tuned.forced(config):
        check_block(Block("bottleneck-s2", Bottleneck, 64, 32, stride=2, hw=15), torch.bfloat16,
                    "triton", steps=1, n=2, device="cuda")
    assert tuned.last_config is config
