"""Plain PyTorch: the ground truth kernels are tested against, and the fallback on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CallInfo, ConvParams, OptTensor, Tensor

CL = torch.channels_last


def conv_backward(
    dy: Tensor, x: Tensor, weight: Tensor, conv: ConvParams, has_bias: bool, mask: tuple[bool, ...]
) -> tuple[OptTensor, OptTensor, OptTensor]:
    """Convolution dgrad / wgrad / bias grad of ``dy`` through PyTorch (cuDNN on GPU)."""
    want = [mask[0], mask[1], mask[2] and has_bias]
    if not any(want):
        return None, None, None
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy,
        x,
        weight,
        [weight.shape[0]] if has_bias else None,
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        False,
        [0, 0],
        conv.groups,
        want,
    )
    return dx, dw, db


def bn_relu_backward(
    dz: Tensor,
    y: Tensor,
    z: Tensor,
    mean: Tensor,
    var: Tensor,
    bn_weight: OptTensor,
    *,
    batch_stats: bool,
    eps: float,
    relu: bool,
    need_gamma: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """fp32 dReLU + dBN: returns ``(g, dy, dgamma, dbeta)`` (g is the grad of the residual)."""
    dims = (0, 2, 3)
    g = dz.to(torch.float32, copy=True)  # fresh: g is returned as the residual's grad
    if relu:
        g.mul_(z > 0)
    invstd = torch.rsqrt(var + eps).view(1, -1, 1, 1)
    gamma = 1.0 if bn_weight is None else bn_weight.float().view(1, -1, 1, 1)
    dbeta = g.sum(dims)
    dgamma = None
    if batch_stats or need_gamma:
        yhat = (y.float() - mean.view(1, -1, 1, 1)) * invstd
        dgamma = (g * yhat).sum(dims)
    if batch_stats:
        count = g.numel() // g.shape[1]
        dy = gamma * invstd * (
            g - (dbeta / count).view(1, -1, 1, 1) - yhat * (dgamma / count).view(1, -1, 1, 1)
        )
    else:
        dy = gamma * invstd * g
    return g, dy, dgamma, dbeta


class ReferenceBackend:
    name = "reference"

    def unsupported_reason(self, call: CallInfo) -> str | None:
        return None

    def forward(
        self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *,
        conv, batch_stats, eps, relu, save_for_backward,
    ):
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = y.contiguous(memory_format=CL)
        if batch_stats:
            var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
            z = F.batch_norm(y, None, None, bn_weight, bn_bias, True, 0.0, eps)
        else:
            mean, var = running_mean.float().clone(), running_var.float().clone()
            z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        if residual is not None:
            z = z + residual
        if relu:
            z = F.relu(z)
        z = z.contiguous(memory_format=CL)
        if not save_for_backward:
            y = y.new_empty(0)
        return z, y, mean, var

    def backward(
        self, dz, x, weight, y, z, mean, var, bn_weight, *,
        conv, batch_stats, eps, relu, has_bias, output_mask,
    ):
        g, dy, dgamma, dbeta = bn_relu_backward(
            dz, y, z, mean, var, bn_weight,
            batch_stats=batch_stats, eps=eps, relu=relu, need_gamma=output_mask[3],
        )
        dx, dw, db = conv_backward(dy.to(x.dtype), x, weight, conv, has_bias, output_mask)
        return (
            dx, dw, db,
            dgamma if output_mask[3] else None,
            dbeta if output_mask[4] else None,
            g.to(dz.dtype) if output_mask[5] else None,
        )
