"""Block-fused training on the Triton kernels: a residual block with no standalone BN pass inside.

Post-activation block (conv_1 .. conv_L, BatchNorms bn_1 .. bn_L, optional projection conv_s +
bn_s), forward::

    y_1, stats = conv(x)                                  # raw output + per-tile BN partials
    (scale_1, shift_1) = finalize(stats)                   # tiny pass over (tiles, K)
    y_i, stats = conv(y_{i-1}, in_scale=scale_{i-1}, ...)  # relu(bn(y)) applied while loading
    out = relu(y_L·scale_L + shift_L + y_s·scale_s + shift_s)   # (or + x): the one join pass

Saved: x, out, the raw y's, per-channel mean/var. Backward::

    Σg, Σgŷ (bn_L, and bn_s from the same g) = reductions(dout, y_L, out)   # the join pass
    dW_L = wgrad(dy_L formed at load, relu(bn_{L-1}(y_{L-1})) recomputed at load)
    g_{L-1}, sums = dgrad(dy_L, act=bn_{L-1} of y_{L-1})  # dReLU + dBN reductions in its epilogue
    ... down to conv_1, whose dgrad adds the shortcut's gradient (dres or dgrad_s) in its epilogue

Pre-activation block (entry bn_0 + ReLU on x, bn_1 .. bn_{L-1}, conv_L with no BN, projection on
the activated input): the entry statistics come from one stats pass over x (the previous block's
join output), every conv applies the BN + ReLU before it while loading, and conv_L adds the
shortcut in its epilogue, so the block writes its raw y's and its output only. Backward ends with
one pass ``dx = dBN_0(g_0) + dout`` (the join).

Inference (running statistics, nothing to save) needs none of this: each conv folds its BN (and
ReLU, and the shortcut add) into its epilogue, as the per-layer op does.

Post-activation extras: ``shortcut_input`` (the projection conv reads it instead of x, e.g. x
average-pooled in PyTorch for ResNet-D; its gradient comes back separately) and ``branch_scale``
((N,) fp32, stochastic depth: ``out = relu(bn_L(y_L)·scale[n] + shortcut)``), applied in the
join pass; backward's join pass then also stores the last BN's g (g·scale[n]) for the dy operand,
and a projection BN's sums take a pass of their own (its g is not scaled).

A channel gate (SE/ECA, :class:`~fastres.backends.base.ChannelGate`) is that branch scale per
(sample, channel): forward, ``pooled = scale_L·mean_hw(y_L) + shift_L`` (BN is a per-channel
affine) from one per-sample sums pass over y_L (an extra read of y_L; the last conv's epilogue
could write these partials), the gate's own graph in PyTorch, then the join pass with the (N, K)
scale gate·scale[n]. Backward, one per-sample sums pass over dout, out, y_L gives dgate =
scale[n]·Σ_hw dz·a; the gate's backward gives dpooled, and the join's reduction pass stores the
last BN's g = dz·gate·scale[n] + dpooled/HW (its sums taken of that g).

A gate between two convs (RegNetY's SE before conv c, ``ChannelGate.before_conv``) scales what
conv i reads: forward, ``pooled = mean_hw relu(bn_{i−1}(y_{i−1}))`` from one per-sample sums
pass over y_{i−1} (``bn.activation_sums``), the gate in PyTorch, then conv i's prologue reads
``relu(bn_{i−1}(y_{i−1}))·gate[n, c]`` (``in_gate``). Backward, wgrad re-forms that input the
same way; conv i's dgrad is taken raw (da_g, the gated input's gradient: its epilogue cannot
apply the gate's backward, which needs all of da_g first), one sums pass gives dgate = Σ_hw
da_g·a, the gate's backward dpooled, and one reduction pass forms bn_{i−1}'s g = (da_g·gate +
dpooled/HW)·[a > 0] with its sums (``bn.reductions(act_mask=)``).
"""

from __future__ import annotations

import torch

from .. import _alloc
from ..base import BlockParams, ChannelGate, OptTensor, Tensor
from . import bn, conv_bwd
from . import conv as _conv
from . import sync as _sync


class _Norms:
    """Per-BatchNorm parameters and the (mean, var, scale, shift) of this call, by index."""

    def __init__(self, gammas, betas, eps, group: str | None = None) -> None:
        self.gammas, self.betas = gammas, betas
        self.eps = eps
        # SyncBatchNorm: the c10d name of the process group every BN of the block syncs over
        self.group = group
        self.count: dict[int, Tensor] = {}  # with group: values per channel of the whole batch
        self.local_sums: dict[int, tuple] = {}  # with group: this process' (Σg, Σg·ŷ, δ)
        self.mean: dict[int, Tensor] = {}
        self.var: dict[int, Tensor] = {}
        self.scale: dict[int, Tensor] = {}
        self.shift: dict[int, Tensor] = {}

    def from_partials(self, i: int, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        if self.group is not None:  # the process group's statistics: one all_gather
            *stats, self.count[i] = _sync.finalize(count, mean, m2, self.gammas[i],
                                                   self.betas[i], self.eps[i], self.group)
            self._keep(i, *stats)
            return
        self._keep(i, *bn.finalize(count, mean, m2, self.gammas[i], self.betas[i], self.eps[i]))

    def exchange(self, i: int, sums: tuple, y: Tensor) -> tuple:
        """BN i's backward sums as its dy operand reads them: with a process group, this
        process' sums (over the values of ``y``, its input) are kept for dγ, dβ and the
        group's returned (one all_reduce); else ``sums`` itself."""
        if self.group is None:
            return sums
        dy_sums, self.local_sums[i] = _sync.synced_sums(
            sums, y.numel() // y.shape[1], self.var[i], self.eps[i], self.group)
        return dy_sums

    def from_stats(self, i: int, mean: Tensor, var: Tensor) -> None:
        """The affine map of given statistics (running ones in eval, saved ones in backward)."""
        self._keep(i, *bn.running_affine(mean, var, self.gammas[i], self.betas[i], self.eps[i]))

    def _keep(self, i: int, mean, var, scale, shift) -> None:
        self.mean[i], self.var[i], self.scale[i], self.shift[i] = mean, var, scale, shift

    def beta(self, i: int) -> Tensor:
        """bn_i's bias as (K,) fp32 (zeros without affine)."""
        beta = self.betas[i]
        return torch.zeros_like(self.mean[i]) if beta is None else beta.float()

    def affine(self, i: int | None, gate: OptTensor = None) -> dict[str, Tensor | None]:
        """Prologue arguments of a conv whose input is relu(bn_i(·)) (none for i None), times
        ``gate`` (N, C) per (sample, channel) if given."""
        if i is None:
            return {}
        gated = {} if gate is None else dict(in_gate=gate)
        return dict(in_scale=self.scale[i], in_shift=self.shift[i], **gated)

    def act(self, i: int, y: Tensor, batch_stats: bool) -> conv_bwd.ActInput:
        return conv_bwd.ActInput(y, self.scale[i], self.shift[i], self.mean[i], self.var[i],
                                 self.eps[i], batch_stats)

    def operand(self, i: int, dz: Tensor, z: OptTensor, y: Tensor, sums,
                batch_stats: bool) -> conv_bwd.DyOperand:
        return conv_bwd.DyOperand(dz, z, y, self.mean[i], self.var[i], self.gammas[i], sums,
                                  batch_stats, self.eps[i])


def block_forward(
    x: Tensor, weights, bn_weights, bn_biases, running_means, running_vars, *,
    block: BlockParams, batch_stats: bool, save_for_backward: bool,
    shortcut_input: OptTensor = None, branch_scale: OptTensor = None, group: str | None = None,
    gate: ChannelGate | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """``(out, saved, means, vars)``, and with ``group`` (SyncBatchNorm: every BN's statistics
    over that process group) a fifth, each BN's count over the group ((1,) fp32)."""
    norms = _Norms(bn_weights, bn_biases, block.eps, group)
    xs = x if shortcut_input is None else shortcut_input
    if not batch_stats:
        for i in range(block.num_norms):
            norms.from_stats(i, running_means[i], running_vars[i])
        if not save_for_backward and branch_scale is None and gate is None:
            out = _inference(x, weights, norms, block, xs)
            return out, [], _listed(norms.mean), _listed(norms.var)
    params = block.all_convs
    n = len(block.convs)

    def conv(inp: Tensor, i: int, prologue: int | None, norm: int | None,
             residual: OptTensor = None, in_gate: OptTensor = None) -> Tensor:
        """conv_i of ``inp`` (through bn_prologue + ReLU, times ``in_gate``); its statistics
        become bn_norm's."""
        stats = norm is not None and batch_stats
        y, p = _conv.conv2d_fused(inp, weights[i], None, params[i], stats=stats,
                                  residual=residual, **norms.affine(prologue, in_gate))
        if stats:
            norms.from_partials(norm, p.count, p.mean, p.m2)
        return y

    ys: list[Tensor] = []
    if block.preact:
        entry = 0 if block.entry_norm else None
        if entry is not None and batch_stats:
            norms.from_partials(0, *bn.batch_stats(x))
        first = int(block.entry_norm)  # index of bn_1
        inp, prologue = x, entry
        for i in range(n - 1):
            inp = conv(inp, i, prologue, first + i)
            ys.append(inp)
            prologue = first + i
        short = x if block.shortcut is None else conv(x, n, entry, None)
        out = conv(inp, n - 1, prologue, None, residual=short)
    else:
        mid = None if gate is None else gate.before_conv
        inp, prologue = x, None
        for i in range(n):
            in_gate = None if i != mid else _mid_gate(gate, inp, norms, prologue)
            inp = conv(inp, i, prologue, i, in_gate=in_gate)
            ys.append(inp)
            prologue = i
        last = n - 1
        if gate is not None and mid is None:
            branch_scale = _gated_scale(gate, ys[last], norms, last, branch_scale)
        if block.shortcut is None:
            out = bn.apply(ys[last], norms.scale[last], norms.shift[last], x, True,
                           branch_scale=branch_scale)
        else:
            ys.append(conv(xs, n, None, n))
            out = bn.apply(ys[last], norms.scale[last], norms.shift[last], ys[n], True,
                           res_scale=norms.scale[n], res_shift=norms.shift[n],
                           branch_scale=branch_scale)
    stats = _listed(norms.mean), _listed(norms.var)
    if group is not None:
        stats = (*stats, _listed(norms.count))
    return out, ys if save_for_backward else [], *stats


def _gated_scale(gate: ChannelGate, y: Tensor, norms: _Norms, i: int,
                 branch_scale: OptTensor) -> Tensor:
    """The join's (N, K) branch scale gate·branch_scale[n], the gate run on the spatial means
    of bn_i(y) = (y − mean)·scale + β: β + scale·Σ_hw (y − mean)/HW (centred: no cancellation
    where |mean| ≫ std)."""
    sum_d, _ = bn.sample_sums(y, norms.mean[i])
    hw = y.shape[2] * y.shape[3]
    pooled = (sum_d / hw) * norms.scale[i] + norms.beta(i)
    values = gate.forward(pooled)
    return values.contiguous() if branch_scale is None else values * branch_scale[:, None]


def _mid_gate(gate: ChannelGate, y: Tensor, norms: _Norms, i: int) -> Tensor:
    """The (N, C) gate a conv reading a = relu(bn_i(y)) multiplies it by: the gate run on a's
    spatial means."""
    sums = bn.activation_sums(y, norms.scale[i], norms.shift[i])
    return gate.forward(sums / (y.shape[2] * y.shape[3])).contiguous()


def _gate_backward(gate: ChannelGate, dout: Tensor, out: Tensor, y: Tensor, norms: _Norms,
                   i: int, branch_scale: OptTensor) -> dict[str, Tensor]:
    """The reductions' keywords for the last BN of a gated block: its (N, K) scale gate·
    branch_scale[n] and the additive dpooled/HW, dpooled from the gate's backward of dgate =
    branch_scale[n]·Σ_hw dz·a, a = bn_i(y) = (y − mean)·scale + β."""
    sum_gd, sum_g = bn.sample_sums(y, norms.mean[i], dout, out)
    dgate = sum_gd * norms.scale[i] + sum_g * norms.beta(i)
    values = gate.values
    if branch_scale is not None:
        dgate = dgate * branch_scale[:, None]
        values = values * branch_scale[:, None]
    dpooled = gate.backward(dgate)
    hw = y.shape[2] * y.shape[3]
    return dict(branch_scale=values.contiguous(), branch_add=(dpooled / hw).contiguous())


def _listed(d: dict[int, Tensor]) -> list[Tensor]:
    return [d[i] for i in sorted(d)]


def _inference(x: Tensor, weights, norms: _Norms, block: BlockParams, xs: Tensor) -> Tensor:
    """Running statistics, nothing saved: each BN (+ ReLU, + shortcut) folded into its conv."""
    params = block.all_convs
    n = len(block.convs)

    def conv(inp, i, prologue=None, norm=None, relu=True, residual=None):
        epilogue = {} if norm is None else dict(scale=norms.scale[norm], shift=norms.shift[norm])
        out, _ = _conv.conv2d_fused(inp, weights[i], None, params[i], residual=residual,
                                    relu=relu and norm is not None, **epilogue,
                                    **norms.affine(prologue))
        return out

    if block.preact:
        entry = 0 if block.entry_norm else None
        first = int(block.entry_norm)
        h = conv(x, 0, entry, first)
        for i in range(1, n - 1):
            h = conv(h, i, None, first + i)
        short = x if block.shortcut is None else conv(x, n, entry)
        return conv(h, n - 1, residual=short)
    h = x
    for i in range(n - 1):
        h = conv(h, i, norm=i)
    short = x if block.shortcut is None else conv(xs, n, norm=n, relu=False)
    return conv(h, n - 1, norm=n - 1, residual=short)


def _no_norm_operand(dz: Tensor) -> conv_bwd.DyOperand:
    """dy = dz for a conv with no BatchNorm after it (pre-activation conv_L and shortcut): the
    running-statistics form dy = γ·rsqrt(var + eps)·g with no γ, var = 1 and eps = 0."""
    ones = torch.ones(dz.shape[1], dtype=torch.float32, device=dz.device)
    return conv_bwd.DyOperand(dz, None, dz, ones, ones, None, None, False, 0.0)


def block_backward(
    dout: Tensor, x: Tensor, out: Tensor, weights, saved, means, variances, bn_weights,
    bn_biases, *, block: BlockParams, batch_stats: bool, output_mask,
    shortcut_input: OptTensor = None, branch_scale: OptTensor = None, group: str | None = None,
    gate: ChannelGate | None = None,
) -> tuple[OptTensor, list[OptTensor], list[OptTensor], list[OptTensor], OptTensor]:
    """``(dx, dweights, dbn_weights, dbn_biases, dshortcut_input)``; the last only with
    ``shortcut_input`` (then dx has no shortcut term) and ``need_dx``. With ``group``
    (SyncBatchNorm) each BN's sums are all-reduced as soon as they exist (:meth:`_Norms
    .exchange`); its dγ, dβ are this process' own."""
    n_w, n_bn = len(weights), len(bn_weights)
    need_dx, need_w = output_mask[0], output_mask[1:1 + n_w]
    norms = _Norms(bn_weights, bn_biases, block.eps, group)
    for i in range(n_bn):
        norms.from_stats(i, means[i], variances[i])
    sums: dict[int, tuple] = {}
    dws: list[OptTensor] = [None] * n_w
    params = block.all_convs
    n = len(block.convs)
    ys = saved

    def back(op, i: int, inp: Tensor, prologue: int | None, act: int | None = None,
             add: OptTensor = None, need_input: bool = True):
        """dW of conv_i (its input ``inp`` seen through bn_prologue + ReLU); returns its dgrad:
        with ``act`` (input = relu(bn_act(inp))) the next operand's g, its sums recorded."""
        if i == mid:
            return back_gated(op, i, inp, prologue)
        if need_w[i]:
            dws[i] = conv_bwd.wgrad(op, inp, weights[i], params[i],
                                    **_x_affine(norms.affine(prologue)))
        if not need_input:
            return None
        if act is None:
            return conv_bwd.dgrad(op, weights[i], params[i], inp.shape, add=add)
        g, sums[act] = conv_bwd.dgrad(op, weights[i], params[i], inp.shape, add=add,
                                      act=norms.act(act, inp, batch_stats))
        sums[act] = norms.exchange(act, sums[act], inp)
        return g

    def back_gated(op, i: int, y: Tensor, k: int) -> Tensor:
        """``back`` of conv_i reading a·gate, a = relu(bn_k(y)): dW through the gated prologue,
        then bn_k's g = (da_g·gate + dpooled/HW)·[a > 0] (da_g conv_i's raw dgrad, dpooled the
        gate's backward of Σ_hw da_g·a), its sums recorded."""
        values = gate.values
        if need_w[i]:
            dws[i] = conv_bwd.wgrad(op, y, weights[i], params[i],
                                    **_x_affine(norms.affine(k, values)))
        da = conv_bwd.dgrad(op, weights[i], params[i], y.shape)
        affine = (norms.scale[k], norms.shift[k])
        dpooled = gate.backward(bn.activation_sums(y, *affine, dz=da))
        g = _alloc.empty(*da.shape, dtype=da.dtype, device=da.device, channels_last=True)
        sums[k] = bn.reductions(
            da, y, None, norms.mean[k], norms.var[k], batch_stats=batch_stats, eps=block.eps[k],
            relu=False, branch_scale=values, g_branch=g,
            branch_add=(dpooled / (y.shape[2] * y.shape[3])).contiguous(), act_mask=affine)
        sums[k] = norms.exchange(k, sums[k], y)
        return g

    mid = None if gate is None else gate.before_conv
    end_gate = gate if mid is None else None
    dx = dxs = None
    if block.preact:
        entry = 0 if block.entry_norm else None
        first = int(block.entry_norm)
        op = _no_norm_operand(dout)
        for i in range(n - 1, 0, -1):
            k = first + i - 1  # bn after conv_i-1, before conv_i
            g = back(op, i, ys[i - 1], k, act=k)
            op = norms.operand(k, g, None, ys[i - 1], sums[k], batch_stats)
        short_grad = None
        if block.shortcut is not None:
            short_grad = back(_no_norm_operand(dout), n, x, entry,
                              need_input=need_dx or entry is not None)
        if entry is not None:
            g0 = back(op, 0, x, entry, act=0, add=short_grad)
            if need_dx:  # the join: dBN_0 of g_0, plus the identity shortcut's dout
                dx, _, _, _ = bn.backward(
                    g0, x, g0, norms.mean[0], norms.var[0], bn_weights[0],
                    batch_stats=batch_stats, eps=block.eps[0], relu=False, need_dy=True,
                    need_stats_grad=False, sums=sums[0],
                    add=dout if block.shortcut is None else None)
        elif need_dx or need_w[0]:
            add = dout if block.shortcut is None else short_grad
            dx = back(op, 0, x, None, add=add, need_input=need_dx)
    else:
        last = n - 1
        identity = block.shortcut is None
        new_like_dout = lambda: _alloc.empty(*dout.shape, dtype=dout.dtype, device=dout.device,
                                             channels_last=True)
        dres = new_like_dout() if identity and need_dx else None
        # drop path, gate: the last BN's g is g·scale[n(, k)] (+ the gate's dpooled/HW), stored
        # by the join pass for its dy operand
        g_last = None if branch_scale is None and end_gate is None else new_like_dout()
        def reduce(y: Tensor, i: int, **kw):
            return bn.reductions(dout, y, out, norms.mean[i], norms.var[i],
                                 batch_stats=batch_stats, eps=block.eps[i], relu=True, **kw)

        scaled = dict(branch_scale=branch_scale, g_branch=g_last)
        if end_gate is not None:
            scaled.update(_gate_backward(end_gate, dout, out, ys[last], norms, last,
                                         branch_scale))
        sums_s = None
        if identity:
            sums[last] = reduce(ys[last], last, dres=dres, **scaled)
        elif block.eps[n] == block.eps[last] and g_last is None:
            # both BNs' sums from one pass over dout, out
            sums[last], sums_s = reduce(ys[last], last, second=(ys[n], norms.mean[n],
                                                                norms.var[n]))
        else:
            sums[last], sums_s = reduce(ys[last], last, **scaled), reduce(ys[n], n)
        sums[last] = norms.exchange(last, sums[last], ys[last])
        if sums_s is not None:
            sums_s = norms.exchange(n, sums_s, ys[n])
        if g_last is None:
            op = norms.operand(last, dout, out, ys[last], sums[last], batch_stats)
        else:
            op = norms.operand(last, g_last, None, ys[last], sums[last], batch_stats)
        for i in range(last, 0, -1):
            g = back(op, i, ys[i - 1], i - 1, act=i - 1)
            op = norms.operand(i - 1, g, None, ys[i - 1], sums[i - 1], batch_stats)
        add = dres
        if not identity:
            sums[n] = sums_s
            op_s = norms.operand(n, dout, out, ys[n], sums_s, batch_stats)
            xs = x if shortcut_input is None else shortcut_input
            add = back(op_s, n, xs, None, need_input=need_dx)
            if shortcut_input is not None:  # its own gradient (the caller's pooling takes it)
                dxs, add = add, None
        dx = back(op, 0, x, None, add=add, need_input=need_dx)
    sums.update(norms.local_sums)  # dγ, dβ: this process' own sums
    dgs = [sums[i][1] if i in sums and m else None
           for i, m in enumerate(output_mask[1 + n_w:1 + n_w + n_bn])]
    dbs = [sums[i][0] if i in sums and m else None
           for i, m in enumerate(output_mask[1 + n_w + n_bn:])]
    return (dx if need_dx else None, [d if m else None for d, m in zip(dws, need_w)], dgs, dbs,
            dxs if need_dx else None)


def _x_affine(prologue: dict) -> dict:
    """conv2d_fused's prologue keywords as wgrad names them."""
    return {k.replace("in_", "x_"): v for k, v in prologue.items()}


__all__ = ["block_backward", "block_forward"]
