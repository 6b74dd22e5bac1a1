"""No host sync in the fused op's forward and backward, on real tensors, for each backend's host
code (the CUDA backend's in tests/backends/test_cuda.py, through the kernel emulation), and in
``ConvBNReLU``'s forward."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fastres
from fastres.nn import ConvBNReLU
from tests.host_sync import count_host_syncs, op_pass_syncs
from tests.ops.cases import MODES, Case


def test_counter_sees_a_sync_in_fastres_code_only() -> None:
    t = torch.ones(3)
    path = f"{fastres.__path__[0]}/_probe.py"  # code that claims to live in the package
    probe = compile("def probe(t):\n    return t.sum().item() + float(t[0])\n", path, "exec")
    scope: dict = {}
    exec(probe, scope)
    with count_host_syncs() as syncs:
        t.sum().item()  # the test's own: not counted
        scope["probe"](t)
    assert syncs == ["_probe.py:2: item", "_probe.py:2: __float__"]


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_makes_no_host_sync(backend: str, training: bool, grad: bool) -> None:
    syncs = op_pass_syncs(Case(residual=True, bias=True), training, grad, backend)
    assert not syncs, syncs


@pytest.mark.parametrize("momentum", [0.1, None])  # None: 1 / num_batches_tracked stays a tensor
def test_conv_bn_relu_module_makes_no_host_sync(momentum: float | None) -> None:
    m = ConvBNReLU(4, 8, 3, padding=1, momentum=momentum)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with count_host_syncs() as syncs:
        for _ in range(2):
            m(x).sum().backward()
        m.eval()
        with torch.no_grad():
            m(x)
    assert not syncs, syncs


def test_block_with_mixed_momenta_makes_no_host_sync() -> None:
    """A block whose BatchNorms mix ``momentum=None`` (a 0-d tensor factor) with float momenta:
    the running-statistics update never compares a float with the tensor on the host."""
    block = fastres.fuse(torch.nn.Sequential(torchvision.models.resnet.Bottleneck(16, 4)))[0]
    block.bn2.momentum = None
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    with count_host_syncs() as syncs:
        for _ in range(2):
            block(x).sum().backward()
    assert block.block_reason() is None  # the block op served it
    assert not syncs, syncs


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_found_by_structure_makes_no_host_sync(backend: str) -> None:
    """torchvision's RegNetX block, read by structure, through the block op: the checks that
    the block still has its shape at each call stay on the host side."""
    from torchvision.models.regnet import ResBottleneckBlock

    block = fastres.fuse(ResBottleneckBlock(8, 16, 2, torch.nn.BatchNorm2d, torch.nn.ReLU, 4))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with fastres.use_backend(backend), count_host_syncs() as syncs:
        for _ in range(2):
            block(x).sum().backward()
        block.eval()
        with torch.no_grad():
            block(x)
    assert block.block_reason() is None  # the block op served it
    assert not syncs, syncs
