"""The ``cuda`` backend: the compiled CUDA C++ kernels of ``fastres._C`` (csrc/).

The extension registers the ``fastres_cuda`` ops (``torch.ops.fastres_cuda.*``); this module
orchestrates them into the fused op of :class:`fastres.backends.base.Backend`:

* eval, no grad:       ``conv`` with scale/shift, residual and ReLU in its epilogue: one kernel;
* eval, with grad:     ``conv`` (raw y) then ``bn_apply``;
* batch statistics:    ``conv`` (raw y + per-tile partials) → ``bn_finalize`` → ``bn_apply``;
* backward:            ``bn_backward`` (dReLU + dBN, fp32 reductions) then PyTorch's convolution
                       backward (:func:`fastres.backends.reference.conv_backward`) for dx / dw / db.

Importing this module raises ImportError, with the reason, when the extension is not built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.fastres_cuda)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        f"the CUDA extension fastres._C is not available ({e}); build it with a CUDA build of "
        "torch and a CUDA toolkit: `pip install --no-build-isolation -e .` (see setup.py)"
    ) from e

from . import _alloc, devices
from .base import CallInfo, ConvParams, OptTensor, Tensor
from .reference import conv_backward

CL = torch.channels_last
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = {0: "direct", 1: "implicit_gemm"}

ops = torch.ops.fastres_cuda

try:
    # What the library holds (setup.py's -gencode targets): "sm_80", "sm_90a", "compute_80"...
    BUILT_ARCHS: tuple[str, ...] = tuple(ops.built_archs().split(","))
except (AttributeError, RuntimeError) as e:  # pragma: no cover - a library built before the record
    raise ImportError(
        "fastres._C does not say which GPU architectures it holds (built by an older setup.py); "
        "rebuild it: `pip install --no-build-isolation -e .`"
    ) from e


def plan(
    x_shape: tuple[int, ...], weight_shape: tuple[int, ...], conv: ConvParams, dtype: torch.dtype
) -> tuple[str, int, str | None]:
    """``(kernel, stat_tiles, reason)``: which conv kernel serves this shape, the number of rows of
    its BN partials, and None or why the extension cannot run it."""
    path, tiles, reason = ops.conv_plan(
        list(x_shape), list(weight_shape), list(conv.stride), list(conv.padding),
        list(conv.dilation), conv.groups, dtype,
    )
    return PATHS.get(path, str(path)), tiles, reason or None


def _check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"fastres_cuda::{op}: {msg}")


def _register_fakes() -> None:
    """Meta kernels so the ops can be traced. They only mutate their output arguments, so they
    return nothing, but they check the output shapes as the CUDA kernels' binding does."""

    @torch.library.register_fake("fastres_cuda::conv")
    def _conv(x, weight, bias, scale, shift, residual, stride, padding, dilation, groups, relu,
              out, partials):
        conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
        n, _, h, w = x.shape
        k, _, r, s = weight.shape
        oh, ow = conv.out_hw(h, w, r, s)
        _check(tuple(out.shape) == (n, k, oh, ow), "conv", f"out has shape {tuple(out.shape)}")
        _check(out.dtype == x.dtype and weight.dtype == x.dtype, "conv", "dtype mismatch")
        if residual is not None:
            _check(residual.shape == out.shape, "conv", "residual shape != out shape")
        if partials.numel():
            _, tiles, _ = plan(tuple(x.shape), tuple(weight.shape), conv, x.dtype)
            _check(
                tuple(partials.shape) == (3, tiles, k), "conv",
                f"partials must be (3, {tiles}, {k}), got {tuple(partials.shape)}",
            )

    @torch.library.register_fake("fastres_cuda::bn_finalize")
    def _finalize(partials, gamma, beta, eps, mean, var, scale, shift):
        k = partials.shape[-1]
        for t in (mean, var, scale, shift):
            _check(tuple(t.shape) == (k,), "bn_finalize", "outputs must be (K,)")

    @torch.library.register_fake("fastres_cuda::bn_apply")
    def _apply(y, scale, shift, residual, relu, z):
        _check(z.shape == y.shape and z.dtype == y.dtype, "bn_apply", "z must be like y")

    @torch.library.register_fake("fastres_cuda::bn_backward")
    def _backward(dz, y, z, mean, var, gamma, eps, batch_stats, relu, dy, dres, dgamma, dbeta):
        for t in (dz, z, dy):
            _check(t.shape == y.shape and t.dtype == y.dtype, "bn_backward", "must be like y")
        _check(dres.numel() == 0 or dres.shape == y.shape, "bn_backward", "dres shape")


_register_fakes()


def device_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the extension's kernels cannot run on CUDA ``device`` (in ``dtype``): the device is
    too old, has no native bfloat16, or the library holds no code it can run
    (:data:`BUILT_ARCHS`); None where they can, and where no device can be asked."""
    if why := devices.device_reason(device, dtype, "the CUDA kernels"):
        return why
    cap = devices.capability(device)
    if cap is not None and (why := devices.code_reason(BUILT_ARCHS, cap)):
        return f"the CUDA extension cannot run on this device: {why}"
    return None


def _f32(t: OptTensor) -> OptTensor:
    return None if t is None else t.to(torch.float32).contiguous()


class CudaBackend:
    name = "cuda"

    def unsupported_reason(self, call: CallInfo) -> str | None:
        if call.device.type != "cuda":
            return (
                f"the cuda backend runs on CUDA tensors only, got a tensor on {call.device.type}"
            )
        if call.dtype not in DTYPES:
            return f"the cuda backend supports float32, float16 and bfloat16, not {call.dtype}"
        if why := device_reason(call.device, call.dtype):
            return why
        if call.act not in (None, "relu"):
            return (f"the cuda kernels apply ReLU or no activation, not {call.act} "
                    "(the triton and reference backends fuse SiLU)")
        if call.sync:
            return ("the cuda kernels do not exchange statistics across processes "
                    "(SyncBatchNorm: the triton and reference backends do)")
        _, _, reason = plan(call.x_shape, call.weight_shape, call.conv, call.dtype)
        if reason is not None:
            return f"the cuda kernels cannot run this convolution: {reason}"
        return None

    def _conv(
        self, x: Tensor, weight: Tensor, bias: OptTensor, conv: ConvParams, *,
        scale: OptTensor = None, shift: OptTensor = None, residual: OptTensor = None,
        relu: bool = False, stats: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(out, partials)``: out = epilogue(conv(x) + bias); partials (3, T, K) if ``stats``."""
        n, _, h, w = x.shape
        k, _, r, s = weight.shape
        oh, ow = conv.out_hw(h, w, r, s)
        out = _alloc.empty(n, k, oh, ow, dtype=x.dtype, device=x.device, channels_last=True)
        if stats:
            _, tiles, _ = plan(tuple(x.shape), tuple(weight.shape), conv, x.dtype)
            partials = _alloc.empty(3, tiles, k, dtype=torch.float32, device=x.device)
        else:
            partials = x.new_empty(0, dtype=torch.float32)
        ops.conv(
            x, weight.contiguous(memory_format=CL), None if bias is None else bias.contiguous(),
            scale, shift, residual, list(conv.stride), list(conv.padding), list(conv.dilation),
            conv.groups, relu, out, partials,
        )
        return out, partials

    def forward(
        self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *,
        conv, batch_stats, eps, act, save_for_backward,
    ):
        assert act in (None, "relu"), f"cuda backend: activation {act} (see unsupported_reason)"
        relu = act == "relu"
        k = weight.shape[0]
        if batch_stats:
            y, partials = self._conv(x, weight, bias, conv, stats=True)
        else:
            # The running statistics as the partials of one tile of count 1 (mean, M2 = var): the
            # same finalize kernel then gives mean, var, scale and shift exactly, in one launch.
            partials = _alloc.empty(3, 1, k, dtype=torch.float32, device=x.device)
            partials[0].fill_(1.0)
            partials[1, 0].copy_(running_mean)
            partials[2, 0].copy_(running_var)
        mean, var, scale, shift = (
            _alloc.empty(k, dtype=torch.float32, device=x.device) for _ in range(4)
        )
        gamma, beta = _f32(bn_weight), _f32(bn_bias)
        ops.bn_finalize(partials, gamma, beta, float(eps), mean, var, scale, shift)
        if not batch_stats:
            if not save_for_backward:  # inference: one kernel
                z, _ = self._conv(
                    x, weight, bias, conv, scale=scale, shift=shift, residual=residual, relu=relu
                )
                return z, x.new_empty(0), mean, var
            y, _ = self._conv(x, weight, bias, conv)
        z = _alloc.empty_like(y)
        ops.bn_apply(y, scale, shift, residual, relu, z)
        if not save_for_backward:
            y = x.new_empty(0)
        return z, y, mean, var

    def backward(
        self, dz, x, weight, y, z, mean, var, bn_weight, *,
        bn_bias, residual, conv, batch_stats, eps, act, has_bias, output_mask,
    ):
        assert act in (None, "relu"), f"cuda backend: activation {act} (see unsupported_reason)"
        relu = act == "relu"
        k = weight.shape[0]
        dy = _alloc.empty_like(y)
        dres = _alloc.empty_like(dz) if output_mask[5] else dz.new_empty(0)
        dgamma = _alloc.empty(k, dtype=torch.float32, device=dz.device)
        dbeta = _alloc.empty(k, dtype=torch.float32, device=dz.device)
        ops.bn_backward(
            dz, y, z, mean, var, _f32(bn_weight), float(eps), batch_stats, relu,
            dy, dres, dgamma, dbeta,
        )
        dx, dw, db = conv_backward(dy, x, weight, conv, has_bias, output_mask)
        return (
            dx, dw, db,
            dgamma if output_mask[3] else None,
            dbeta if output_mask[4] else None,
            dres if output_mask[5] else None,
        )


# ---------------------------------------------------------------------------------------------
# Opt-in measured choice between the triton and cuda backends (FASTRES_AUTOTUNE_BACKEND=1)
# ---------------------------------------------------------------------------------------------

AUTOTUNE_ENV = "FASTRES_AUTOTUNE_BACKEND"
_tuned: dict[str, list[str]] | None = None


def autotune_cache_path() -> str:
    """JSON file of measured choices: ``$XDG_CACHE_HOME/fastres`` or ``~/.cache/fastres``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastres", "backend_autotune.json")


def _key(call: CallInfo) -> str:
    c = call.conv
    return "|".join(
        str(v)
        for v in (
            torch.cuda.get_device_name(call.device), str(call.dtype).split(".")[-1],
            call.x_shape, call.weight_shape, c.stride, c.padding, c.dilation, c.groups,
            "train" if call.batch_stats else "eval", call.has_residual, call.act,
        )
    )


def _load_cache() -> dict[str, list[str]]:
    global _tuned
    if _tuned is None:
        try:
            with open(autotune_cache_path()) as f:
                data = json.load(f)
            _tuned = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _tuned = {}
    return _tuned


def _save_cache(cache: dict[str, list[str]]) -> None:
    path = autotune_cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home only costs re-measuring in the next process


def autotuned_order(call: CallInfo, static: tuple[str, ...],
                    time_call: Callable[[str, CallInfo], float]) -> tuple[str, ...]:
    """``static`` reordered by a once-per-(device, shape, dtype, op) measurement of the triton,
    cuda and reference (cuDNN) backends, cached on disk; ``time_call(name, call)`` gives the
    milliseconds of one call on a backend (the op layer's, handed down through
    :func:`fastres.backends.set_call_timer`). Falls back to ``static`` while tracing or
    capturing a CUDA graph (measuring would sync the host), and for candidates that cannot serve
    the call."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        return static
    cache = _load_cache()
    key = _key(call)
    order = cache.get(key)
    if order is None:
        from . import availability

        timings: dict[str, float] = {}
        # reference (cuDNN) competes too: auto never serves a shape with something slower
        for name in ("triton", "cuda", "reference"):
            if availability(name, call) is not None:
                continue
            try:
                with torch.random.fork_rng(devices=[call.device]):
                    timings[name] = time_call(name, call)
            except Exception:  # a backend that fails here is simply not preferred
                continue
        order = sorted(timings, key=timings.__getitem__)
        cache[key] = order
        _save_cache(cache)
    return (*order, *(s for s in static if s not in order))
