"""Conv2d → SyncBatchNorm (+ residual) (→ ReLU or SiLU) in training across processes.

Same function as ``nn.SyncBatchNorm`` after the conv: batch statistics over the whole batch of
every process in the group, running statistics updated from them, gradients as PyTorch's
SyncBatchNorm gives them (γ/β gradients local, for DDP to average; the input gradient uses the
group's sums). Communication is one collective per layer each way:

* forward: one ``all_gather`` of each process' per-channel ``(count, mean, M2)`` (variable shard
  sizes are fine), merged with Chan's formula in rank order, so every process gets bitwise the
  same statistics and a channel whose mean is far above its std stays accurate;
* backward: one ``all_reduce`` of the per-channel ``(Σg, Σg·ŷ)``.

Computed with PyTorch operations (the convolution and its backward through ATen, statistics and
the affine/activation epilogue in fp32): the Triton and CUDA kernels of the single-process op do not
serve the cross-process case yet. It runs wherever ``torch.distributed`` does, on CPU with gloo
too (where PyTorch's own SyncBatchNorm refuses to train).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..ops.conv_bn_relu import update_running_stats

Tensor = torch.Tensor
CL = torch.channels_last
CHANNEL_DIMS = (0, 2, 3)


def sync_group(bn: nn.Module):
    """The process group ``bn`` synchronises over in this call, or None when PyTorch's
    SyncBatchNorm would not synchronise (eval, no process group, a group of one)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _merge(gathered: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, M2)`` of the union from rows ``[count, mean(k), M2(k)]`` per process."""
    counts, means, m2s = gathered[:, :1], gathered[:, 1:1 + k], gathered[:, 1 + k:]
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return count, mean, m2


class _SyncConvBNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                momentum, eps, stride, padding, dilation, groups, act, group):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        yf = y.float()
        k = y.shape[1]
        var, mean = torch.var_mean(yf, dim=CHANNEL_DIMS, correction=0)
        local_count = yf.new_full((1,), y.numel() // k)
        local = torch.cat([local_count, mean, var * local_count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)  # gloo has no all_gather_into_tensor
        count, mean, m2 = _merge(torch.stack(parts), k)
        invstd = torch.rsqrt(m2 / count + eps)
        if running_mean is not None:
            update_running_stats([running_mean], [running_var], [mean], [m2 / (count - 1)],
                                 [momentum])
        scale = invstd if bn_weight is None else invstd * bn_weight.float()
        shift = -mean * scale if bn_bias is None else bn_bias.float() - mean * scale
        z = yf * _per_channel(scale) + _per_channel(shift)
        if residual is not None:
            z = z + residual.float()
        if act == "relu":
            z = torch.relu(z)
        elif act == "silu":
            z = F.silu(z)
        z = z.to(y.dtype).contiguous(memory_format=CL)
        # SiLU's gradient needs its input, recomputed from y, β and the residual (not from z)
        saved = (None, bn_bias, residual) if act == "silu" else (z, None, None)
        ctx.save_for_backward(x, weight, y, mean, invstd, count, bn_weight, *saved)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias, ctx.act, ctx.group = bias is not None, act, group
        ctx.affine_dtypes = tuple(None if t is None else t.dtype for t in (bn_weight, bn_bias))
        return z

    @staticmethod
    def backward(ctx, dz):
        x, weight, y, mean, invstd, count, bn_weight, z, bn_bias, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = dz.float()
        y_hat = (y.float() - _per_channel(mean)) * _per_channel(invstd)
        if ctx.act == "relu":
            g = g * (z > 0)
        elif ctx.act == "silu":
            v = y_hat if bn_weight is None else y_hat * _per_channel(bn_weight.float())
            if bn_bias is not None:
                v = v + _per_channel(bn_bias.float())
            if residual is not None:
                v = v + residual.float()
            g = torch.ops.aten.silu_backward(g, v)
        sum_g, sum_g_yhat = g.sum(CHANNEL_DIMS), (g * y_hat).sum(CHANNEL_DIMS)
        # γ/β gradients from this process' shard only: DDP averages them, as with SyncBatchNorm
        dgamma = sum_g_yhat.to(ctx.affine_dtypes[0]) if needs[3] else None
        dbeta = sum_g.to(ctx.affine_dtypes[1]) if needs[4] else None
        dx = dw = db = None
        if any(needs[:3]):
            sums = torch.cat([sum_g, sum_g_yhat])
            dist.all_reduce(sums, group=ctx.group)
            k = mean.shape[0]
            gamma = 1.0 if bn_weight is None else _per_channel(bn_weight.float())
            dy = gamma * _per_channel(invstd) * (
                g - _per_channel(sums[:k] / count) - y_hat * _per_channel(sums[k:] / count))
            stride, padding, dilation, groups = ctx.conv
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            dx, dw, db = torch.ops.aten.convolution_backward(
                dy.to(x.dtype), x, weight, bias_sizes, stride, padding, dilation, False, [0, 0],
                groups, [needs[0], needs[1], needs[2] and ctx.has_bias])
        dres = g.to(dz.dtype) if needs[5] else None
        return dx, dw, db, dgamma, dbeta, dres, *(None,) * 10


def sync_conv_bn_relu(conv: nn.Conv2d, bn: nn.SyncBatchNorm, x: Tensor, residual: Tensor | None,
                      act: str | None, momentum: float | Tensor, group) -> Tensor:
    """``act(sync_bn(conv(x)) + residual)`` in training over ``group`` (see the module doc);
    ``act`` is ``"relu"``, ``"silu"`` or None.

    ``momentum`` is the factor :func:`fastres.nn.conv_bn_relu.bn_momentum` computed (which also
    advanced ``num_batches_tracked``).
    """
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, residual = x.to(dtype), None if residual is None else residual.to(dtype)
        weight = conv.weight.to(dtype)
        bias = None if conv.bias is None else conv.bias.to(dtype)
    else:
        weight, bias = conv.weight, conv.bias
    track = bn.track_running_stats
    with torch.autocast(device_type, enabled=False):
        return _SyncConvBNReLU.apply(
            x, weight, bias, bn.weight, bn.bias, residual,
            bn.running_mean if track else None, bn.running_var if track else None,
            momentum, bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups, act, group)


__all__ = ["sync_conv_bn_relu", "sync_group"]
