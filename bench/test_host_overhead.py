"""Host cost per call: ``fastres.nn.ConvBNReLU`` against eager ``Conv2d → BatchNorm2d → ReLU``.

Tiny CPU tensors on one thread, so the arithmetic is negligible and what is timed is the Python
and dispatcher work a call costs the host: argument checks, backend choice, custom-op and
autograd bookkeeping. On a GPU that work must stay below the kernels' run time or the GPU idles
(ResNet-50 makes 53 such calls per forward). ``pytest bench/test_host_overhead.py
--benchmark-only``; the eager figure is the target (issue 11, point 7).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastres

MODES = ("eval", "train")
SYSTEMS = ("eager", "fastres")


def layer(system: str, mode: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    if system == "eager":
        module = nn.Sequential(conv, bn, nn.ReLU())
    else:
        module = fastres.nn.ConvBNReLU.from_modules(conv, bn)
    return module.train(mode == "train"), torch.randn(2, 8, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("mode", MODES)
def test_host_cost_per_call(benchmark, mode, system):
    module, x = layer(system, mode)
    benchmark.group = f"host cost per call, {mode}"
    if mode == "eval":
        def call():
            with torch.no_grad():
                return module(x)
    else:  # forward with autograd recording, as in a training step
        def call():
            return module(x)
    out = benchmark(call)
    assert out.shape == (2, 8, 4, 4)
