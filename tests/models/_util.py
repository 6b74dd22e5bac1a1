"""Helpers shared by the block, model, swap and distributed tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tests.numerics import assert_close_ratio


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN state: offset means, varied scales, γ away from 1, β away from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def tensors_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with the live tensors (so ``.grad`` is reachable), keyed as saved."""
    return dict(model.state_dict(keep_vars=True))


def check_equivalent(original: nn.Module, fused: nn.Module, x: torch.Tensor, *, train: bool,
                     backward: bool = True) -> None:
    """Fused vs original by the error-ratio rule, float64 copy of the original as the truth.

    Forward output; in training also every parameter's gradient, the input's gradient and the
    BN running statistics after the step. ``fused`` and ``original`` must hold equal weights and
    have the same state_dict keys.
    """
    reference = copy.deepcopy(original).double()
    for m in (original, fused, reference):
        m.train(train)
    outs, grads_x = [], []
    upstream = None
    for m, inp in ((fused, x), (original, x), (reference, x.double())):
        inp = inp.detach().clone().requires_grad_(backward)
        y = m(inp)
        if backward:
            if upstream is None:
                upstream = torch.randn(y.shape, dtype=torch.float64)
            y.backward(upstream.to(y.dtype))
            grads_x.append(inp.grad)
        outs.append(y)
    assert_close_ratio("output", *outs)
    if backward:
        assert_close_ratio("input grad", *grads_x)
    sf, so, sr = tensors_by_key(fused), tensors_by_key(original), tensors_by_key(reference)
    assert list(sf) == list(so)
    for key, t in sf.items():
        if backward and isinstance(t, nn.Parameter):
            assert t.grad is not None, f"{key}: no gradient"
            assert_close_ratio(f"{key}.grad", t.grad, sr[key].grad, so[key].grad)
        elif key.endswith(("running_mean", "running_var")):
            assert_close_ratio(key, t, sr[key], so[key])
        elif key.endswith("num_batches_tracked"):
            assert int(t) == int(so[key]), key
