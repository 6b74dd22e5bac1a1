"""Host cost per call: ``fastres.nn.ConvBNReLU`` against eager ``Conv2d → BatchNorm2d → ReLU``.

Tiny CPU tensors on one thread, so the arithmetic is negligible and what is timed is the Python
and dispatcher work a call costs the host: argument checks, backend choice, custom-op and
autograd bookkeeping. On a GPU that work must stay below the kernels' run time or the GPU idles
(ResNet-50 makes 53 such calls per forward). ``pytest bench/test_host_overhead.py
--benchmark-only``; the eager figure is the target (issue 11, point 7).

Three systems per mode:

* ``eager``: ``nn.Sequential(conv, bn, nn.ReLU())``, the target;
* ``fastres``: ``ConvBNReLU.from_modules`` over the same modules (on CPU the ``reference``
  backend computes);
* ``backend``: that backend's ``forward`` alone on the same tensors: what the reference backend
  spends itself (conv2d, var_mean, batch_norm, relu and layout copies; on a GPU the Triton or
  CUDA kernel launches stand there). ``fastres − backend`` is fastres' own per-call host cost
  (module, op layer, custom op, autograd), the figure issue 11 asks to keep at most eager's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastres
from fastres import backends
from fastres.backends import ConvParams

MODES = ("eval", "train")
SYSTEMS = ("eager", "fastres", "backend")


def layer(system: str, mode: str):
    """``(call, expected output shape)`` for ``system`` in ``mode``."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    # channels_last, as the layer benchmarks feed both systems (and as fastres' own blocks pass
    # activations on): no layout copy in either
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    train = mode == "train"
    if system == "backend":
        impl = backends.load(backends.select(_call_info(x, conv, train)))
        params = ConvParams(conv.stride, conv.padding, conv.dilation, conv.groups)

        def call():
            return impl.forward(
                x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, None,
                conv=params, batch_stats=train, eps=bn.eps, relu=True, save_for_backward=train,
            )[0]
    else:
        if system == "eager":
            module = nn.Sequential(conv, bn, nn.ReLU())
        else:
            module = fastres.nn.ConvBNReLU.from_modules(conv, bn)
        module.train(train)

        def call():
            return module(x)

    # train: forward with autograd recording, as in a training step (the backend runs below
    # autograd inside the custom op, so alone it runs without)
    if train and system != "backend":
        return call
    return lambda: _no_grad(call)


def _no_grad(call):
    with torch.no_grad():
        return call()


def _call_info(x, conv, train):
    return backends.CallInfo(
        device=x.device, dtype=x.dtype, x_shape=tuple(x.shape),
        weight_shape=tuple(conv.weight.shape),
        conv=ConvParams(conv.stride, conv.padding, conv.dilation, conv.groups),
        batch_stats=train, has_residual=False, relu=True,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("mode", MODES)
def test_host_cost_per_call(benchmark, mode, system):
    call = layer(system, mode)
    for _ in range(50):  # first calls: imports, the plan cache, oneDNN's primitive cache
        call()
    benchmark.group = f"host cost per call, {mode}"
    out = benchmark(call)
    assert out.shape == (2, 8, 4, 4)
