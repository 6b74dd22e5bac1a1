"""Count host syncs made by fastres's own code, on real tensors.

A ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` or ``.cpu()`` in a forward or backward
pass stalls the host on a GPU and breaks CUDA-graph capture. On the CPU nothing stalls, but the
same Python runs: :func:`count_host_syncs` patches those ``torch.Tensor`` methods for the duration
of a ``with`` block and records each call made from a frame inside the ``fastres`` package
(calls from torch, Triton's interpreter or the tests themselves are not the backends' doing).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fastres
from tests.ops.cases import Case, make_inputs

FASTRES_DIR = str(Path(fastres.__file__).resolve().parent)
SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """Yields a list that collects ``"file:line: method"`` for each sync from fastres code."""
    syncs: list[str] = []

    def wrap(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = str(Path(caller.f_code.co_filename).resolve())
            if path.startswith(FASTRES_DIR):
                syncs.append(f"{path[len(FASTRES_DIR) + 1:]}:{caller.f_lineno}: {name}")
            return original(self, *args, **kwargs)

        return method

    with pytest.MonkeyPatch.context() as mp:
        for name in SYNCING:
            mp.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        yield syncs


def op_pass_syncs(case: Case, training: bool, grad: bool, backend: str) -> list[str]:
    """The syncs fastres makes in one forward (and backward when ``grad``) of ``case``."""
    t = make_inputs(case, torch.float32, "cpu")
    t = {k: None if v is None else v.float() for k, v in t.items()}
    if grad:
        for k in ("x", "weight", "bias", "bn_weight", "bn_bias", "residual"):
            if t[k] is not None:
                t[k].requires_grad_(True)
    c = case.conv
    with count_host_syncs() as syncs, fastres.use_backend(backend):
        with torch.set_grad_enabled(grad):
            z = fastres.ops.conv_bn_relu(
                t.pop("x"), t.pop("weight"), t.pop("bn_weight"), t.pop("bn_bias"),
                t.pop("running_mean"), t.pop("running_var"), **t, training=training,
                stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
                relu=case.relu,
            )
        if grad:
            z.backward(torch.randn_like(z))
    return syncs
