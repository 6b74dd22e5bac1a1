"""The equivalence rule shared by all tests.

Ground truth is the computation in float64 on the CPU. A fused result may be at most ``RATIO``
times as far from it as plain PyTorch in the same dtype on the same device is (max-abs error and
norm-wise relative error both), plus a floor of a few ulps of the result's scale. NaN never passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RATIO = 2.0


def _floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return 4 * torch.finfo(dtype).eps * max(scale, 1e-3)


def assert_close_ratio(
    name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, ratio: float = RATIO
) -> None:
    """``out`` (fused) vs ``ref`` (float64) compared with ``base`` (plain PyTorch) vs ``ref``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: result has NaN (unwritten or invalid output)"
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    base64 = base.detach().double().cpu()
    floor = _floor(ref64, out.dtype)
    err = (out64 - ref64).abs().max().item()
    base_err = (base64 - ref64).abs().max().item()
    assert err <= ratio * base_err + floor, (
        f"{name}: max error {err:.3e} > {ratio} x PyTorch's {base_err:.3e} + {floor:.1e}"
    )
    ref_norm = ref64.norm().item() + 1e-30
    rel = (out64 - ref64).norm().item() / ref_norm
    base_rel = (base64 - ref64).norm().item() / ref_norm
    rel_floor = 4 * torch.finfo(out.dtype).eps
    assert rel <= ratio * base_rel + rel_floor, (
        f"{name}: norm-wise relative error {rel:.3e} > {ratio} x PyTorch's {base_rel:.3e}"
    )


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32 (10 explicit mantissa bits), to nearest with ties away from zero:
    the operands of the Triton kernels' fp32 tensor-core products (and of cuDNN's TF32 path)."""
    i = (t.to(torch.float32).contiguous().view(torch.int32) + 0x1000) & ~0x1FFF
    return i.view(torch.float32).to(t.dtype).view_as(t)


class _TF32Conv2d(torch.autograd.Function):
    """conv2d whose every product takes TF32-cut operands and sums in fp32, forward and backward:
    the fair plain-PyTorch baseline for fp32 on tensor cores. (cuDNN under ``allow_tf32`` picks
    true fp32 for some shapes, which would hold a TF32 kernel to a tighter bound than TF32 has.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return F.conv2d(to_tf32(x), to_tf32(weight), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy32 = to_tf32(dy)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            dx = torch.nn.grad.conv2d_input(x.shape, to_tf32(weight), dy32, *ctx.conv)
            dw = torch.nn.grad.conv2d_weight(to_tf32(x), weight.shape, dy32, *ctx.conv)
        db = dy.sum((0, 2, 3)) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None


def eager_conv_bn_relu(
    x, weight, bn_weight, bn_bias, running_mean, running_var, *, bias=None, training,
    momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=True,
    act=None, tf32=False,
):
    """Plain PyTorch, the definition of the fused op (batch stats when running stats are None).

    ``act`` ("relu", "silu", "none") overrides ``relu`` as in ``fastres.ops.conv_bn_relu``.
    ``tf32``: fp32 convolutions with TF32 operands (see ``_TF32Conv2d``)."""
    if tf32:
        y = _TF32Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
    else:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(
        y, running_mean, running_var, bn_weight, bn_bias,
        training or running_mean is None, momentum, eps,
    )
    if residual is not None:
        y = y + residual
    act = ("relu" if relu else "none") if act is None else act
    return {"relu": F.relu, "silu": F.silu, "none": lambda t: t}[act](y)


def merge_partials(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile BN partials (count (T,), mean and M2 (T, K)) merged in plain PyTorch, in their
    dtype, all tiles at once (two-pass over the tile means): (mean, biased var) per channel."""
    n = count.sum()
    mu = (count[:, None] * mean).sum(0) / n
    d = mean - mu
    return mu, (m2.sum(0) + (count[:, None] * d * d).sum(0)) / n
