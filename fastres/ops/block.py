"""``residual_block``: a whole residual block as one autograd-aware op (block-fused training).

The per-layer op :func:`fastres.ops.conv_bn_relu` keeps, for backward, the input, the raw conv
output y and the activation z of every layer, and runs a BN-apply pass after every conv. The
residual block is the unit where that can be avoided (DESIGN.md §3, "Training fusion target"):
inside a block only raw conv outputs and per-channel statistics flow between the convs, each conv
applies the previous BN + ReLU while loading its input (zero padding *after* the activation),
and the block output is the one activation written. Backward forms each conv's dy while loading
it and takes the dReLU/dBN reductions of the layer below in the dgrad epilogue. What a backend
actually fuses is its business; the ``reference`` backend computes the same function in plain
PyTorch (the ground truth), a backend without block kernels does not serve blocks (the modules
then take the per-layer path, see :func:`block_backend`).

Structure (:class:`fastres.backends.base.BlockParams`): post-activation blocks (ResNet, ResNeXt,
Wide ResNet; with or without a projection shortcut) and pre-activation blocks (with or without
the entry BN + ReLU, with or without a projection on the activated input). Post-activation blocks
also take a ``shortcut_input`` for the projection conv (ResNet-D: x average-pooled by the caller,
one small PyTorch op whose autograd takes the gradient) and a per-sample ``branch_scale``
(stochastic depth, applied in the join pass; the caller draws it). Saved for backward:
the block input and (post-activation) output, which neighbouring blocks share, the raw outputs
of the convs, and per-channel statistics; never an inner activation.

Stack, top to bottom: :func:`residual_block` (validation, autocast, backend choice, running
statistics) → ``fastres::residual_block_fwd`` / ``_bwd`` custom ops (fake kernels, autograd) →
the backend's ``block_forward`` / ``block_backward``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .. import backends
from ..backends import BackendUnavailableError, CallInfo, ConvParams
from ..backends.base import BlockParams, ChannelGate
from ..backends.sync import group_name
from .conv_bn_relu import (
    FLOAT_DTYPES,
    _meta,
    _on_device_of,
    _pair,
    checked_once,
    update_running_stats,
)
from .direct import call_op

Tensor = torch.Tensor
CL = torch.channels_last
_PER_CONV = 7  # ints per convolution in the custom ops' flat conv list


class ConvArgs(NamedTuple):
    """One bias-free convolution of a block. (Named tuples: built for every block call, where a
    frozen dataclass costs ~2 µs each.)"""

    weight: Tensor
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1

    def params(self) -> ConvParams:
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"residual_block: groups must be a positive int, got {self.groups!r}")
        return ConvParams(_pair("stride", self.stride, 1), _pair("padding", self.padding, 0),
                          _pair("dilation", self.dilation, 1), self.groups)


class NormArgs(NamedTuple):
    """One BatchNorm of a block: parameters and buffers as ``F.batch_norm`` takes them."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    momentum: float | Tensor = 0.1
    eps: float = 1e-5


# ---------------------------------------------------------------------------------------------
# Structure and validation
# ---------------------------------------------------------------------------------------------


def _flat(convs: Sequence[ConvParams]) -> list[int]:
    return [v for p in convs for v in (*p.stride, *p.padding, *p.dilation, p.groups)]


def _unflat(flat: Sequence[int]) -> tuple[ConvParams, ...]:
    return tuple(
        ConvParams(tuple(flat[i:i + 2]), tuple(flat[i + 2:i + 4]), tuple(flat[i + 4:i + 6]),
                   flat[i + 6])
        for i in range(0, len(flat), _PER_CONV)
    )


def _block(conv_flat, shortcut: bool, preact: bool, entry_norm: bool, eps) -> BlockParams:
    """The block structure from the custom ops' flat arguments (kept: a model has a few)."""
    return _block_of(tuple(conv_flat), shortcut, preact, entry_norm, tuple(eps))


@functools.lru_cache(maxsize=1024)
def _block_of(conv_flat: tuple[int, ...], shortcut: bool, preact: bool, entry_norm: bool,
              eps: tuple[float, ...]) -> BlockParams:
    convs = _unflat(conv_flat)
    main = convs[:-1] if shortcut else convs
    return BlockParams(main, convs[-1] if shortcut else None, preact, entry_norm, tuple(eps))


def _norm_channels(block: BlockParams, x_channels: int, weights: Sequence[Tensor]) -> list[int]:
    """The number of channels each BatchNorm normalises, in BlockParams order."""
    main = [w.shape[0] for w in weights[:len(block.convs)]]
    if block.preact:
        return ([x_channels] if block.entry_norm else []) + main[:-1]
    return main + ([weights[-1].shape[0]] if block.shortcut is not None else [])


def _shapes(x_shape, weights: Sequence[Tensor], block: BlockParams, xs_shape=None):
    """Output shapes of conv_1 .. conv_L (and conv_s) for an input of ``x_shape`` (the
    shortcut conv's input of ``xs_shape``, default ``x_shape``)."""
    n, _, h, w = x_shape
    shapes = []
    c_h, c_w = h, w
    for p, wt in zip(block.convs, weights):
        c_h, c_w = p.out_hw(c_h, c_w, wt.shape[2], wt.shape[3])
        shapes.append((n, wt.shape[0], c_h, c_w))
    if block.shortcut is not None:
        wt = weights[-1]
        if xs_shape is not None:
            h, w = xs_shape[2], xs_shape[3]
        sh, sw = block.shortcut.out_hw(h, w, wt.shape[2], wt.shape[3])
        shapes.append((n, wt.shape[0], sh, sw))
    return shapes


def _validate(x: Tensor, weights: Sequence[Tensor], norms: Sequence[NormArgs],
              block: BlockParams, xs: Tensor | None = None) -> list[tuple[int, ...]]:
    def fail(msg: str, exc=ValueError):
        raise exc(f"residual_block: {msg}")

    if not isinstance(x, Tensor):
        fail(f"x must be a Tensor, got {type(x).__name__}", TypeError)
    if x.dtype not in FLOAT_DTYPES:
        fail(f"x has unsupported dtype {x.dtype}; expected float32, float16 or bfloat16",
             TypeError)
    if x.dim() != 4:
        fail(f"expected x of rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        fail(f"x is empty, shape {tuple(x.shape)}")
    if xs is not None:
        if block.shortcut is None or block.preact:
            fail("shortcut_input needs a post-activation block with a projection shortcut")
        if not isinstance(xs, Tensor) or xs.dim() != 4 or xs.numel() == 0:
            fail("shortcut_input must be a non-empty 4-d Tensor (N, C, H, W)", TypeError)
        if xs.dtype != x.dtype or xs.device != x.device:
            fail(f"shortcut_input ({xs.dtype}, {xs.device}) must match x ({x.dtype}, "
                 f"{x.device})", TypeError)
        if xs.shape[0] != x.shape[0]:
            fail(f"shortcut_input has batch {xs.shape[0]} but x has {x.shape[0]}")
    if len(block.convs) < 2:
        fail(f"a block has at least 2 convolutions on its main branch, got {len(block.convs)}")
    channels = x.shape[1]
    for i, (p, w) in enumerate(zip(block.all_convs, weights)):
        name = "shortcut conv" if i == len(block.convs) else f"conv{i + 1}"
        if not isinstance(w, Tensor) or w.dim() != 4:
            fail(f"{name} weight must be a 4-d Tensor (K, C/groups, R, S)")
        if w.dtype != x.dtype:
            fail(f"{name} weight dtype {w.dtype} does not match x dtype {x.dtype}", TypeError)
        if w.device != x.device:
            fail(f"{name} weight is on {w.device} but x is on {x.device}")
        c_in = (x if xs is None else xs).shape[1] if i == len(block.convs) else channels
        if c_in % p.groups or w.shape[0] % p.groups:
            fail(f"{name}: groups={p.groups} must divide its input ({c_in}) and output "
                 f"({w.shape[0]}) channels")
        if w.shape[1] * p.groups != c_in:
            fail(f"{name}: channel mismatch: its input has {c_in} channels but weight "
                 f"{tuple(w.shape)} with groups={p.groups} expects {w.shape[1] * p.groups}")
        if i < len(block.convs):
            channels = w.shape[0]
    shapes = _shapes(x.shape, weights, block, None if xs is None else xs.shape)
    for i, s in enumerate(shapes):
        if s[2] <= 0 or s[3] <= 0:
            fail(f"conv{i + 1} output would be empty ({s[2]}x{s[3]})")
    main_out = shapes[len(block.convs) - 1]
    short = shapes[-1] if block.shortcut is not None else tuple(x.shape)
    if tuple(short) != tuple(main_out):
        fail(f"the shortcut has shape {tuple(short)} but the main branch gives {main_out} "
             "(an identity shortcut needs equal shapes; use a projection)")
    if len(norms) != block.num_norms:
        fail(f"expected {block.num_norms} BatchNorms for this structure, got {len(norms)}")
    for i, (nrm, k) in enumerate(zip(norms, _norm_channels(block, x.shape[1], weights))):
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(nrm, name)
            if t is None:
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                fail(f"BatchNorm {i} {name} must be a float Tensor or None", TypeError)
            if tuple(t.shape) != (k,):
                fail(f"BatchNorm {i} {name} must have shape ({k},), got {tuple(t.shape)}")
            if t.device != x.device:
                fail(f"BatchNorm {i} {name} is on {t.device} but x is on {x.device}")
        if (nrm.running_mean is None) != (nrm.running_var is None):
            fail(f"BatchNorm {i}: pass both running_mean and running_var, or neither")
    return shapes


def _call_info(x: Tensor, weight: Tensor, conv: ConvParams, batch_stats: bool) -> CallInfo:
    return CallInfo(device=x.device, dtype=x.dtype, x_shape=tuple(x.shape),
                    weight_shape=tuple(weight.shape), conv=conv, batch_stats=batch_stats,
                    has_residual=True, act="relu")


def block_backend(x: Tensor, weight: Tensor, conv: ConvParams, *, training: bool,
                  backend: str | None = None) -> tuple[str | None, str | None]:
    """``(name, None)``: the backend that serves a block whose first conv is ``conv`` with
    ``weight`` on ``x``; ``(None, reason)`` if the backend in force has no block kernels (the
    caller then runs the block layer by layer). Raises like :func:`fastres.ops.conv_bn_relu`
    when the backend asked for cannot serve the call at all."""
    return _block_backend(_call_info(x, weight, conv, training), backend)


def _block_backend(call: CallInfo, backend: str | None) -> tuple[str | None, str | None]:
    name = backends.select(call, backend)
    impl = backends.load(name)
    if not hasattr(impl, "block_forward"):
        return None, f"the {name} backend has no block kernels (blocks run layer by layer)"
    return name, None


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _fwd_impl(
    x: Tensor,
    weights: list[Tensor],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    running_means: list[Tensor | None],
    running_vars: list[Tensor | None],
    convs: list[int],
    shortcut: bool,
    preact: bool,
    entry_norm: bool,
    eps: list[float],
    batch_stats: bool,
    save_for_backward: bool,
    backend: str,
    shortcut_input: Tensor | None,
    branch_scale: Tensor | None,
    group: str | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Returns ``(out, saved, means, vars, counts)``: ``saved`` the raw conv outputs backward
    reads (see ``_saved_convs``), ``means``/``vars`` fp32 per BatchNorm (biased batch variance,
    or copies of the running statistics). ``shortcut_input``: the projection conv's input
    (None: x); ``branch_scale``: (N,) fp32 per-sample scale of the residual branch (None:
    none). ``group``: the c10d name of the process group every BatchNorm of the block takes its
    batch statistics over (SyncBatchNorm, :mod:`fastres.backends.sync`); ``counts`` then holds
    each BatchNorm's number of values per channel over the group, (1,) fp32 (else empty)."""
    return _forward(x, weights, bn_weights, bn_biases, running_means, running_vars, convs,
                    shortcut, preact, entry_norm, eps, batch_stats, save_for_backward, backend,
                    shortcut_input, branch_scale, group, None)


def _forward(x, weights, bn_weights, bn_biases, running_means, running_vars, convs, shortcut,
             preact, entry_norm, eps, batch_stats, save_for_backward, backend, shortcut_input,
             branch_scale, group: str | None, gate: ChannelGate | None):
    """``_fwd_impl`` with a channel gate (eager calls only: a gate is Python code)."""
    impl = backends.load(backend)
    backends.record("forward", impl.name, batch_stats=batch_stats,
                    inference=not save_for_backward, op="residual_block")
    block = _block(convs, shortcut, preact, entry_norm, eps)
    sync = {} if group is None else {"group": group}  # backends without SyncBN never see it
    with _on_device_of(x):
        out = impl.block_forward(
            x, weights, bn_weights, bn_biases, running_means, running_vars, block=block,
            batch_stats=batch_stats, save_for_backward=save_for_backward,
            shortcut_input=shortcut_input, branch_scale=branch_scale, **sync,
            **({} if gate is None else dict(gate=gate)),
        )
    return out if group is not None else (*out, [])


residual_block_fwd = torch.library.custom_op(
    "fastres::residual_block_fwd", _fwd_impl, mutates_args=()
)


def _saved_convs(block: BlockParams) -> list[int]:
    """Indices (into conv_1 .. conv_L, conv_s) of the raw outputs saved for backward: every conv
    output that a BatchNorm reads (post-activation: all; pre-activation: all but the last)."""
    n = len(block.convs)
    if block.preact:
        return list(range(n - 1))
    return list(range(n + int(block.shortcut is not None)))


@residual_block_fwd.register_fake
def _(x, weights, bn_weights, bn_biases, running_means, running_vars, convs, shortcut, preact,
      entry_norm, eps, batch_stats, save_for_backward, backend, shortcut_input, branch_scale,
      group=None):
    block = _block(convs, shortcut, preact, entry_norm, eps)
    shapes = _shapes(x.shape, weights, block,
                     None if shortcut_input is None else shortcut_input.shape)
    new = lambda s: torch.empty(s, dtype=x.dtype, device=x.device, memory_format=CL)
    out = new(shapes[len(block.convs) - 1])
    saved = [new(shapes[i]) for i in _saved_convs(block)] if save_for_backward else []
    ks = _norm_channels(block, x.shape[1], weights)
    stat = lambda k: x.new_empty((k,), dtype=torch.float32)
    counts = [] if group is None else [stat(1) for _ in ks]
    return out, saved, [stat(k) for k in ks], [stat(k) for k in ks], counts


def _bwd_impl(
    dout: Tensor,
    x: Tensor,
    out: Tensor,
    weights: list[Tensor],
    saved: list[Tensor],
    means: list[Tensor],
    variances: list[Tensor],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    convs: list[int],
    shortcut: bool,
    preact: bool,
    entry_norm: bool,
    eps: list[float],
    batch_stats: bool,
    output_mask: list[bool],
    backend: str,
    shortcut_input: Tensor | None,
    branch_scale: Tensor | None,
    group: str | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Returns ``(dx, dweights, dbn_weights, dbn_biases, dshortcut_input)`` (fp32 BN grads),
    empty tensors where ``output_mask`` (x — and shortcut_input with it —, each weight, each BN
    weight, each BN bias) is False or there is no shortcut_input. With ``group`` (SyncBatchNorm)
    the BN backward takes the group's sums; the BN parameters' gradients are this process'."""
    return _backward_call(dout, x, out, weights, saved, means, variances, bn_weights, bn_biases,
                          convs, shortcut, preact, entry_norm, eps, batch_stats, output_mask,
                          backend, shortcut_input, branch_scale, group, None)


def _backward_call(dout, x, out, weights, saved, means, variances, bn_weights, bn_biases, convs,
                   shortcut, preact, entry_norm, eps, batch_stats, output_mask, backend,
                   shortcut_input, branch_scale, group: str | None, gate: ChannelGate | None):
    """``_bwd_impl`` with a channel gate (eager calls only: a gate is Python code)."""
    impl = backends.load(backend)
    backends.record("backward", impl.name, batch_stats=batch_stats, inference=False,
                    op="residual_block")
    block = _block(convs, shortcut, preact, entry_norm, eps)
    sync = {} if group is None else {"group": group}
    with _on_device_of(dout):
        dx, dws, dgs, dbs, dxs = impl.block_backward(
            dout, x, out, weights, saved, means, variances, bn_weights, bn_biases,
            block=block, batch_stats=batch_stats, output_mask=tuple(output_mask),
            shortcut_input=shortcut_input, branch_scale=branch_scale, **sync,
            **({} if gate is None else dict(gate=gate)),
        )
    empty = dout.new_empty(0)
    fresh = lambda t, like: empty if t is None else _strided_like(t, like)
    return (
        fresh(dx, x),
        [fresh(t, w) for t, w in zip(dws, weights)],
        [empty if t is None else t for t in dgs],
        [empty if t is None else t for t in dbs],
        empty if dxs is None else _strided_like(dxs, shortcut_input),
    )


def _strided_like(t: Tensor, like: Tensor) -> Tensor:
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


residual_block_bwd = torch.library.custom_op(
    "fastres::residual_block_bwd", _bwd_impl, mutates_args=()
)


def _masks(output_mask, n_w: int, n_bn: int):
    return output_mask[0], output_mask[1:1 + n_w], output_mask[1 + n_w:1 + n_w + n_bn], \
        output_mask[1 + n_w + n_bn:]


@residual_block_bwd.register_fake
def _(dout, x, out, weights, saved, means, variances, bn_weights, bn_biases, convs, shortcut,
      preact, entry_norm, eps, batch_stats, output_mask, backend, shortcut_input, branch_scale,
      group=None):
    m_x, m_w, m_g, m_b = _masks(output_mask, len(weights), len(means))
    empty = lambda: dout.new_empty(0)
    return (
        torch.empty_like(x) if m_x else empty(),
        [torch.empty_like(w) if m else empty() for w, m in zip(weights, m_w)],
        [torch.empty_like(mu) if m else empty() for mu, m in zip(means, m_g)],
        [torch.empty_like(mu) if m else empty() for mu, m in zip(means, m_b)],
        torch.empty_like(shortcut_input) if m_x and shortcut_input is not None else empty(),
    )


def _setup_context(ctx, inputs, output):
    (x, weights, bn_weights, bn_biases, _, _, convs, shortcut, preact, entry_norm, eps,
     batch_stats, _, backend, shortcut_input, branch_scale, group) = inputs
    out, saved, means, variances, _ = output
    n_w, n_bn = len(weights), len(bn_weights)
    # the output is saved only where backward reads it (the final ReLU's mask)
    ctx.save_for_backward(x, None if preact else out, shortcut_input, branch_scale, *weights,
                          *saved, *means, *variances, *bn_weights, *bn_biases)
    ctx.sizes = (n_w, len(saved), n_bn)
    ctx.args = (list(convs), shortcut, preact, entry_norm, list(eps), batch_stats)
    ctx.backend, ctx.group = backend, group
    ctx.bn_dtypes = [None if t is None else t.dtype for t in (*bn_weights, *bn_biases)]


def _grads(ctx, dout: Tensor, mask: list[bool], gate: ChannelGate | None = None):
    """``(dx, dweights, dbn_weights, dbn_biases, dshortcut_input)`` for ``mask`` (x and
    shortcut_input, each weight, each BN weight, each BN bias), None where not asked; BN grads
    in their parameters' dtypes. With ``gate`` the backend is called directly (its backward
    runs the gate's)."""
    n_w, n_saved, n_bn = ctx.sizes
    x, out, xs, branch_scale, *rest = ctx.saved_tensors
    weights, rest = rest[:n_w], rest[n_w:]
    saved, rest = rest[:n_saved], rest[n_saved:]
    means, variances, rest = rest[:n_bn], rest[n_bn:2 * n_bn], rest[2 * n_bn:]
    bn_weights, bn_biases = rest[:n_bn], rest[n_bn:]
    m_x, m_w, m_g, m_b = _masks(mask, n_w, n_bn)
    if dout is None or not any(mask):
        return None, [None] * n_w, [None] * n_bn, [None] * n_bn, None
    dout = dout.contiguous(memory_format=CL)
    if out is None:
        out = dout.new_empty(0)
    args = (dout, x, out, list(weights), list(saved), list(means), list(variances),
            list(bn_weights), list(bn_biases), *ctx.args, mask, ctx.backend, xs, branch_scale,
            ctx.group)
    tensors = (dout, x, out, xs, branch_scale, *weights, *saved, *means, *variances,
               *bn_weights, *bn_biases)
    if gate is None:
        dx, dws, dgs, dbs, dxs = call_op(residual_block_bwd, _bwd_impl, args, tensors)
    else:
        dx, dws, dgs, dbs, dxs = _backward_call(*args, gate)
    dts = ctx.bn_dtypes
    return (
        dx if m_x else None,
        [d if m else None for d, m in zip(dws, m_w)],
        [d.to(dts[i]) if m else None for i, (d, m) in enumerate(zip(dgs, m_g))],
        [d.to(dts[n_bn + i]) if m else None for i, (d, m) in enumerate(zip(dbs, m_b))],
        dxs if m_x and xs is not None else None,
    )


def _backward(ctx, dout, dsaved_unused, dmeans_unused, dvars_unused, dcounts_unused):
    n_w, _, n_bn = ctx.sizes
    _, _, _, _, *rest = ctx.saved_tensors
    weights, bn_params = rest[:n_w], rest[len(rest) - 2 * n_bn:]
    needs = ctx.needs_input_grad  # x, weights, bn_weights, bn_biases, ... (one flag per list)
    mask = [needs[0] or needs[14]] + [needs[1] and w.requires_grad for w in weights]
    mask += [needs[2 + i // n_bn] and t is not None and t.requires_grad
             for i, t in enumerate(bn_params)]
    dx, dws, dgs, dbs, dxs = _grads(ctx, dout, mask)
    # the running statistics, the branch scale and the non-tensor arguments get no gradient
    return dx, dws, dgs, dbs, [None] * n_bn, [None] * n_bn, *(None,) * 8, dxs, None, None


residual_block_fwd.register_autograd(_backward, setup_context=_setup_context)


def _function_outputs(ctx, inputs, output) -> tuple[Tensor, ...]:
    """What the block op's ``autograd.Function`` returns for the custom op's ``output``: the
    block output, then the statistics (no gradient); ``ctx`` set up for backward."""
    _setup_context(ctx, inputs, output)
    out, _, means, variances, counts = output
    ctx.mark_non_differentiable(*means, *variances, *counts)
    ctx.set_materialize_grads(False)
    return (out, *means, *variances, *counts)


class _BlockFunction(torch.autograd.Function):
    """The block op with the autograd formula registered above, for eager calls (as
    ``conv_bn_relu``'s ``_ConvBNReLUFunction``: ``register_autograd``'s wrapper re-fills the
    schema's defaults and walks the list arguments with pytree on every call, ~100 µs of host
    time a block). ``autograd.Function`` tracks only tensors passed directly, so the weights and
    BN parameters travel flattened after ``x``; ``rest`` holds the other arguments. The op
    itself runs through the dispatcher where anything would see it (:mod:`fastres.ops.direct`);
    under ``torch.compile`` the registered autograd serves."""

    @staticmethod
    def forward(ctx, rest, x, xs, *params):
        n_w = len(params) - 2 * len(rest[0])
        n_bn = len(rest[0])
        branch_scale, group = rest[-2:]
        inputs = (x, list(params[:n_w]), list(params[n_w:n_w + n_bn]),
                  list(params[n_w + n_bn:]), *rest[:-2], xs, branch_scale, group)
        output = call_op(residual_block_fwd, _fwd_impl, inputs, (x, xs, branch_scale, *params))
        return _function_outputs(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, *unused):
        needs = ctx.needs_input_grad
        dx, dws, dgs, dbs, dxs = _grads(ctx, dout, [needs[1] or needs[2], *needs[3:]])
        return None, dx if needs[1] else None, dxs, *dws, *dgs, *dbs


class _GateCall:
    """The :class:`~fastres.backends.base.ChannelGate` of one gated block call: the caller's
    ``gate`` (pooled (N, K, 1, 1) in x's dtype, as eager's ``a.mean((2, 3), keepdim=True)`` →
    gate (N, K, 1, 1) or (N, K)) run under autograd on a detached leaf in forward, and
    ``torch.autograd.grad`` through that small graph in backward, which also gives the gate's
    parameter grads (:attr:`param_grads`). The graph is kept (retained) as long as the block's
    autograd node, so that a second backward (``retain_graph=True``) can run it again: it is
    N·K-sized, and PyTorch refuses a second backward without retain_graph before reaching it."""

    def __init__(self, fn: Callable[[Tensor], Tensor], params: Sequence[Tensor],
                 dtype: torch.dtype, record: bool, before_conv: int | None = None) -> None:
        self.fn, self.params, self.dtype, self.record = fn, list(params), dtype, record
        self.before_conv = before_conv
        self.values: Tensor | None = None
        self.param_grads: list[Tensor | None] = [None] * len(self.params)
        self._leaf: Tensor | None = None
        self._out: Tensor | None = None

    def forward(self, pooled: Tensor) -> Tensor:
        n, k = pooled.shape
        with torch.set_grad_enabled(self.record):
            leaf = pooled.detach().to(self.dtype).view(n, k, 1, 1).requires_grad_(self.record)
            out = self.fn(leaf)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(f"residual_block: the gate must return a float Tensor, got "
                            f"{type(out).__name__ if not isinstance(out, Tensor) else out.dtype}")
        if tuple(out.shape) not in ((n, k, 1, 1), (n, k)):
            raise ValueError(f"residual_block: the gate must return shape ({n}, {k}, 1, 1) or "
                             f"({n}, {k}) (one value per sample and channel), got "
                             f"{tuple(out.shape)}")
        self._leaf, self._out = leaf, out
        self.values = out.detach().reshape(n, k).to(pooled.dtype)
        return self.values

    def backward(self, dgate: Tensor) -> Tensor:
        assert self._out is not None and self.record, "the gate's forward recorded no graph"
        if not self._out.requires_grad:  # a constant gate: nothing flows back through it
            return torch.zeros_like(dgate)
        wanted = [i for i, p in enumerate(self.params) if p.requires_grad]
        grads = torch.autograd.grad(
            self._out, [self._leaf, *(self.params[i] for i in wanted)],
            dgate.reshape(self._out.shape).to(self._out.dtype), allow_unused=True,
            retain_graph=True)
        for i, g in zip(wanted, grads[1:]):
            self.param_grads[i] = g
        dpooled = grads[0]
        if dpooled is None:  # a gate that ignores its input
            return torch.zeros_like(dgate)
        return dpooled.reshape(dgate.shape).to(dgate.dtype)


class _GatedBlockFunction(torch.autograd.Function):
    """The block op with a channel gate: as :class:`_BlockFunction`, with the gate's
    parameters after the BN parameters and the backend called directly (a gate is a Python
    callable, which the custom ops cannot carry: gated calls are eager only)."""

    @staticmethod
    def forward(ctx, rest, x, xs, *params):
        *rest, branch_scale, group, gate = rest
        n_bn, n_gate = len(rest[0]), len(gate.params)
        n_w = len(params) - 2 * n_bn - n_gate
        inputs = (x, list(params[:n_w]), list(params[n_w:n_w + n_bn]),
                  list(params[n_w + n_bn:n_w + 2 * n_bn]), *rest, xs, branch_scale, group)
        output = _forward(*inputs, gate)
        ctx.gate = gate
        return _function_outputs(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, *unused):
        needs = ctx.needs_input_grad
        gate = ctx.gate
        n_gate = len(gate.params)
        mask = [needs[1] or needs[2], *needs[3:len(needs) - n_gate]]
        if dout is not None and not any(mask):
            mask[0] = True  # the gate's parameters need the pass even when nothing else does
        dx, dws, dgs, dbs, dxs = _grads(ctx, dout, mask, gate=gate)
        grads = gate.param_grads if dout is not None else [None] * n_gate
        return (None, dx if needs[1] else None, dxs if needs[2] else None, *dws, *dgs, *dbs,
                *(g if needs[len(needs) - n_gate + i] else None for i, g in enumerate(grads)))


# ---------------------------------------------------------------------------------------------
# Public functional op
# ---------------------------------------------------------------------------------------------


def residual_block(
    x: Tensor,
    convs: Sequence[ConvArgs],
    norms: Sequence[NormArgs],
    *,
    shortcut: ConvArgs | None = None,
    preact: bool = False,
    entry_norm: bool = False,
    training: bool,
    backend: str | None = None,
    shortcut_input: Tensor | None = None,
    branch_scale: Tensor | None = None,
    process_group: object | None = None,
    gate: Callable[[Tensor], Tensor] | None = None,
    gate_params: Sequence[Tensor] = (),
    gate_before_conv: int | None = None,
) -> Tensor:
    """A residual block as one fused op; same function as the eager block (see
    :class:`fastres.backends.base.BlockParams` for the two structures and the order of
    ``norms``). In training the BatchNorms' running statistics are updated in place (unbiased
    variance, each with its own momentum), as ``nn.BatchNorm2d`` does; in eval they normalise
    (every BatchNorm needs them then). Returns a channels_last tensor in x's dtype.

    Post-activation blocks only:

    - ``shortcut_input``: what the projection conv (``shortcut``) reads instead of x, e.g.
      ResNet-D's ``F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)`` computed by
      the caller; its gradient flows back to it (through the caller's pooling autograd).
    - ``branch_scale``: (N,) or (N, 1, 1, 1) per-sample scale of the residual branch, applied in
      the join pass, ``out = relu(bn_L(y_L)·branch_scale[n] + shortcut)``: stochastic depth, the
      caller's draw (see :func:`fastres.nn.blocks.drop_path_scale`). A constant (no gradient);
      training only (drop path is the identity in eval: pass None).
    - ``gate``: a channel gate (SE, ECA) before the drop path and the add, ``out =
      relu(a·gate(pooled)·branch_scale[n] + shortcut)`` with a = bn_L(y_L) and ``pooled =
      a.mean((2, 3), keepdim=True)`` (N, K, 1, 1) in x's dtype; ``gate`` returns (N, K, 1, 1)
      or (N, K) and runs in PyTorch autograd (forward once; backward through
      ``torch.autograd.grad``); ``gate_params``: the tensors it uses that take gradients (the
      gate module's parameters), which get them like any other input. Eager only: under
      ``torch.compile`` a gated call raises (fastres's blocks then run layer by layer).
    - ``gate_before_conv``: i (1 ≤ i < len(convs)) puts the gate between two convs instead
      (RegNetY's SE before conv c): conv i reads ``a·gate(a.mean((2, 3), keepdim=True))`` with
      ``a = relu(bn(y))`` of conv i − 1; the join is then ``relu(bn_L(y_L)·branch_scale[n] +
      shortcut)``. None (default): the gate before the add, as above.

    ``process_group`` (a ``torch.distributed`` process group or its c10d name; training only):
    every BatchNorm of the block is ``nn.SyncBatchNorm`` over that group, as in
    :func:`fastres.ops.conv_bn_relu`: one all_gather per BatchNorm forward, one all_reduce per
    BatchNorm backward, running statistics from the whole batch; triton and reference backends.

    Raises :class:`BackendUnavailableError` if the backend in force has no block kernels (see
    :func:`block_backend`; fastres's modules check first and run layer by layer instead).
    """
    all_convs = [*convs, *([shortcut] if shortcut is not None else [])]
    norms = list(norms)
    weights = [c.weight for c in all_convs]
    xs = shortcut_input
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype) if x.is_floating_point() else x
        xs = xs.to(dtype) if isinstance(xs, Tensor) and xs.is_floating_point() else xs
        weights = [w.to(dtype) for w in weights]
    batch_stats = bool(training)
    if branch_scale is not None:
        branch_scale = _branch_scale(branch_scale, x, preact, batch_stats)
    gate_params = list(gate_params)
    if gate is not None:
        _check_gate(gate, gate_params, preact, gate_before_conv, len(convs))
    elif gate_before_conv is not None:
        raise ValueError("residual_block: gate_before_conv without a gate")
    block, bessel, flat, call = checked_once(
        _checked_blocks,
        lambda: (
            _meta(x), tuple(map(_meta, weights)),
            tuple((c.stride, c.padding, c.dilation, c.groups) for c in all_convs),
            tuple((_meta(n.weight), _meta(n.bias), _meta(n.running_mean), _meta(n.running_var),
                   float(n.eps)) for n in norms),
            shortcut is not None, bool(preact), bool(entry_norm), batch_stats, _meta(xs),
        ),
        lambda: _check_block(x, weights, all_convs, norms, shortcut is not None, preact,
                             entry_norm, batch_stats, xs),
    )
    group = None
    if batch_stats and process_group is not None:
        group = process_group if isinstance(process_group, str) else group_name(process_group)
        call = dataclasses.replace(call, sync=True)
    name, why = _block_backend(call, backend)
    if name is None:
        raise BackendUnavailableError(f"residual_block: {why}")
    x = x.contiguous(memory_format=CL)
    if xs is not None:
        xs = xs.contiguous(memory_format=CL)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, xs, *weights, *(n.weight for n in norms), *(n.bias for n in norms),
                  *gate_params)
    )
    gammas, betas = [n.weight for n in norms], [n.bias for n in norms]
    rest = ([n.running_mean for n in norms], [n.running_var for n in norms],
            flat, shortcut is not None, block.preact, block.entry_norm,
            list(block.eps), batch_stats, save, name)
    if gate is not None:
        call_gate = _GateCall(gate, gate_params, x.dtype, save, gate_before_conv)
        out, *stats = _GatedBlockFunction.apply((*rest, branch_scale, group, call_gate), x, xs,
                                                *weights, *gammas, *betas, *gate_params)
    elif save and not torch.compiler.is_compiling():
        out, *stats = _BlockFunction.apply((*rest, branch_scale, group), x, xs, *weights,
                                           *gammas, *betas)
    if gate is not None or (save and not torch.compiler.is_compiling()):
        n_bn = len(norms)
        means, variances, counts = stats[:n_bn], stats[n_bn:2 * n_bn], stats[2 * n_bn:]
    else:
        args = (x, weights, gammas, betas, *rest, xs, branch_scale, group)
        out, _, means, variances, counts = call_op(
            residual_block_fwd, _fwd_impl, args, (x, xs, branch_scale, *weights, *gammas, *betas))
    if batch_stats:
        tracked = [i for i, n in enumerate(norms) if n.running_mean is not None]
        if group is not None:  # Bessel's factor of the group's whole batch, kept on the device
            bessel = [c / (c - 1) for c in counts]
        if tracked:
            unbiased = torch._foreach_mul([variances[i] for i in tracked],
                                          [bessel[i] for i in tracked])
            update_running_stats([norms[i].running_mean for i in tracked],
                                 [norms[i].running_var for i in tracked],
                                 [means[i] for i in tracked], unbiased,
                                 [norms[i].momentum for i in tracked])
    return out


_CheckedBlock = tuple[BlockParams, list[float], tuple[int, ...], CallInfo]
_checked_blocks: dict[tuple, _CheckedBlock] = {}


def _branch_scale(scale, x: Tensor, preact: bool, batch_stats: bool) -> Tensor:
    """The per-sample branch scale as the kernels take it: (N,) fp32 contiguous (fp64 for fp64
    blocks, which the reference backend computes in fp64: a drop path's 1/keep is not an fp32
    value)."""
    def fail(msg: str, exc=ValueError):
        raise exc(f"residual_block: branch_scale {msg}")

    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        fail("must be a float Tensor", TypeError)
    if preact:
        fail("is supported on post-activation blocks only")
    if not batch_stats:
        fail("is for training (drop path is the identity in eval: pass None)")
    if scale.requires_grad:
        fail("is a constant (a drop-path draw) and takes no gradient; detach it")
    n = x.shape[0]
    if tuple(scale.shape) not in ((n,), (n, 1, 1, 1)):
        fail(f"must have shape ({n},) or ({n}, 1, 1, 1), got {tuple(scale.shape)}")
    if scale.device != x.device:
        fail(f"is on {scale.device} but x is on {x.device}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return scale.reshape(n).to(dtype).contiguous()


def _check_gate(gate, gate_params: list, preact: bool, before_conv: int | None,
                num_convs: int) -> None:
    def fail(msg: str, exc=ValueError):
        raise exc(f"residual_block: {msg}")

    if before_conv is not None and (type(before_conv) is not int
                                    or not 1 <= before_conv < num_convs):
        fail(f"gate_before_conv must be an int in [1, {num_convs - 1}] (the index of the conv "
             f"whose input the gate scales), got {before_conv!r}")

    if not callable(gate):
        fail(f"gate must be callable (pooled -> gate), got {type(gate).__name__}", TypeError)
    if preact:
        fail("a gate is supported on post-activation blocks only")
    if torch.compiler.is_compiling():
        fail("a gated block is eager only (the gate is a Python callable the custom op cannot "
             "carry); under torch.compile run the block layer by layer", RuntimeError)
    if not all(isinstance(p, Tensor) for p in gate_params):
        fail("gate_params must be Tensors (the gate's parameters)", TypeError)


def _check_block(x, weights, all_convs, norms, has_shortcut: bool, preact: bool,
                 entry_norm: bool, batch_stats: bool, xs: Tensor | None = None) -> _CheckedBlock:
    """``(block, Bessel factor count/(count − 1) of each BatchNorm, flat conv parameters,
    conv_1's call)``, kept per call signature by :func:`residual_block`; raises on bad input."""
    params = [c.params() for c in all_convs]
    n_main = len(params) - has_shortcut
    block = BlockParams(tuple(params[:n_main]), params[n_main] if has_shortcut else None,
                        bool(preact), bool(entry_norm and preact),
                        tuple(float(n.eps) for n in norms))
    shapes = _validate(x, weights, norms, block, xs)
    if not batch_stats and any(n.running_mean is None for n in norms):
        raise ValueError("residual_block: eval mode needs every BatchNorm's running statistics "
                         "(blocks with track_running_stats=False run layer by layer)")
    counts = _norm_counts(x.shape, shapes, block)
    if batch_stats and min(counts) == 1:
        raise ValueError("residual_block: expected more than 1 value per channel when using "
                         "batch statistics")
    call = _call_info(x, weights[0], block.convs[0], batch_stats)
    bessel = [c / max(c - 1, 1) for c in counts]  # eval may see one value (then unused)
    return block, bessel, tuple(_flat(block.all_convs)), call


def _norm_counts(x_shape, shapes, block: BlockParams) -> list[int]:
    """Values per channel each BatchNorm normalises (N·H·W of its input), in BlockParams order."""
    per = [s[0] * s[2] * s[3] for s in shapes]
    n_main = len(block.convs)
    if block.preact:
        entry = [x_shape[0] * x_shape[2] * x_shape[3]] if block.entry_norm else []
        return entry + per[:n_main - 1]
    return per[:n_main] + per[n_main:]


__all__ = ["ConvArgs", "NormArgs", "block_backend", "residual_block"]
