"""Plain PyTorch: the ground truth kernels are tested against, and the fallback on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sync as _sync
from .base import BlockParams, CallInfo, ConvParams, OptTensor, Tensor

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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype BatchNorm statistics and gradients are computed in: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    group: str | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """fp32 (fp64 for fp64) dReLU + dBN: returns ``(g, dy, dgamma, dbeta)`` (g is the grad of
    the residual). With ``group`` (SyncBatchNorm) dy takes the process group's sums; dγ, dβ stay
    local."""
    dims = (0, 2, 3)
    acc = _acc(dz.dtype)
    g = dz.to(acc, copy=True)  # fresh: g is returned as the residual's grad
    if relu:
        g.mul_(z > 0)
    mean, var = mean.to(acc), var.to(acc)
    invstd = torch.rsqrt(var + eps).view(1, -1, 1, 1)
    gamma = 1.0 if bn_weight is None else bn_weight.to(acc).view(1, -1, 1, 1)
    dbeta = g.sum(dims)
    dgamma = None
    if batch_stats or need_gamma:
        yhat = (y.to(acc) - mean.view(1, -1, 1, 1)) * invstd
        dgamma = (g * yhat).sum(dims)
    if batch_stats:
        count = g.numel() // g.shape[1]
        sum_g, sum_gyhat, total = dbeta, dgamma, count
        if group is not None:  # the whole batch's sums; dγ, dβ stay this process' share
            (sum_g, sum_gyhat), total = _sync.reduce_sums((dbeta, dgamma), count, group)
        dy = gamma * invstd * (
            g - (sum_g / total).view(1, -1, 1, 1) - yhat * (sum_gyhat / total).view(1, -1, 1, 1)
        )
    else:
        dy = gamma * invstd * g
    return g, dy, dgamma, dbeta


_ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


def _bn_output(y: Tensor, mean: Tensor, var: Tensor, bn_weight: OptTensor, bn_bias: OptTensor,
               eps: float) -> Tensor:
    """bn(y) from the statistics used, computed in fp32 (fp64 for fp64) and rounded to y's
    dtype, as BatchNorm computes and stores it."""
    acc = _acc(y.dtype)
    shape = (1, -1, 1, 1)
    out = (y.to(acc) - mean.to(acc).view(shape)) * torch.rsqrt(var.to(acc) + eps).view(shape)
    if bn_weight is not None:
        out = out * bn_weight.to(acc).view(shape)
    if bn_bias is not None:
        out = out + bn_bias.to(acc).view(shape)
    return out.to(y.dtype)


class ReferenceBackend:
    name = "reference"

    def block_forward(
        self, x, weights, bn_weights, bn_biases, running_means, running_vars, *,
        block, batch_stats, save_for_backward, shortcut_input=None, branch_scale=None,
        group=None, gate=None,
    ):
        """``(out, saved, means, vars)``, and with ``group`` (SyncBatchNorm over that process
        group) each BN's count over the group ((1,) fp32) fifth."""
        counts: list[Tensor] = []
        with torch.no_grad():
            out, ys, means, variances = block_eager(
                x, weights, bn_weights, bn_biases, running_means, running_vars, block,
                batch_stats, shortcut_input=shortcut_input, branch_scale=branch_scale,
                group=group, counts=counts, gate=None if gate is None else gate.forward,
                gate_before_conv=None if gate is None else gate.before_conv,
            )
        keep = [] if not save_for_backward else ys[:-1] if block.preact else ys
        if group is not None:
            return out, keep, means, variances, counts
        return out, keep, means, variances

    def block_backward(
        self, dout, x, out, weights, saved, means, variances, bn_weights, bn_biases, *,
        block, batch_stats, output_mask, shortcut_input=None, branch_scale=None, group=None,
        gate=None,
    ):
        """The chain rule through the block, layer by layer (``bn_relu_backward`` and PyTorch's
        convolution backward), the activations recomputed from the saved raw outputs.
        ``(dx, dweights, dbn_weights, dbn_biases, dshortcut_input)``, as ``block_eager``."""
        n_w, n_bn = len(weights), len(bn_weights)
        need_w = output_mask[1:1 + n_w]
        need_g = output_mask[1 + n_w:1 + n_w + n_bn]
        dws: list[OptTensor] = [None] * n_w
        dgs: list[OptTensor] = [None] * n_bn
        dbs: list[OptTensor] = [None] * n_bn

        def act(t: Tensor, i: int) -> Tensor:
            """relu(bn_i(t)) from the saved statistics, computed in fp32 (fp64 for fp64) and
            rounded to t's dtype, as BatchNorm computes and stores it."""
            acc = _acc(t.dtype)
            shape = (1, -1, 1, 1)
            scale = torch.rsqrt(variances[i].to(acc) + block.eps[i])
            if bn_weights[i] is not None:
                scale = scale * bn_weights[i].to(acc)
            z = (t.to(acc) - means[i].to(acc).view(shape)) * scale.view(shape)
            if bn_biases[i] is not None:
                z = z + bn_biases[i].to(acc).view(shape)
            return F.relu(z).to(t.dtype)

        def dbn(dz: Tensor, y: Tensor, z: Tensor, i: int) -> tuple[Tensor, Tensor]:
            """(g, dy) of BN i + ReLU, its parameter grads recorded."""
            g, dy, dgs[i], dbs[i] = bn_relu_backward(
                dz, y, z, means[i], variances[i], bn_weights[i], batch_stats=batch_stats,
                eps=block.eps[i], relu=True, need_gamma=need_g[i], group=group,
            )
            return g, dy.to(y.dtype)

        def dconv(dy: Tensor, inp: Tensor, i: int, need_dx: bool = True) -> OptTensor:
            p = block.all_convs[i]
            dx, dws[i], _ = conv_backward(dy, inp, weights[i], p, False,
                                          (need_dx, need_w[i], False))
            return dx

        n = len(block.convs)
        dxs = None
        if block.preact:
            k0 = int(block.entry_norm)  # index of bn_1 (the norm after conv_1)
            a0 = act(x, 0) if block.entry_norm else x
            inputs = [a0] + [act(saved[i], k0 + i) for i in range(n - 1)]
            dy = dout
            for i in range(n - 1, 0, -1):
                da = dconv(dy, inputs[i], i)
                _, dy = dbn(da, saved[i - 1], inputs[i], k0 + i - 1)
            da0 = dconv(dy, a0, 0)
            if block.shortcut is not None:
                da0 = da0 + dconv(dout, a0, n)
            if block.entry_norm:
                _, dx = dbn(da0, x, a0, 0)
            else:
                dx = da0
            if block.shortcut is None:
                dx = dx + dout
        else:
            inputs = [x] + [act(saved[i], i) for i in range(n - 1)]
            mid = None if gate is None else gate.before_conv  # conv reading a·gate
            if mid is not None:
                acc = _acc(dout.dtype)
                gate_values = gate.values.to(acc)[:, :, None, None]
            if gate is not None and mid is None:
                dy = _gated_last_dy(dout, out, saved[n - 1], means[n - 1], variances[n - 1],
                                    bn_weights[n - 1], bn_biases[n - 1], block.eps[n - 1],
                                    batch_stats, branch_scale, gate, dgs, dbs, n - 1, group)
            else:
                dbranch = dout  # drop path: the last BN's g is the output's g times scale[n]
                if branch_scale is not None:
                    acc = _acc(dout.dtype)
                    dbranch = dout.to(acc) * branch_scale.to(acc).view(-1, 1, 1, 1)
                _, dy = dbn(dbranch, saved[n - 1], out, n - 1)
            for i in range(n - 1, 0, -1):
                if i == mid:  # a's gradient: da_g·gate + dpooled/HW, dgate = Σ_hw da_g·a
                    a = inputs[i].to(acc)
                    # the conv's input as forward formed it (block_eager's gated())
                    gated = inputs[i] * gate.values.to(x.dtype)[:, :, None, None]
                    da = dconv(dy, gated, i).to(acc)
                    dpooled = gate.backward((da * a).sum((2, 3))).to(acc)
                    hw = a.shape[2] * a.shape[3]
                    da = da * gate_values + (dpooled / hw)[:, :, None, None]
                else:
                    da = dconv(dy, inputs[i], i)
                _, dy = dbn(da, saved[i - 1], inputs[i], i - 1)
            dx = dconv(dy, x, 0)
            if block.shortcut is not None:
                _, dy_s = dbn(dout, saved[n], out, n)
                xs = x if shortcut_input is None else shortcut_input
                d_short = dconv(dy_s, xs, n)
                if shortcut_input is None:
                    dx = dx + d_short
                else:
                    dxs = d_short.contiguous(memory_format=CL)
            else:
                dx = dx + (dout * (out > 0)).to(dx.dtype)
        mask_g = output_mask[1 + n_w:1 + n_w + n_bn]
        mask_b = output_mask[1 + n_w + n_bn:]
        return (
            dx.contiguous(memory_format=CL) if output_mask[0] else None,
            [d if m else None for d, m in zip(dws, need_w)],
            [d if m else None for d, m in zip(dgs, mask_g)],
            [d if m else None for d, m in zip(dbs, mask_b)],
            dxs if output_mask[0] else None,
        )

    def unsupported_reason(self, call: CallInfo) -> str | None:
        return None

    def forward(
        self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *,
        conv, batch_stats, eps, act, save_for_backward, group=None,
    ):
        """``(z, y, mean, var)``; with ``group`` (SyncBatchNorm) the statistics are the process
        group's and a fifth result is their count (1,) fp32."""
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = y.contiguous(memory_format=CL)
        count = None
        if group is not None:
            mean, var, count = sync_batch_stats(y, group)
            z = _bn_output(y, mean, var, bn_weight, bn_bias, eps)
            mean, var, count = mean.to(_acc(y.dtype)), var.to(_acc(y.dtype)), count.float()
        elif batch_stats:
            var, mean = torch.var_mean(y.to(_acc(y.dtype)), dim=(0, 2, 3), correction=0)
            z = F.batch_norm(y, None, None, bn_weight, bn_bias, True, 0.0, eps)
        else:
            acc = _acc(y.dtype)
            mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
            z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        if residual is not None:
            z = z + residual
        if act is not None:
            z = _ACTIVATIONS[act](z)
        z = z.contiguous(memory_format=CL)
        if not save_for_backward:
            y = y.new_empty(0)
        return (z, y, mean, var) if count is None else (z, y, mean, var, count)

    def backward(
        self, dz, x, weight, y, z, mean, var, bn_weight, *,
        bn_bias, residual, conv, batch_stats, eps, act, has_bias, output_mask, group=None,
    ):
        if act == "silu":
            # as eager autograd: F.silu's backward at its input, the BN output (+ residual) in
            # y's dtype, here recomputed from the raw y and the statistics
            pre = _bn_output(y, mean, var, bn_weight, bn_bias, eps)
            if residual is not None:
                pre = pre + residual
            dz = torch.ops.aten.silu_backward(dz, pre)
        g, dy, dgamma, dbeta = bn_relu_backward(
            dz, y, z, mean, var, bn_weight,
            batch_stats=batch_stats, eps=eps, relu=act == "relu", need_gamma=output_mask[3],
            group=group,
        )
        dx, dw, db = conv_backward(dy.to(x.dtype), x, weight, conv, has_bias, output_mask)
        return (
            dx, dw, db,
            dgamma if output_mask[3] else None,
            dbeta if output_mask[4] else None,
            g.to(dz.dtype) if output_mask[5] else None,
        )


def sync_batch_stats(t: Tensor, group: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, count (1,))`` per channel of ``t`` over the whole batch of the
    process group, in fp32 (fp64 for fp64): this process' triple, one all_gather, Chan's merge
    in rank order (:mod:`fastres.backends.sync`)."""
    acc = _acc(t.dtype)
    var, mean = torch.var_mean(t.detach().to(acc), dim=(0, 2, 3), correction=0)
    n = t.numel() // t.shape[1]
    packed = torch.cat([mean.new_full((1,), float(n)), mean, var * n])
    count, mean, m2 = _sync.chan_merge(*_sync.gather_triples(packed, group))
    return mean, m2 / count, count


def _gated_last_dy(dout: Tensor, out: Tensor, y: Tensor, mean: Tensor, var: Tensor,
                   bn_weight: OptTensor, bn_bias: OptTensor, eps: float, batch_stats: bool,
                   branch_scale: OptTensor, gate, dgs: list, dbs: list, i: int,
                   group: str | None = None) -> Tensor:
    """dy of the last conv of a gated block, ``out = relu(a·gate[n, k]·scale[n] + shortcut)``,
    a = bn(y): dz = dout·[out > 0]; dgate = scale·Σ_hw dz·a; dpooled from the gate's own
    backward; the BN sees g = dz·gate·scale + dpooled/(H·W). Records bn i's parameter grads."""
    acc = _acc(dout.dtype)
    n, k, h, w = dout.shape
    dz = dout.to(acc) * (out > 0)
    a = _bn_output(y, mean, var, bn_weight, bn_bias, eps).to(acc)
    scale = gate.values.to(acc).view(n, k, 1, 1)
    if branch_scale is not None:
        scale = scale * branch_scale.to(acc).view(-1, 1, 1, 1)
        dz_gate = dz * branch_scale.to(acc).view(-1, 1, 1, 1)
    else:
        dz_gate = dz
    dpooled = gate.backward((dz_gate * a).sum((2, 3)))
    g = dz * scale + (dpooled.to(acc) / (h * w)).view(n, k, 1, 1)
    _, dy, dgs[i], dbs[i] = bn_relu_backward(g, y, g, mean, var, bn_weight,
                                             batch_stats=batch_stats, eps=eps, relu=False,
                                             need_gamma=True, group=group)
    return dy.to(y.dtype)


def block_eager(
    x: Tensor,
    weights: list[Tensor],
    bn_weights: list[OptTensor],
    bn_biases: list[OptTensor],
    running_means: list[OptTensor],
    running_vars: list[OptTensor],
    block: BlockParams,
    batch_stats: bool,
    *,
    shortcut_input: OptTensor = None,
    branch_scale: OptTensor = None,
    group: str | None = None,
    counts: list[Tensor] | None = None,
    gate=None,
    gate_before_conv: int | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The block of :class:`BlockParams` in plain PyTorch (differentiable): ``(out, raw conv
    outputs conv_1 .. conv_L (, conv_s), means, vars)``. Running statistics are read in eval and
    never written (the op layer updates them). Post-activation only: ``shortcut_input`` is
    what the projection conv reads instead of x; ``branch_scale`` (N,) multiplies the last BN's
    output per sample before the shortcut is added (stochastic depth); ``gate`` (a callable,
    :meth:`ChannelGate.forward`) maps the per-(sample, channel) spatial mean of the last BN's
    output, (N, K) in fp32 (fp64 for fp64), to the gate it is multiplied by before that, or with
    ``gate_before_conv`` i, of conv i's input relu(bn(y_{i−1})) (RegNetY), which it then scales.
    ``group``: batch statistics over that process group (SyncBatchNorm, not differentiable: the
    backward is ``block_backward``'s), each BN's count over the group appended to ``counts``."""
    means: list[Tensor] = []
    variances: list[Tensor] = []

    def conv(t: Tensor, i: int) -> Tensor:
        p = block.all_convs[i]
        y = F.conv2d(t, weights[i], None, p.stride, p.padding, p.dilation, p.groups)
        return y.contiguous(memory_format=CL)

    def norm(t: Tensor) -> Tensor:
        i = len(means)
        if batch_stats and group is not None:
            mean, var, count = sync_batch_stats(t, group)
            z = _bn_output(t, mean, var, bn_weights[i], bn_biases[i], block.eps[i])
            mean, var = mean.to(_acc(t.dtype)), var.to(_acc(t.dtype))
            counts.append(count.float())
        elif batch_stats:
            var, mean = torch.var_mean(t.detach().to(_acc(t.dtype)), dim=(0, 2, 3),
                                       correction=0)
            z = F.batch_norm(t, None, None, bn_weights[i], bn_biases[i], True, 0.0, block.eps[i])
        else:
            acc = _acc(t.dtype)
            mean = running_means[i].to(acc, copy=True)
            var = running_vars[i].to(acc, copy=True)
            z = F.batch_norm(t, running_means[i], running_vars[i], bn_weights[i], bn_biases[i],
                             False, 0.0, block.eps[i])
        means.append(mean)
        variances.append(var)
        return z

    n = len(block.convs)
    a0 = F.relu(norm(x)) if block.preact and block.entry_norm else x
    def gated(t: Tensor) -> Tensor:
        values = gate(t.to(_acc(t.dtype)).mean((2, 3)))
        return t * values.to(t.dtype).view(*values.shape, 1, 1)

    a, ys = a0, []
    for i in range(n - 1):
        ys.append(conv(a, i))
        a = F.relu(norm(ys[-1]))
        if gate is not None and gate_before_conv == i + 1:
            a = gated(a)
    ys.append(conv(a, n - 1))
    if block.preact:
        short = x if block.shortcut is None else conv(a0, n)
        out = ys[-1] + short
    else:
        last = norm(ys[-1])
        if gate is not None and gate_before_conv is None:
            last = gated(last)
        if branch_scale is not None:
            last = last * branch_scale.to(last.dtype).view(-1, 1, 1, 1)
        if block.shortcut is not None:
            ys.append(conv(x if shortcut_input is None else shortcut_input, n))
            short = norm(ys[-1])
        else:
            short = x
        out = F.relu(last + short)
    return out.contiguous(memory_format=CL), ys, means, variances
