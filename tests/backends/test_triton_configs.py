"""Every configuration an autotuner may pick, forced once on the GPU against float64.

The GPU tests run with one configuration per kernel (``FASTRES_TRITON_AUTOTUNE=0``); the
benchmarks then autotune and may pick any other. Each GEMM, flat-K, direct and BN configuration
is forced here (``Tuned.forced``) on one representative shape: every dtype for the convolution
tiles with the training epilogue (raw output + BN partials, sliced to the tile's BLOCK_M), the
fused eval epilogue and the BN kernels in bf16 (~75 compilations in all).
"""

from __future__ import annotations

import pytest
import torch
import triton

from fastres.backends.triton import bn
from fastres.backends.triton import conv as tconv
from tests.backends.test_triton_conv import _check_tuned
from tests.ops.cases import Case, run_case

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DENSE = Case(n=4, c=64, k=64, h=15, w=15)
STEM = Case(n=2, c=3, k=64, r=7, stride=2, padding=3, h=33, w=31)
GROUPED = Case(n=4, c=128, k=128, groups=32, h=14, w=14)  # ResNeXt 32x4d: 4 per group


def _label(config: triton.Config) -> str:
    return "_".join(f"{k}{v}" for k, v in config.kwargs.items()) + (
        f"_w{config.num_warps}s{config.num_stages}")


def _params(configs, dtypes):
    return [pytest.param(c, d, id=f"{_label(c)}-{str(d).removeprefix('torch.')}")
            for c in configs for d in dtypes]


@pytest.mark.parametrize("config, dtype", _params(tconv.GPU_GEMM_CONFIGS, DTYPES))
def test_gemm_config(config: triton.Config, dtype: torch.dtype) -> None:
    with tconv._gemm.forced(config):
        _check_tuned(DENSE, dtype, "cuda", epilogues=("raw_bias",) if dtype != torch.bfloat16
                     else ("raw_bias", "eval_res"))
    assert tconv._gemm.last_config is config


@pytest.mark.parametrize("config, dtype", _params(tconv.GPU_GEMM_CONFIGS, [torch.bfloat16]))
def test_flat_k_config(config: triton.Config, dtype: torch.dtype) -> None:
    with tconv._gemm.forced(config):
        _check_tuned(STEM, dtype, "cuda", epilogues=("raw_bias",))
    assert tconv._gemm.last_config is config


@pytest.mark.parametrize("config, dtype", _params(tconv.GPU_DIRECT_CONFIGS, DTYPES))
def test_direct_config(config: triton.Config, dtype: torch.dtype) -> None:
    with tconv._direct.forced(config):
        _check_tuned(GROUPED, dtype, "cuda", epilogues=("raw_bias",) if dtype != torch.bfloat16
                     else ("raw_bias", "eval_res"))
    assert tconv._direct.last_config is config


_BN_KERNELS = {"apply": bn._bn_apply_kernel, "bwd_reduce": bn._bn_bwd_reduce_kernel,
               "bwd_dx": bn._bn_bwd_dx_kernel}


@pytest.mark.parametrize("kernel, config", [
    pytest.param(name, c, id=f"{name}-{_label(c)}")
    for name, k in _BN_KERNELS.items() for c in k.configs
])
def test_bn_config(kernel: str, config: triton.Config) -> None:
    tuned = _BN_KERNELS[kernel]
    with tuned.forced(config):
        run_case(Case(n=4, c=64, k=48, h=15, w=15, residual=True), torch.bfloat16, True,
                 "triton", device="cuda")
    assert tuned.last_config is config
