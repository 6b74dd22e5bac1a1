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


def eager_conv_bn_relu(
    x, weight, bn_weight, bn_bias, running_mean, running_var, *, bias=None, training,
    momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=True,
):
    """Plain PyTorch, the definition of the fused op (batch stats when running stats are None)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(
        y, running_mean, running_var, bn_weight, bn_bias,
        training or running_mean is None, momentum, eps,
    )
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def merge_partials(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile BN partials (count (T,), mean and M2 (T, K)) merged in plain PyTorch, in their
    dtype, all tiles at once (two-pass over the tile means): (mean, biased var) per channel."""
    n = count.sum()
    mu = (count[:, None] * mean).sum(0) / n
    d = mean - mu
    return mu, (m2.sum(0) + (count[:, None] * d * d).sum(0)) / n
