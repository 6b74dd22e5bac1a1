"""Every fused conv of a module, a block and a model runs on the backend asked for.

Equivalence alone cannot show it: on the CPU the reference backend gives the expected answer by
construction, so a call silently routed there would pass. ``fastres.backends.record_calls`` lists
the backend that served each forward and backward pass; the counts prove that every conv + BN
pair went through the fused op. Needs neither torchvision nor timm (absent on the GPU machines):
the unfused twin of a fused module is the truth's source. The ``gpu`` variants are the
end-to-end model check on a GPU.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import fastres
from fastres import models
from fastres.backends import ServedCall
from fastres.models.resnet import build_resnet
from fastres.nn import BasicBlock, Bottleneck, ConvBNReLU, FusedBlock, PreActBottleneck
from tests.models._util import check_equivalent, randomize_bn
from tests.numerics import assert_close_ratio

HAS_CUDA = torch.cuda.is_available()


def _unfused(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, FusedBlock):
            m.set_fused(False)
    return twin


def _served(calls: list[ServedCall], direction: str) -> list[ServedCall]:
    return [c for c in calls if c.direction == direction]


def _fused_passes(model: nn.Module, backend: str) -> int:
    """Fused-op passes one forward of ``model`` makes on ``backend``: one per residual block
    that runs as one block op (a backend with block kernels: not ``cuda``), else one per fused
    conv + BN pair (the stem, the blocks the block op cannot serve)."""
    blocks = backend != "cuda"
    return sum(
        1 if blocks and m.block_reason() is None else len(m._views)
        for m in model.modules() if isinstance(m, FusedBlock)
    )


def test_served_call_lists_are_off_outside_the_block() -> None:
    m = ConvBNReLU(4, 8, 3, padding=1)
    with fastres.backends.record_calls() as served:
        m(torch.randn(2, 4, 5, 5)).sum().backward()
    m(torch.randn(2, 4, 5, 5))  # not recorded
    assert [(c.direction, c.backend) for c in served] == [
        ("forward", "reference"), ("backward", "reference")
    ]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_conv_bn_relu_module_follows_use_backend(backend: str) -> None:
    m = ConvBNReLU(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    with fastres.use_backend(backend), fastres.backends.record_calls() as served:
        m(x).sum().backward()
        m.eval()
        with torch.no_grad():
            m(x)
    assert served == [
        ServedCall("forward", backend, batch_stats=True, inference=False),
        ServedCall("backward", backend, batch_stats=True, inference=False),
        ServedCall("forward", backend, batch_stats=False, inference=True),
    ]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_every_conv_on_triton(train: bool) -> None:
    """The whole block (3 convs + projection) is one block op on triton each way; layer by
    layer (``fastres.nn.layer_by_layer``) every conv + BN pair is one fused op."""
    block = randomize_bn(Bottleneck(16, 8, stride=2, groups=2, base_width=32))
    convs = sum(isinstance(m, nn.Conv2d) for m in block.modules())  # 3 + projection
    assert convs == 4
    for layered, (passes, op) in ((False, (1, "residual_block")), (True, (convs, "conv_bn_relu"))):
        block.zero_grad(set_to_none=True)
        with (fastres.use_backend("triton"), fastres.backends.record_calls() as served,
              fastres.nn.layer_by_layer() if layered else contextlib.nullcontext()):
            check_equivalent(_unfused(block), block, torch.randn(2, 16, 7, 7), train=train)
        for direction in ("forward", "backward"):
            calls = _served(served, direction)
            assert len(calls) == passes, served
            assert {(c.backend, c.op) for c in calls} == {("triton", op)}, served


# (block, blocks per stage, stem): the model class every factory builds, one block per stage
MODELS = {
    "resnet": (BasicBlock, [1, 1, 1, 1], "imagenet"),
    "preact_cifar": (PreActBottleneck, [1, 1, 1], "cifar"),
}


def _check_model_pass(model: nn.Module, x: torch.Tensor, backend: str) -> list[ServedCall]:
    """A training step and an inference on ``backend``; forward outputs by the error-ratio rule
    against the unfused twin (float64 the truth), gradients present and finite (their values
    are the op grid's and the block tests' business). Returns the served calls."""
    twins = {dt: _unfused(model).to(dt) for dt in (torch.float32, torch.float64)}
    with fastres.use_backend(backend), fastres.backends.record_calls() as served:
        for train in (True, False):
            for m in (model, *twins.values()):
                m.train(train)
            with torch.set_grad_enabled(train):
                z = model(x)
            with torch.no_grad():
                ref, base = twins[torch.float64](x.double()), twins[torch.float32](x)
            assert_close_ratio(f"output ({'train' if train else 'eval'})", z, ref, base)
            if train:
                z.backward(torch.randn_like(z))
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    assert {c.backend for c in served} == {backend}, served
    return served


def _model_step(name: str, backend: str, device: str, x_hw: int) -> None:
    """A narrow ``name`` on ``backend``: every fused pair served by it, in training (forward
    and backward) and in inference (the one-kernel path)."""
    block, layers, stem = MODELS[name]
    model = build_resnet(block, layers, num_classes=5, stem=stem, base_channels=4)
    model = randomize_bn(model).to(device)
    passes = _fused_passes(model, backend)
    assert passes >= 4
    served = _check_model_pass(model, torch.randn(2, 3, x_hw, x_hw, device=device), backend)
    train_fwd = [c for c in _served(served, "forward") if not c.inference]
    infer_fwd = [c for c in _served(served, "forward") if c.inference]
    assert len(train_fwd) == len(_served(served, "backward")) == passes
    assert len(infer_fwd) == passes and not any(c.batch_stats for c in infer_fwd)


@pytest.mark.parametrize(
    "name", ["preact_cifar", pytest.param("resnet", marks=pytest.mark.slow)]  # ~12 s each
)
def test_model_every_fused_pair_on_triton(name: str) -> None:
    _model_step(name, "triton", "cpu", x_hw=16 if name == "resnet" else 8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18", "resnext50_32x4d"])
def test_model_every_fused_pair_on_gpu(name: str, backend: str) -> None:
    """The factories' real depth, narrow, on a GPU (no torchvision needed)."""
    model = randomize_bn(getattr(models, name)(num_classes=5, base_channels=16)).cuda()
    passes = _fused_passes(model, backend)
    served = _check_model_pass(model, torch.randn(8, 3, 64, 64, device="cuda"), backend)
    assert len(_served(served, "backward")) == passes
    assert len(_served(served, "forward")) == 2 * passes
