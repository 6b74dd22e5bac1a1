"""The Triton backend: fused convolution (``conv.py``), BatchNorm kernels (``bn.py``) and the
convolution backward (``conv_bwd.py``).

Forward, batch statistics (training, or eval without running statistics)::

    y, p = conv2d_fused(x, w, bias, conv, stats=True)  # raw conv + per-tile (count, mean, M2)
    mean, var, scale, shift = bn.finalize(p.count, p.mean, p.m2, γ, β, eps)  # Chan merge, fp32
    z = bn.apply(y, scale, shift, residual, relu)  # or SiLU

Forward, running statistics: scale/shift come from the running statistics; without autograd the
whole op is one conv kernel with scale/shift, residual and ReLU in its epilogue; with autograd the
raw y is kept for the backward pass, so it is conv then apply.

Backward, no dy tensor and no PyTorch convolution (``conv_bwd.py``)::

    Σg, Σg·ŷ, δ = bn.reductions(dz, y, z, mean, var, dres=...)  # 2 launches; writes dres = g
    dx = conv_bwd.dgrad(dy_operand, w, conv, x.shape)   # 1 launch, dy formed while loading
    dw = conv_bwd.wgrad(dy_operand, x, w, conv)         # 2 launches: chunk partials, fixed sum
    db = conv_bwd.bias_grad(dy_operand, ...)            # from Σg, no pass over dy

With SiLU (not invertible, so no mask from z) the reduction pass recomputes the pre-activation
v = (y − mean)·scale + β (+ residual) and also stores g = dz·silu'(v); dgrad/wgrad read that g
as their dz, with no activation.

dγ = Σg·ŷ and dβ = Σg. Only what ``output_mask`` asks for runs: at most 5 Triton launches
(``MAX_BACKWARD_LAUNCHES``; with running statistics and nothing needing the sums, dres = g comes
from ``bn.backward``'s one element-wise pass instead) plus a few element-wise torch ops on (K,)
vectors for the bias grad.

SyncBatchNorm (``group``, the c10d name of a process group; ``sync.py``): the partials are merged
to one per-channel triple, one all_gather exchanges the triples and ``bn.finalize`` merges them;
backward, the reduction pass's (Σg, Σg·ŷ) are all-reduced once before dgrad/wgrad read them.

Importing this package needs no GPU; kernels compile on first launch.
"""

from __future__ import annotations

import torch

from .. import _alloc, devices
from ..base import CallInfo, ConvParams, OptTensor, Tensor
from . import _tuning, block, bn, conv_bwd
from . import conv as _conv
from . import sync as _sync

# Triton kernel launches of one backward, at most (see the module docstring).
MAX_BACKWARD_LAUNCHES = 5


class TritonBackend:
    """Implements :class:`fastres.backends.base.Backend` with Triton kernels."""

    name = "triton"

    def unsupported_reason(self, call: CallInfo) -> str | None:
        if call.device.type != "cuda" and not _tuning.INTERPRET:
            return (
                f"Triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"the input is on {call.device}"
            )
        if call.dtype not in _conv.DTYPES:
            return (
                f"the Triton kernels support float32, float16 and bfloat16, not {call.dtype} "
                f"(use the reference backend for {call.dtype})"
            )
        return devices.device_reason(call.device, call.dtype, "the Triton kernels")

    def forward(
        self,
        x: Tensor,
        weight: Tensor,
        bias: OptTensor,
        bn_weight: OptTensor,
        bn_bias: OptTensor,
        running_mean: OptTensor,
        running_var: OptTensor,
        residual: OptTensor,
        *,
        conv: ConvParams,
        batch_stats: bool,
        eps: float,
        act: str | None,
        save_for_backward: bool,
        group: str | None = None,
    ) -> tuple[Tensor, ...]:
        """With ``group`` (SyncBatchNorm, batch statistics), the statistics are the process
        group's (see ``sync.py``) and a fifth result is their count (1,) fp32."""
        relu, silu = act == "relu", act == "silu"
        count = None
        if batch_stats:
            y, p = _conv.conv2d_fused(x, weight, bias, conv, stats=True)
            if group is None:
                stats = bn.finalize(p.count, p.mean, p.m2, bn_weight, bn_bias, eps)
            else:  # the statistics exchange between the partials and the finalize
                *stats, count = _sync.finalize(p.count, p.mean, p.m2, bn_weight, bn_bias, eps,
                                               group)
            mean, var, scale, shift = stats
            z = bn.apply(y, scale, shift, residual, relu, silu=silu)
        else:
            mean, var, scale, shift = bn.running_affine(
                running_mean, running_var, bn_weight, bn_bias, eps
            )
            if save_for_backward:
                y, _ = _conv.conv2d_fused(x, weight, bias, conv)
                z = bn.apply(y, scale, shift, residual, relu, silu=silu)
            else:  # inference: one kernel, BN folded into the conv epilogue
                z, _ = _conv.conv2d_fused(
                    x, weight, bias, conv, scale=scale, shift=shift, residual=residual, relu=relu,
                    silu=silu,
                )
                y = None
        if not save_for_backward:
            y = x.new_empty(0)
        return (z, y, mean, var) if count is None else (z, y, mean, var, count)

    def backward(
        self,
        dz: Tensor,
        x: Tensor,
        weight: Tensor,
        y: Tensor,
        z: OptTensor,
        mean: Tensor,
        var: Tensor,
        bn_weight: OptTensor,
        *,
        bn_bias: OptTensor,
        residual: OptTensor,
        conv: ConvParams,
        batch_stats: bool,
        eps: float,
        act: str | None,
        has_bias: bool,
        output_mask: tuple[bool, bool, bool, bool, bool, bool],
        group: str | None = None,
    ) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
        """With ``group`` (SyncBatchNorm), dy takes the process group's sums (one all-reduce);
        dγ and dβ stay this process' own, as PyTorch's SyncBatchNorm gives them."""
        relu = act == "relu"
        need_dx, need_dw = output_mask[0], output_mask[1]
        need_db = output_mask[2] and has_bias
        need_bn = output_mask[3] or output_mask[4]
        dres = None
        sums = None
        if act == "silu":
            # the reduction pass recomputes v from y and stores g = dz·silu'(v); the conv
            # backward then reads g as its dz, with no activation (one more write of an
            # activation-sized tensor than ReLU, whose mask the conv backward forms at load)
            g = _alloc.empty(*dz.shape, dtype=dz.dtype, device=dz.device, channels_last=True)
            affine = (bn_weight if bn_weight is not None else mean.new_ones(mean.shape),
                      bn_bias if bn_bias is not None else mean.new_zeros(mean.shape))
            sums = bn.reductions(
                dz, y, None, mean, var, batch_stats=batch_stats, eps=eps, relu=False, dres=g,
                silu=bn.SiluInput(*affine, residual),
            )
            dz, z, dres = g, None, g if output_mask[5] else None
        elif batch_stats or need_bn or need_db:
            if output_mask[5]:
                dres = _alloc.empty(*dz.shape, dtype=dz.dtype, device=dz.device, channels_last=True)
            sums = bn.reductions(
                dz, y, z, mean, var, batch_stats=batch_stats, eps=eps, relu=relu, dres=dres
            )
        elif output_mask[5]:  # running statistics, no sums needed: g alone
            _, _, _, dres = bn.backward(
                dz, y, z, mean, var, bn_weight, batch_stats=False, eps=eps, relu=relu,
                need_dy=False, need_stats_grad=False, need_dres=True,
            )
        count = dz.numel() // dz.shape[1]
        dy_sums = sums
        if group is not None:  # the group's sums for dy; this shard's for dγ, dβ
            dy_sums, sums = _sync.synced_sums(sums, count, var, eps, group)
        op = conv_bwd.DyOperand(
            dz, z if relu else None, y, mean, var, bn_weight, dy_sums, batch_stats, eps
        )
        dx = conv_bwd.dgrad(op, weight, conv, x.shape) if need_dx else None
        dw = conv_bwd.wgrad(op, x, weight, conv) if need_dw else None
        db = None
        if need_db and group is None:
            db = conv_bwd.bias_grad(op, count, weight.dtype)
        elif need_db:  # this shard's Σdy = a·(Σg − count·mean_g), mean_g the group's
            a = torch.rsqrt(var + eps) * (1.0 if bn_weight is None else bn_weight.float())
            db = (a * (sums[0] - dy_sums[0])).to(weight.dtype)
        return (
            dx, dw, db,
            sums[1] if output_mask[3] else None,
            sums[0] if output_mask[4] else None,
            dres,
        )

    # A whole residual block (fastres.ops.block): see block.py.
    block_forward = staticmethod(block.block_forward)
    block_backward = staticmethod(block.block_backward)


__all__ = ["TritonBackend"]
