"""How a Triton kernel's configuration is chosen: autotuned, first-fitting, or forced."""

import os
import subprocess
import sys

import pytest
import torch
import triton

from fastres.backends import ConvParams
from fastres.backends.triton import _tuning, bn, conv

SCRIPT = """
from fastres.backends.triton import _tuning, bn, conv
kernels = (conv._gemm, conv._direct, bn._bn_apply_kernel, bn._bn_bwd_reduce_kernel,
           bn._bn_bwd_dx_kernel)
print(_tuning.AUTOTUNE, *(k.tuning for k in kernels))
"""


def _run(value: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTRES_TRITON_AUTOTUNE"] = value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_autotune_off_launches_directly():
    # no triton.autotune at all: triton 3.6 would still time a single remaining configuration
    assert _run("0") == ["False"] * 6


def test_autotune_on_tunes_every_multi_config_kernel():
    assert _run("1") == ["True"] * 6


def test_first_fitting_config_is_the_pruned_one():
    narrow = conv._prune_gemm(conv.GPU_GEMM_CONFIGS, {"Kg": 16, "Cg": 16})
    assert narrow and all(c.kwargs["BLOCK_N"] <= 32 for c in narrow)
    assert len(conv._prune_gemm(conv.GPU_GEMM_CONFIGS, {"Kg": 256, "Cg": 256})) == len(
        conv.GPU_GEMM_CONFIGS)
    tuned = _tuning.Tuned(conv._conv_gemm_kernel, conv.GPU_GEMM_CONFIGS, ["M"], conv._prune_gemm)
    args = dict.fromkeys(conv._conv_gemm_kernel.arg_names) | {"Kg": 16, "Cg": 16}
    ordered = [args[name] for name in conv._conv_gemm_kernel.arg_names]
    assert tuned.candidates(ordered, {}) == narrow


@pytest.mark.skipif(not _tuning.INTERPRET, reason="interpreter test (GPU: test_triton_configs)")
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_forced_config_runs_and_partials_follow_its_block_m(block_m: int):
    """The per-tile statistics are sliced to the BLOCK_M that actually ran (the buffers are sized
    for the smallest): forcing a larger tile under the interpreter checks the slicing on CPU."""
    x = torch.randn(2, 16, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) / 12
    params = ConvParams((1, 1), (1, 1), (1, 1), 1)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)
    with conv._gemm.forced(config):
        y, part = conv.conv2d_fused(x, w, None, params, stats=True)
    assert conv._gemm.last_config is config
    assert _tuning.launched_configs()["_conv_gemm_kernel"] == (
        f"BLOCK_M={block_m},BLOCK_N=16,BLOCK_K=16 w4 s3")
    m = 2 * 9 * 7
    assert part.count.shape == (triton.cdiv(m, block_m),)
    assert part.count.sum().item() == m
    assert (part.count[:-1] == block_m).all()
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    mean, var, _, _ = bn.finalize(part.count, part.mean, part.m2, None, None, 1e-5)
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
