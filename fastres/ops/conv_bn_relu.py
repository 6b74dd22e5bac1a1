"""``conv_bn_relu``: conv2d → batch_norm → (+ residual) → (ReLU or SiLU) as one autograd-aware op.

Stack, top to bottom:

* :func:`conv_bn_relu`: the public functional op. Validates arguments, applies autocast, converts
  to channels_last, picks the backend, calls the custom op, updates BN running statistics.
* ``fastres::conv_bn_relu_fwd`` / ``fastres::conv_bn_relu_bwd``: ``torch.library`` custom ops (with
  fake kernels and an autograd formula) so ``torch.compile(fullgraph=True)`` traces through them.
* the backend chosen by :mod:`fastres.backends` computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

from .. import backends
from ..backends import BackendUnavailableError, CallInfo, ConvParams
from ..backends.sync import group_name
from .direct import call_op

Tensor = torch.Tensor
T = TypeVar("T")
CL = torch.channels_last
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)

# Activations the fused op applies after the BN and the residual add (None: none).
ACTIVATIONS = ("relu", "silu")


def activation(relu: bool = True, act: str | None = None) -> str | None:
    """The activation name from the ``relu`` flag and an optional ``act`` name, which wins:
    ``"relu"``, ``"silu"``, or None for none (``act="none"`` or ``"identity"`` too)."""
    if act is None:
        return "relu" if relu else None
    if not isinstance(act, str):
        raise TypeError(f"act must be a str or None, got {type(act).__name__}")
    name = act.lower()
    if name in ("none", "identity"):
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; fastres fuses "
                         f"{', '.join(ACTIVATIONS)} or none")
    return name


def _pair(name: str, v: int | Sequence[int], minimum: int) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not (isinstance(v[0], int) and isinstance(v[1], int)):
        raise ValueError(f"conv_bn_relu: {name} must be an int or a pair of ints, got {v!r}")
    if v[0] < minimum or v[1] < minimum:
        raise ValueError(f"conv_bn_relu: {name} must be >= {minimum}, got {v!r}")
    return v  # type: ignore[return-value]


def _check_vector(name: str, t: Tensor | None, k: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"conv_bn_relu: {name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"conv_bn_relu: {name} has unsupported dtype {t.dtype}; expected a float")
    if t.shape != (k,):
        raise ValueError(
            f"conv_bn_relu: {name} must have shape ({k},) (one per output channel), "
            f"got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"conv_bn_relu: {name} is on {t.device} but x is on {device}")


def _validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, conv):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv_bn_relu: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"conv_bn_relu: {name} has unsupported dtype {t.dtype}; "
                "expected float32, float16 or bfloat16"
            )
        if t.dim() != 4:
            raise ValueError(
                f"conv_bn_relu: expected {name} of rank 4 "
                f"({'N, C, H, W' if name == 'x' else 'K, C/groups, R, S'}), "
                f"got rank {t.dim()} with shape {tuple(t.shape)}"
            )
    if weight.device != x.device:
        raise ValueError(f"conv_bn_relu: weight is on {weight.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"conv_bn_relu: weight dtype {weight.dtype} does not match x dtype {x.dtype}"
        )
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    g = conv.groups
    if c % g or k % g:
        raise ValueError(
            f"conv_bn_relu: groups={g} must divide both input channels ({c}) "
            f"and output channels ({k})"
        )
    if cg * g != c:
        raise ValueError(
            f"conv_bn_relu: channel mismatch: x has {c} channels but weight {tuple(weight.shape)} "
            f"with groups={g} expects {cg * g}"
        )
    oh, ow = conv.out_hw(h, w, r, s)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"conv_bn_relu: output would be empty ({oh}x{ow}) for input {h}x{w}, kernel {r}x{s}, "
            f"padding {conv.padding}, dilation {conv.dilation}"
        )
    if x.numel() == 0:
        raise ValueError(f"conv_bn_relu: x is empty, shape {tuple(x.shape)}")
    if bias is not None:
        _check_vector("bias", bias, k, x.device)
        if bias.dtype != x.dtype:
            raise TypeError(f"conv_bn_relu: bias dtype {bias.dtype} does not match x {x.dtype}")
    for name, t in (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        _check_vector(name, t, k, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv_bn_relu: pass both running_mean and running_var, or neither")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"conv_bn_relu: residual must be a Tensor, got {type(residual)}")
        if tuple(residual.shape) != (n, k, oh, ow):
            raise ValueError(
                f"conv_bn_relu: residual has shape {tuple(residual.shape)} but the conv output "
                f"has shape {(n, k, oh, ow)}"
            )
        if residual.device != x.device:
            raise ValueError(f"conv_bn_relu: residual is on {residual.device}, x on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(
                f"conv_bn_relu: residual dtype {residual.dtype} does not match x {x.dtype}"
            )
    return n, k, oh, ow


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _params(stride, padding, dilation, groups) -> ConvParams:
    return ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)


def _on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Kernels launch on the current CUDA device and stream: make that ``t``'s device (on a
    multi-GPU machine the current device need not be the one holding the tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    batch_stats: bool,
    eps: float,
    act: str | None,
    save_for_backward: bool,
    backend: str,
    group: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(z, y, mean, var, count)``; see :class:`fastres.backends.base.Backend`.
    ``group``: the c10d name of the process group a SyncBatchNorm's batch statistics are taken
    over (:mod:`fastres.backends.sync`); ``count`` is then their number of values per channel,
    (1,) fp32, for the running variance's Bessel factor (empty without ``group``)."""
    impl = backends.load(backend)
    backends.record(
        "forward", impl.name, batch_stats=batch_stats, inference=not save_for_backward
    )
    sync = {} if group is None else {"group": group}  # backends without SyncBN never see it
    with _on_device_of(x):
        out = impl.forward(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            conv=_params(stride, padding, dilation, groups),
            batch_stats=batch_stats, eps=eps, act=act, save_for_backward=save_for_backward,
            **sync,
        )
    return out if group is not None else (*out, x.new_empty(0, dtype=torch.float32))


conv_bn_relu_fwd = torch.library.custom_op(
    "fastres::conv_bn_relu_fwd", _fwd_impl, mutates_args=()
)


@conv_bn_relu_fwd.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
      dilation, groups, batch_stats, eps, act, save_for_backward, backend, group=None):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    oh, ow = _params(stride, padding, dilation, groups).out_hw(h, w, r, s)
    z = torch.empty((n, k, oh, ow), dtype=x.dtype, device=x.device, memory_format=CL)
    y = torch.empty_like(z) if save_for_backward else x.new_empty(0)
    stat = x.new_empty((k,), dtype=torch.float32)
    count = x.new_empty((0 if group is None else 1,), dtype=torch.float32)
    return z, y, stat, torch.empty_like(stat), count


def _bwd_impl(
    dz: Tensor,
    x: Tensor,
    weight: Tensor,
    y: Tensor,
    z: Tensor | None,
    mean: Tensor,
    var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    batch_stats: bool,
    eps: float,
    act: str | None,
    has_bias: bool,
    output_mask: list[bool],
    backend: str,
    group: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias, dbn_weight, dbn_bias, dresidual)``, empty where not asked.

    ``z`` (the output) is given unless ``act`` is SiLU, whose gradient is recomputed from the
    pre-activation (y − mean)·γ·invstd + β (+ residual) instead: ``bn_bias`` and ``residual`` are
    given (where they exist) for SiLU only. With ``group`` (SyncBatchNorm) dy takes the process
    group's sums; dbn_weight and dbn_bias are this process' share.
    """
    impl = backends.load(backend)
    backends.record("backward", impl.name, batch_stats=batch_stats, inference=False)
    sync = {} if group is None else {"group": group}
    with _on_device_of(dz):
        grads = impl.backward(
            dz, x, weight, y, z, mean, var, bn_weight,
            bn_bias=bn_bias, residual=residual, conv=_params(stride, padding, dilation, groups),
            batch_stats=batch_stats, eps=eps, act=act, has_bias=has_bias,
            output_mask=tuple(output_mask), **sync,
        )
    # custom ops return fresh tensors, never None, with the strides the fake kernel promises
    likes = (x, weight, None, None, None, dz)
    return tuple(
        dz.new_empty(0) if t is None else _strided_like(t, like) for t, like in zip(grads, likes)
    )


def _strided_like(t: Tensor, like: Tensor | None) -> Tensor:
    if like is None or t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


conv_bn_relu_bwd = torch.library.custom_op(
    "fastres::conv_bn_relu_bwd", _bwd_impl, mutates_args=()
)


@conv_bn_relu_bwd.register_fake
def _(dz, x, weight, y, z, mean, var, bn_weight, bn_bias, residual, stride, padding, dilation,
      groups, batch_stats, eps, act, has_bias, output_mask, backend, group=None):
    k = weight.shape[0]
    shapes = [
        lambda: torch.empty_like(x),
        lambda: torch.empty_like(weight),
        lambda: weight.new_empty((k,)),
        lambda: mean.new_empty((k,)),
        lambda: mean.new_empty((k,)),
        lambda: torch.empty_like(dz),
    ]
    if not has_bias:
        output_mask = [*output_mask[:2], False, *output_mask[3:]]
    return tuple(make() if m else dz.new_empty(0) for make, m in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias = inputs[:5]
    residual = inputs[7]
    stride, padding, dilation, groups, batch_stats, eps, act, _, backend, group = inputs[8:]
    z, y, mean, var, count = output
    if act == "silu":
        # SiLU is not invertible: its gradient needs the pre-activation bn(y) (+ residual),
        # recomputed from the raw y, β and the residual (a block input that is usually saved
        # anyway, by the block's first conv), instead of z
        ctx.save_for_backward(x, weight, y, None, mean, var, bn_weight, bn_bias, residual)
    else:
        ctx.save_for_backward(x, weight, y, z, mean, var, bn_weight, None, None)
    # only z is differentiable (the backward ignores grads of y / mean / var): no zero-filled
    # grads for them, and the running-stats update on mean / var records no graph
    ctx.mark_non_differentiable(y, mean, var, count)
    ctx.set_materialize_grads(False)
    ctx.args = (list(stride), list(padding), list(dilation), groups, batch_stats, eps, act)
    ctx.has_bias = bias is not None
    ctx.backend, ctx.group = backend, group
    ctx.bn_dtypes = (
        None if bn_weight is None else bn_weight.dtype,
        None if bn_bias is None else bn_bias.dtype,
    )


def _backward(ctx, dz, dy_unused, dmean_unused, dvar_unused, dcount_unused):
    x, weight, y, z, mean, var, bn_weight, bn_bias, residual = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # inputs: x weight bias bn_weight bn_bias running_mean running_var residual ...
    mask = [needs[0], needs[1], needs[2], needs[3], needs[4], needs[7]]
    if dz is None or not any(mask):
        return (None,) * 18
    dz = dz.contiguous(memory_format=CL)
    args = (dz, x, weight, y, z, mean, var, bn_weight, bn_bias, residual, *ctx.args,
            ctx.has_bias, mask, ctx.backend, ctx.group)
    grads = call_op(conv_bn_relu_bwd, _bwd_impl, args, args[:10])
    dx, dw, db, dgamma, dbeta, dres = (g if m else None for g, m in zip(grads, mask))
    if dgamma is not None:
        dgamma = dgamma.to(ctx.bn_dtypes[0])
    if dbeta is not None:
        dbeta = dbeta.to(ctx.bn_dtypes[1])
    return (dx, dw, db, dgamma, dbeta, None, None, dres) + (None,) * 10


conv_bn_relu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _ConvBNReLUFunction(torch.autograd.Function):
    """The custom op with the autograd formula registered above, for eager calls.

    ``register_autograd``'s wrapper re-fills the schema's defaults on every call
    (``torch._library.utils.fill_defaults``, quadratic in the 17 arguments: ~40 µs a call on
    CPU). Applying the same ``_setup_context`` / ``_backward`` through a plain
    ``autograd.Function`` skips it; the op itself runs through the dispatcher wherever anything
    would see it (profiler, dispatch modes: :mod:`fastres.ops.direct`), else its implementation
    directly. Under ``torch.compile`` the op's registered autograd serves, as before. (``forward``
    takes ``ctx`` itself: a separate ``setup_context`` makes ``apply`` bind arguments through
    ``inspect``.)
    """

    @staticmethod
    def forward(ctx, *args):
        output = call_op(conv_bn_relu_fwd, _fwd_impl, args, args[:8])
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
# Public functional op
# ---------------------------------------------------------------------------------------------


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    bias: Tensor | None = None,
    training: bool,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    residual: Tensor | None = None,
    relu: bool = True,
    act: str | None = None,
    backend: str | None = None,
    process_group: object | None = None,
) -> Tensor:
    """Exactly ``act(batch_norm(conv2d(x, weight, bias)) + residual)``, fused.

    Same semantics as::

        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        if residual is not None: y = y + residual
        if relu: y = F.relu(y)

    ``act`` names the activation instead and overrides ``relu`` when given: ``"relu"``,
    ``"silu"`` (``F.silu``) or ``"none"`` (see :func:`activation`).

    except that batch statistics are also used in eval when the running statistics are None (as
    ``nn.BatchNorm2d(track_running_stats=False)`` does), and the result is channels_last. In
    training, ``running_mean``/``running_var`` are updated in place (unbiased variance).
    ``momentum`` may be a 0-d tensor (e.g. 1 / num_batches_tracked for a cumulative average,
    kept on the device so that no step waits for the GPU).
    ``backend`` overrides the backend in force (see :func:`fastres.set_backend`).

    ``process_group`` (a ``torch.distributed`` process group or its c10d name; used in training
    only): ``nn.SyncBatchNorm``'s function. The batch statistics are those of the whole batch
    of every process in the group (shards of any size), the running statistics are updated from
    them (Bessel's factor of the whole batch), and the input gradient takes the group's sums;
    the BN parameters' gradients are this process' share (DDP sums/averages them). One
    collective each way (:mod:`fastres.backends.sync`), on the triton and reference backends.
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"conv_bn_relu: groups must be a positive int, got {groups!r}")
    stride, padding = _pair("stride", stride, 1), _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    # only the devices fastres serves; torch.amp.is_autocast_available would break torch 2.11's
    # dynamo (a skipped function), and is_autocast_enabled raises for e.g. "meta"
    if not isinstance(x, Tensor):
        device_type = "cpu"
    else:
        device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if device_type is not None and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        x, weight, bias, residual = cast(x), cast(weight), cast(bias), cast(residual)
    act = activation(relu, act)
    call, count = _checked(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
        (stride, padding, dilation, groups), bool(training), act,
    )
    group = None
    if training and process_group is not None:
        group = process_group if isinstance(process_group, str) else group_name(process_group)
        call = dataclasses.replace(call, sync=True)
    name = backends.select(call, backend)
    x = x.contiguous(memory_format=CL)
    if residual is not None:
        residual = residual.contiguous(memory_format=CL)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, bn_weight, bn_bias, residual)
    )
    args = (
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
        stride, padding, dilation, groups, call.batch_stats, float(eps), act, save, name, group,
    )
    if save and not torch.compiler.is_compiling():
        z, _, mean, var, group_count = _ConvBNReLUFunction.apply(*args)
    else:
        z, _, mean, var, group_count = call_op(conv_bn_relu_fwd, _fwd_impl, args, args[:8])
    if training and running_mean is not None:
        if group is not None:  # the whole batch's count, a tensor: no host sync
            count = group_count
        update_running_stats([running_mean], [running_var], [mean],
                             [var * (count / (count - 1))], [momentum])
    return z


_checked_calls: dict[tuple, tuple[CallInfo, int]] = {}
_MAX_CHECKED = 4096  # distinct call signatures kept (a model has a few dozen)


def _meta(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def checked_once(cache: dict, make_key: Callable[[], Hashable], check: Callable[[], T]) -> T:
    """``check()``, run once per distinct ``make_key()`` and kept in ``cache``.

    For argument checks whose outcome depends only on what the key holds (tensors' shapes,
    dtypes and devices, flags): only results of checks that passed are kept, so bad input always
    reaches ``check`` and raises its error; a key that cannot be made (a non-tensor where a
    tensor belongs: AttributeError; an unhashable argument: TypeError) keeps nothing. Under
    ``torch.compile`` nothing is kept (the checks run once, while tracing; a global dict read
    there would be guarded on).
    """
    if torch.compiler.is_compiling():
        return check()
    try:
        key = make_key()
        result = cache.get(key)
    except (AttributeError, TypeError):
        key = result = None
    if result is None:
        result = check()
        if key is not None:
            if len(cache) >= _MAX_CHECKED:
                cache.clear()
            cache[key] = result
    return result


def _checked(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, conv_args,
             training: bool, act: str | None) -> tuple[CallInfo, int]:
    """Check the arguments once per call signature (:func:`checked_once`): ``(call, N·OH·OW)``.

    The key: each tensor's shape, dtype and device (or its absence), the conv parameters,
    ``training`` and the activation ``act``. The backend is chosen per call
    (:func:`fastres.backends.select`, about a microsecond): the setting, the environment and a
    backend's availability may change between calls.
    """
    return checked_once(
        _checked_calls,
        lambda: (
            _meta(x), _meta(weight), _meta(bias), _meta(bn_weight), _meta(bn_bias),
            _meta(running_mean), _meta(running_var), _meta(residual), conv_args, training, act,
        ),
        lambda: _check_call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                            residual, conv_args, training, act),
    )


def _check_call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                conv_args, training: bool, act: str | None) -> tuple[CallInfo, int]:
    conv = ConvParams(*conv_args)
    n, k, oh, ow = _validate(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, conv
    )
    batch_stats = training or running_mean is None
    count = n * oh * ow
    if batch_stats and count == 1:
        raise ValueError(
            "conv_bn_relu: expected more than 1 value per channel when using batch statistics, "
            f"got output shape {(n, k, oh, ow)}"
        )
    call = CallInfo(
        device=x.device, dtype=x.dtype, x_shape=tuple(x.shape), weight_shape=tuple(weight.shape),
        conv=conv, batch_stats=batch_stats, has_residual=residual is not None, act=act,
    )
    return call, count


def update_running_stats(running_means: Sequence[Tensor], running_vars: Sequence[Tensor],
                         means: Sequence[Tensor], unbiased_vars: Sequence[Tensor],
                         momenta: Sequence[float | Tensor]) -> None:
    """For each BatchNorm i, in place and in the buffers' dtype, as BatchNorm does:
    ``running_i = (1 − momentum_i)·running_i + momentum_i·batch_i`` for the mean and the unbiased
    variance. A momentum is a float or a 0-d tensor (no host sync either way). Equal float
    momenta (the usual case: a block's BatchNorms) make it one multi-tensor call for all."""
    with torch.no_grad():
        means, unbiased_vars = list(means), list(unbiased_vars)
        for i, (rm, rv) in enumerate(zip(running_means, running_vars, strict=True)):
            if means[i].dtype != rm.dtype or unbiased_vars[i].dtype != rv.dtype:
                means[i], unbiased_vars[i] = means[i].to(rm.dtype), unbiased_vars[i].to(rv.dtype)
        first = momenta[0]
        # isinstance first: comparing a float with a 0-d tensor would read it on the host
        if all(not isinstance(m, Tensor) and m == first for m in momenta):
            # a tensor weight would be read on the host here: floats only
            torch._foreach_lerp_([*running_means, *running_vars], [*means, *unbiased_vars], first)
            return
        for rm, rv, mean, var, m in zip(running_means, running_vars, means, unbiased_vars,
                                        momenta, strict=True):
            if isinstance(m, Tensor):
                m = m.to(rm.dtype)
            rm.lerp_(mean, m)
            rv.lerp_(var, m)


__all__ = [
    "ACTIVATIONS", "BackendUnavailableError", "activation", "conv_bn_relu", "update_running_stats",
]
