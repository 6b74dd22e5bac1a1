"""How ``FASTRES_AUTOTUNE_BACKEND=1`` times a call: the whole fused op on one backend.

The backends rank themselves by these timings (:func:`fastres.backends.cuda.autotuned_order`)
but never import the op layer: importing this module hands :func:`time_backend` down to them
(:func:`fastres.backends.set_call_timer`).
"""

from __future__ import annotations

import statistics

import torch

from .. import backends
from ..backends import CallInfo
from .conv_bn_relu import conv_bn_relu

CL = torch.channels_last


def time_backend(name: str, call: CallInfo, reps: int = 10) -> float:
    """Median milliseconds of one forward (+ backward when training) of ``call`` on ``name``."""
    dev, dt = call.device, call.dtype
    n, _, h, w = call.x_shape
    k = call.weight_shape[0]
    oh, ow = call.conv.out_hw(h, w, call.weight_shape[2], call.weight_shape[3])
    train = call.batch_stats
    x = torch.randn(call.x_shape, device=dev, dtype=dt).contiguous(memory_format=CL)
    wt = torch.randn(call.weight_shape, device=dev, dtype=dt) * 0.1
    gamma = torch.ones(k, device=dev, requires_grad=train)
    beta = torch.zeros(k, device=dev, requires_grad=train)
    rm, rv = torch.zeros(k, device=dev), torch.ones(k, device=dev)
    res = (
        torch.randn(n, k, oh, ow, device=dev, dtype=dt).contiguous(memory_format=CL)
        if call.has_residual
        else None
    )
    x.requires_grad_(train)
    wt.requires_grad_(train)

    def step() -> None:
        with torch.set_grad_enabled(train):
            z = conv_bn_relu(
                x, wt, gamma, beta, rm, rv, training=train, stride=call.conv.stride,
                padding=call.conv.padding, dilation=call.conv.dilation, groups=call.conv.groups,
                residual=res, act=call.act or "none", backend=name,
            )
            if train:
                z.sum().backward()

    for _ in range(3):  # compile / autotune / cache warm-up
        step()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


backends.set_call_timer(time_backend)
