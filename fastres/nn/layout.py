"""Memory format at the boundary of a fused model: the layout eager PyTorch would return.

Fused ops compute in channels_last and hand it on to the next fused op. PyTorch's own
convolution returns its input's *suggested* memory format, so an NCHW input gives NCHW feature
maps; user code relies on that (``.view()`` on features, Dropout masks drawn in memory order under
a seed). So:

* :func:`fastres.fuse` registers a forward pre-hook and a forward hook on the root model
  (:func:`add_root_hooks`): the pre-hook notes the input's suggested format for this thread, the
  hook converts the 4-d tensors of the output back to it (for an NCHW input: channels_last
  tensors become NCHW; for a channels_last input eager's ops see the same layouts as the fused
  ones, so nothing changes). Inside such a root call fused modules
  keep channels_last between them (:func:`inside_fused_call`).
* Elsewhere each fused op or module follows PyTorch's rule itself (:func:`match_input`): a
  module called outside a root call (``model.forward_features(x)`` bypasses the root's
  forward), and every op inside a root call on a channels_last input, where eager's layout can
  still turn NCHW along the way (an ambiguous 1×1 map: :func:`eager_strides`). On a
  channels_last input that costs nothing.
* Inside a fused Sequential or traced block, a fused run whose output goes to a module that is
  not fused is converted to :func:`wanted_format` first, so that module sees eager's layout
  (Dropout draws its mask in memory order).

The hooks are module-level functions (they pickle and deep-copy with the model); their ids are
kept in the root's ``__dict__`` so that :func:`remove_root_hooks` (``unfuse``) finds them.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

HOOKS_ATTR = "_fastres_layout_hooks"

_state = threading.local()


def suggested_format(x: Any) -> torch.memory_format:
    """PyTorch's suggested memory format of ``x`` (channels_last for a 4-d tensor whose strides
    are channels_last's, else contiguous; what ``nn.Conv2d`` returns for it)."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return torch._prims_common.suggest_memory_format(x)
    return torch.contiguous_format


def inside_fused_call() -> bool:
    """True while a root model fused by :func:`fastres.fuse` runs its forward (this thread).
    Under ``torch.compile`` every fused module converts its own outputs (no thread state)."""
    if torch.compiler.is_compiling():
        return False
    return getattr(_state, "depth", 0) > 0


def _nchw_root() -> bool:
    """Inside a fused root call whose input was NCHW: eager's tensors are NCHW everywhere, the
    fused ones stay channels_last between fused ops and are converted where they leave them."""
    return inside_fused_call() and _state.formats[-1] == torch.contiguous_format


def wanted_format(x: Any) -> torch.memory_format:
    """The layout eager has where ``x`` enters a module: NCHW inside a root call on an NCHW
    input, else ``x``'s suggested format (eager's layout can change along the model: an
    ambiguous 1×1 map makes its consumers NCHW)."""
    return torch.contiguous_format if _nchw_root() else suggested_format(x)


def to_format(out: Any, fmt: torch.memory_format) -> Any:
    """``out`` (a tensor, or tuples/lists/dicts of them) as eager would lay it out where the
    layout in force is ``fmt``: for contiguous (NCHW), every channels_last 4-d tensor made
    contiguous (eager never makes one from NCHW inputs; fused ops did); for channels_last,
    unchanged (eager's ops see the same channels_last tensors as the fused ones make)."""
    if fmt != torch.contiguous_format:
        return out
    if isinstance(out, Tensor):
        if out.dim() != 4 or out.layout != torch.strided or out.is_contiguous():
            return out
        return out.contiguous() if out.is_contiguous(memory_format=torch.channels_last) else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(to_format(v, fmt) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(to_format(v, fmt) for v in out)
    if isinstance(out, dict):
        converted = {k: to_format(v, fmt) for k, v in out.items()}
        try:
            return type(out)(converted)  # OrderedDict and friends
        except TypeError:
            return converted
    return out


def _dense_strides(shape: torch.Size, fmt: torch.memory_format) -> tuple[int, ...]:
    _, c, h, w = shape
    if fmt == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def eager_strides(y: Tensor) -> Tensor:
    """A fused conv → norm (→ act) output ``y`` with the strides eager PyTorch gives it where
    the two layouts coincide (a dimension of size 1, e.g. a 1×1 pooled map): there the norm's
    output takes NCHW strides (measured on PyTorch's CPU BatchNorm), and though they address
    the same memory, strides steer later format choices (``interpolate``, ``torch.cat``).
    A restride, no copy."""
    if not (y.dim() == 4 and y.is_contiguous()
            and y.is_contiguous(memory_format=torch.channels_last)):
        return y  # an unambiguous layout: the boundary rule (to_format) applies
    strides = _dense_strides(y.shape, torch.contiguous_format)
    return y if y.stride() == strides else y.as_strided(y.shape, strides)


def first_tensor(args: Any) -> Tensor | None:
    for a in args:
        if isinstance(a, Tensor):
            return a
    return None


def match_input(out: Any, x: Any) -> Any:
    """A fused op's or module's output as eager would lay it out for input ``x`` (PyTorch's
    rule: the input's suggested format); unchanged inside a root call on an NCHW input (the
    root and the fused modules' non-fused consumers convert, see the module docstring)."""
    if _nchw_root():
        return out
    return to_format(out, suggested_format(x))


def _enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = first_tensor(args)
    if x is None:
        x = first_tensor(kwargs.values())
    if not hasattr(_state, "formats"):
        _state.formats = []
    _state.formats.append(suggested_format(x))
    _state.depth = getattr(_state, "depth", 0) + 1


def _exit(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    # always_call: runs when the forward raised too, so the depth never leaks
    _state.depth -= 1
    fmt = _state.formats.pop()
    return to_format(output, fmt)


def add_root_hooks(model: nn.Module) -> None:
    """Register the boundary hooks on ``model`` (once: a model fused again keeps its pair)."""
    if has_root_hooks(model):
        return
    pre = model.register_forward_pre_hook(_enter, with_kwargs=True)
    post = model.register_forward_hook(_exit, with_kwargs=True, always_call=True)
    model.__dict__[HOOKS_ATTR] = (pre.id, post.id)


def has_root_hooks(model: nn.Module) -> bool:
    ids = model.__dict__.get(HOOKS_ATTR)
    return ids is not None and ids[0] in model._forward_pre_hooks and (
        ids[1] in model._forward_hooks)


def remove_root_hooks(model: nn.Module) -> None:
    ids = model.__dict__.pop(HOOKS_ATTR, None)
    if ids is None:
        return
    pre, post = ids
    model._forward_pre_hooks.pop(pre, None)
    model._forward_pre_hooks_with_kwargs.pop(pre, None)
    for table in (model._forward_hooks, model._forward_hooks_with_kwargs,
                  model._forward_hooks_always_called):
        table.pop(post, None)


__all__ = ["add_root_hooks", "inside_fused_call", "match_input", "remove_root_hooks",
           "suggested_format", "to_format", "wanted_format"]
