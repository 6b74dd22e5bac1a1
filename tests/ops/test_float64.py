"""float64 through the reference backend computes in float64: BN statistics and gradients too.

The float64 result must agree with plain PyTorch in float64 to float64 rounding (a few 1e-16
relative), far tighter than the ratio rule's floor would hold it: an fp32 step anywhere in the
forward statistics or the backward shows as ~1e-7.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastres
from fastres.nn import Bottleneck
from fastres.nn.blocks import layer_by_layer
from tests.models._util import randomize_bn, tensors_by_key
from tests.numerics import eager_conv_bn_relu

F64 = torch.float64
CL = torch.channels_last


def assert_float64_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == F64, f"{name}: {got.dtype}"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-13 * max(scale, 1e-3), f"{name}: error {err:.2e} at scale {scale:.2e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_in_float64(training: bool) -> None:
    x = torch.randn(2, 16, 8, 8, dtype=F64)
    args = [torch.randn(32, 16, 3, 3, dtype=F64) * 0.1, torch.rand(32, dtype=F64) + 0.5,
            torch.randn(32, dtype=F64) * 0.2]
    stats = [torch.randn(32, dtype=F64) * 0.2, torch.rand(32, dtype=F64) + 0.5]
    residual = torch.randn(2, 32, 8, 8, dtype=F64)
    dz = torch.randn(2, 32, 8, 8, dtype=F64)
    runs = []
    for fn in (fastres.ops.conv_bn_relu, eager_conv_bn_relu):
        leaves = [t.clone().requires_grad_(True) for t in (x, *args, residual)]
        running = [s.clone() for s in stats]
        with fastres.use_backend("reference"):
            z = fn(leaves[0].contiguous(memory_format=CL), *leaves[1:4], *running,
                   training=training, padding=1, residual=leaves[4])
        z.backward(dz)
        runs.append([z.detach(), *(t.grad for t in leaves), *running])
    names = ["output", "x.grad", "weight.grad", "bn_weight.grad", "bn_bias.grad",
             "residual.grad", "running_mean", "running_var"]
    for name, got, want in zip(names, *runs):
        assert_float64_close(name, got, want)


@pytest.mark.parametrize("per_layer", [False, True], ids=["block-op", "per-layer"])
def test_block_trains_in_float64(per_layer: bool) -> None:
    fused = randomize_bn(Bottleneck(32, 16, stride=2)).double().train()
    plain = copy.deepcopy(fused).set_fused(False)
    x = torch.randn(2, 32, 8, 8, dtype=F64)
    upstream = torch.randn(2, 64, 4, 4, dtype=F64)
    outs = []
    for block in (fused, plain):
        inp = x.clone().requires_grad_(True)
        with fastres.use_backend("reference"), fastres.backends.record_calls() as served:
            if per_layer:
                with layer_by_layer():
                    y = block(inp.contiguous(memory_format=CL))
            else:
                y = block(inp.contiguous(memory_format=CL))
            y.backward(upstream)
        if block is fused:  # the path under test served the step
            want = "conv_bn_relu" if per_layer else "residual_block"
            assert served and all(c.op == want for c in served), [c.op for c in served]
        outs.append((y.detach(), inp.grad))
    assert_float64_close("output", outs[0][0], outs[1][0])
    assert_float64_close("x.grad", outs[0][1], outs[1][1])
    for key, t in tensors_by_key(fused).items():
        want = tensors_by_key(plain)[key]
        if t.grad is not None or want.grad is not None:
            assert_float64_close(f"{key}.grad", t.grad, want.grad)
        elif t.is_floating_point():
            assert_float64_close(key, t, want)
