"""Output allocation shared by all backends.

With poisoning on (``FASTRES_POISON=1`` or :func:`set_poison`), every output a backend allocates is
filled with NaN first, so an element a kernel forgets to write shows up in the tests.
"""

from __future__ import annotations

import os

import torch

_poison = os.environ.get("FASTRES_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = enabled


def poison_enabled() -> bool:
    return _poison


def empty(
    *shape: int,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(
        *t.shape,
        dtype=dtype or t.dtype,
        device=t.device,
        channels_last=t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last),
    )
