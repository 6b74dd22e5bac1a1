"""Bytes saved for backward (``fastres.benchmark.memory``), against counts worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastres
from fastres.benchmark.memory import saved_bytes, saved_bytes_ratio, saved_storages


class _Views(nn.Module):
    """``x·w`` saves x (w is a parameter); ``exp`` saves its result e; ``sin`` of a view of e
    saves that view (e's storage again); ``·b`` saves the buffer b only."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))
        self.register_buffer("b", torch.full((5,), 2.0))

    def forward(self, x):
        e = (x * self.w).exp()
        return e[0].sin() * self.b


def test_storages_counted_once_parameters_and_buffers_left_out():
    x = torch.randn(3, 5)  # 60 bytes
    assert saved_bytes(_Views(), x) == 60 + 60  # x and e; e's view, w and b not again
    assert len(saved_storages(_Views(), x)) == 2


def test_a_loss_is_counted_and_no_grad_does_not_hide_the_graph():
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert saved_bytes(_Views(), x) == 120
    # pow(2) saves its input: the (5,) float output of the model, 20 bytes
    assert saved_bytes(_Views(), x, loss=lambda out: out.pow(2).sum()) == 140


def _conv_bn_relu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU()).train()


def test_conv_bn_relu_by_hand_and_running_stats_untouched():
    """x 2·3·5·5 fp32 = 600 B; y and z 2·4·5·5 = 800 B each; BN's batch mean and invstd
    4 floats = 16 B each. Eager: conv saves x, BN y + mean + invstd, ReLU z. The per-layer
    fused op saves the same: x, y, z, mean, var."""
    eager = _conv_bn_relu()
    x = torch.randn(2, 3, 5, 5)
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    assert saved_bytes(eager, x) == 600 + 800 + 16 + 16 + 800
    for k, v in eager.state_dict().items():  # running stats, num_batches_tracked restored
        assert torch.equal(v, before[k]), k
    with fastres.use_backend("reference"):
        fused = fastres.nn.ConvBNReLU.from_modules(eager[0], eager[1]).train()
        assert saved_bytes(fused, x) == 600 + 800 + 800 + 16 + 16
        assert saved_bytes_ratio(fused, eager, x) == pytest.approx(1.0)
