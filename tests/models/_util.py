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
            frozen = type(m).__name__ == "FrozenBatchNorm2d"  # torchvision's / timm's
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or frozen:
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def tensors_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with the live tensors (so ``.grad`` is reachable), keyed as saved."""
    return dict(model.state_dict(keep_vars=True))


CL = torch.channels_last


def check_equivalent(original: nn.Module, fused: nn.Module, x: torch.Tensor, *, train: bool,
                     backward: bool = True) -> None:
    """Fused vs original by the error-ratio rule, float64 copy of the original as the truth.

    The plain-PyTorch baseline runs channels_last, the layout fastres computes in (and the eager
    baseline of DESIGN.md §5): on CPU, PyTorch's NCHW and NHWC convolutions differ by ~2.5× in
    float32 error, so an NCHW baseline would measure the layout, not the fusion.

    Forward output; in training also every parameter's gradient, the input's gradient and the
    BN running statistics after the step. ``fused`` and ``original`` must hold equal weights and
    have the same state_dict keys.
    """
    reference = copy.deepcopy(original).cpu().double()  # the truth: float64 on the CPU
    original.to(memory_format=CL)
    for m in (original, fused, reference):
        m.train(train)
    outs, grads_x = [], []
    upstream = None
    for m, inp in ((fused, x), (original, x.contiguous(memory_format=CL)),
                   (reference, x.cpu().double())):
        inp = inp.detach().clone().requires_grad_(backward)
        y = m(inp)
        if backward:
            if upstream is None:
                upstream = torch.randn(y.shape, dtype=torch.float64)
            y.backward(upstream.to(y.device, y.dtype))
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


def check_sgd_step(original: nn.Module, fused: nn.Module, x: torch.Tensor,
                   target: torch.Tensor, steps: int = 1, lr: float = 0.1) -> None:
    """``steps`` SGD steps (momentum, weight decay) from the same weights: each step's loss and
    gradients, then the updated parameters and BN buffers of ``fused`` vs ``original``, float64
    copy of it as the truth. The baseline runs channels_last, as in :func:`check_equivalent`."""
    reference = copy.deepcopy(original).double()
    original.to(memory_format=CL)
    runs = []
    for m, inp in ((fused, x), (original, x.contiguous(memory_format=CL)),
                   (reference, x.double())):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        per_step = []
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(inp), target)
            loss.backward()
            grads = {k: t.grad.detach().clone() for k, t in tensors_by_key(m).items()
                     if isinstance(t, nn.Parameter)}
            opt.step()
            per_step.append((loss.detach(), grads))
        runs.append((per_step, {k: t.detach() for k, t in m.state_dict().items()}))
    (steps_f, sf), (steps_o, so), (steps_r, sr) = runs
    for i, ((lf, gf), (lo, go), (l_ref, gr)) in enumerate(zip(steps_f, steps_o, steps_r)):
        assert_close_ratio(f"step {i} loss", lf, l_ref, lo)
        assert list(gf) == list(go)
        for key in gf:
            assert_close_ratio(f"step {i} {key}.grad", gf[key], gr[key], go[key])
    assert list(sf) == list(so)
    for key in sf:
        if key.endswith("num_batches_tracked"):
            assert int(sf[key]) == int(so[key]) == steps, key
        else:
            assert_close_ratio(f"updated {key}", sf[key], sr[key], so[key])
