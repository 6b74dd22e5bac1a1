"""The Triton backend: fused convolution (``conv.py``) plus BatchNorm kernels (``bn.py``).

Forward, batch statistics (training, or eval without running statistics)::

    y, p = conv2d_fused(x, w, bias, conv, stats=True)  # raw conv + per-tile (count, mean, M2)
    mean, var, scale, shift = bn.finalize(p.count, p.mean, p.m2, γ, β, eps)  # Chan merge, fp32
    z = bn.apply(y, scale, shift, residual, relu)

Forward, running statistics: scale/shift come from the running statistics; without autograd the
whole op is one conv kernel with scale/shift, residual and ReLU in its epilogue; with autograd the
raw y is kept for the backward pass, so it is conv then apply.

Backward: ``bn.backward`` (dReLU, the per-channel reductions, dBN, dresidual), then PyTorch's
convolution backward for dgrad/wgrad/bias-grad (DESIGN.md allows this for the first version).

Importing this package needs no GPU; kernels compile on first launch.
"""

from __future__ import annotations

from ..base import CallInfo, ConvParams, OptTensor, Tensor
from ..reference import conv_backward
from . import _tuning, bn
from . import conv as _conv


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
        return None

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
        relu: bool,
        save_for_backward: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if batch_stats:
            y, p = _conv.conv2d_fused(x, weight, bias, conv, stats=True)
            mean, var, scale, shift = bn.finalize(p.count, p.mean, p.m2, bn_weight, bn_bias, eps)
            z = bn.apply(y, scale, shift, residual, relu)
        else:
            mean, var, scale, shift = bn.running_affine(
                running_mean, running_var, bn_weight, bn_bias, eps
            )
            if save_for_backward:
                y, _ = _conv.conv2d_fused(x, weight, bias, conv)
                z = bn.apply(y, scale, shift, residual, relu)
            else:  # inference: one kernel, BN folded into the conv epilogue
                z, _ = _conv.conv2d_fused(
                    x, weight, bias, conv, scale=scale, shift=shift, residual=residual, relu=relu
                )
                y = None
        if not save_for_backward:
            y = x.new_empty(0)
        return z, y, mean, var

    def backward(
        self,
        dz: Tensor,
        x: Tensor,
        weight: Tensor,
        y: Tensor,
        z: Tensor,
        mean: Tensor,
        var: Tensor,
        bn_weight: OptTensor,
        *,
        conv: ConvParams,
        batch_stats: bool,
        eps: float,
        relu: bool,
        has_bias: bool,
        output_mask: tuple[bool, bool, bool, bool, bool, bool],
    ) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
        need_conv = any(output_mask[:2]) or (output_mask[2] and has_bias)
        dy, dgamma, dbeta, dres = bn.backward(
            dz, y, z, mean, var, bn_weight,
            batch_stats=batch_stats, eps=eps, relu=relu,
            need_dy=need_conv, need_stats_grad=output_mask[3] or output_mask[4],
            need_dres=output_mask[5],
        )
        dx = dw = db = None
        if need_conv:
            dx, dw, db = conv_backward(dy, x, weight, conv, has_bias, output_mask)
        return (
            dx, dw, db,
            dgamma if output_mask[3] else None,
            dbeta if output_mask[4] else None,
            dres,
        )


__all__ = ["TritonBackend"]
