"""Backends and dispatch: which implementation serves a call.

Names: ``"auto"`` (default), ``"reference"`` (plain PyTorch), ``"triton"``, ``"cuda"`` (the compiled
extension ``fastres._C``). Chosen by :func:`set_backend`, :func:`use_backend`, or the environment
variable ``FASTRES_BACKEND``. Asking for a backend that cannot serve a call raises
:class:`BackendUnavailableError` naming why; ``"auto"`` falls back to ``reference``, and serves
``reference`` outright where :func:`auto_reason` says the device (its class,
:mod:`fastres.backends.devices`) is not one for the fused kernels. This package never imports the
op layer: what it needs from there (timing a whole op) is handed down (:func:`set_call_timer`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import devices
from .base import Backend, CallInfo, ConvParams

NAMES = ("auto", "reference", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve this call (the message says why)."""


def _check_name(name: str) -> str:
    name = name.lower()
    if name not in NAMES:
        raise ValueError(f"unknown fastres backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


_state = threading.local()
_default = _check_name(os.environ.get("FASTRES_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Set the process-wide backend (overridden inside :func:`use_backend`)."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend name in force in this thread."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block (this thread only)."""
    name = _check_name(name)
    if not hasattr(_state, "stack"):
        _state.stack = []
    _state.stack.append(name)
    try:
        yield
    finally:
        _state.stack.pop()


_instances: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def load(name: str) -> Backend | None:
    """The backend object, or None (reason in :func:`load_error`) if it cannot load here."""
    if name in _instances:
        return _instances[name]
    if name in _load_errors:
        return None
    try:
        if name == "reference":
            from .reference import ReferenceBackend as cls
        elif name == "triton":
            from .triton import TritonBackend as cls
        elif name == "cuda":
            from .cuda import CudaBackend as cls
        else:
            raise ValueError(name)
        _instances[name] = cls()
    except Exception as e:  # ImportError, missing extension, no toolchain...
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return None
    return _instances[name]


def load_error(name: str) -> str | None:
    return _load_errors.get(name)


def availability(name: str, call: CallInfo) -> str | None:
    """None if backend ``name`` can serve ``call``, else the reason it cannot."""
    backend = load(name)
    if backend is None:
        return f"the {name} backend is not available: {load_error(name)}"
    return backend.unsupported_reason(call)


def auto_reason(device: torch.device | str | None, dtype: torch.dtype | None = None
                ) -> str | None:
    """Why ``"auto"`` serves calls on ``device`` (in ``dtype``, where given) with PyTorch
    (``reference``, cuDNN on a GPU) rather than the fused kernels; None where it uses them.

    Off CUDA there are no fused kernels to run. Below sm_80 Triton's ``tl.dot`` has no
    tensor-core path (it becomes FFMA, far slower than cuDNN): ``backend="triton"`` still runs
    there when asked for. A device without native bfloat16 would emulate it in software, which
    no fused kernel does. The device class comes from :mod:`fastres.backends.devices` (tests
    simulate one there). ``fastres info`` and the fuse report show this sentence.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device or "cpu")
    if device.type != "cuda":
        return "no CUDA device: the fused kernels run on NVIDIA GPUs"
    return devices.device_reason(device, dtype, "the fused kernels", tensor_cores=True)


# How the op layer times one call on one backend (milliseconds), handed down by it for
# FASTRES_AUTOTUNE_BACKEND=1: the backends never import the op layer (set_call_timer).
CallTimer = Callable[[str, CallInfo], float]
_call_timer: CallTimer | None = None


def set_call_timer(timer: CallTimer | None) -> None:
    """Register how a whole fused op is timed on a backend (``timer(name, call) -> ms``); the
    op layer (:mod:`fastres.ops.backend_timing`) does at import."""
    global _call_timer
    _call_timer = timer


def auto_order(call: CallInfo) -> tuple[str, ...]:
    """Preference order of ``"auto"``: compiled kernels on CUDA, PyTorch elsewhere and where
    :func:`auto_reason` says the device (or the dtype on it) is not served by them.

    On CUDA the static order puts triton first (the CUDA C++ kernels are younger). With
    ``FASTRES_AUTOTUNE_BACKEND=1`` the faster of triton and cuda is measured once per (device,
    shape, dtype, op) and cached under ``~/.cache/fastres/`` (see
    :func:`fastres.backends.cuda.autotuned_order`), timed by the op layer's timer.
    """
    if auto_reason(call.device, call.dtype) is not None:
        return ("reference",)
    static = ("triton", "cuda", "reference")
    if (os.environ.get("FASTRES_AUTOTUNE_BACKEND", "0") == "1" and _call_timer is not None
            and load("cuda") is not None):
        from .cuda import autotuned_order

        return autotuned_order(call, static, _call_timer)
    return static


@dataclass(frozen=True)
class ServedCall:
    """One fused-op pass as the op layer dispatched it (see :func:`record_calls`)."""

    direction: str  # "forward" or "backward"
    backend: str  # the backend that computed it
    batch_stats: bool
    inference: bool  # forward without saving for backward (eval: the one-kernel path)
    op: str = "conv_bn_relu"  # or "residual_block" (a whole block, fastres.ops.block)


_records: list[ServedCall] | None = None  # the innermost active record_calls() list


@contextlib.contextmanager
def record_calls() -> Iterator[list[ServedCall]]:
    """Record which backend serves each forward and backward pass inside the block (all
    threads: autograd may run backward on its own). Tests use it to prove a call ran where it
    was sent; outside the block recording costs one global lookup per pass."""
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


def record(direction: str, backend: str, *, batch_stats: bool, inference: bool,
           op: str = "conv_bn_relu") -> None:
    """Called by the op layer for each pass; a no-op unless :func:`record_calls` is active."""
    if _records is not None:
        _records.append(ServedCall(direction, backend, batch_stats, inference, op))


def select(call: CallInfo, name: str | None = None) -> str:
    """Resolve the backend name that will serve ``call``."""
    name = _check_name(name) if name is not None else get_backend()
    if name == "auto":
        for candidate in auto_order(call):
            if availability(candidate, call) is None:
                return candidate
        return "reference"
    reason = availability(name, call)
    if reason is not None:
        raise BackendUnavailableError(f"fastres backend {name!r} cannot serve this call: {reason}")
    return name


__all__ = [
    "NAMES",
    "BackendUnavailableError",
    "CallInfo",
    "ConvParams",
    "ServedCall",
    "auto_reason",
    "availability",
    "get_backend",
    "load",
    "record_calls",
    "select",
    "set_backend",
    "set_call_timer",
    "use_backend",
]
