"""CUDA graphs (GPU only): a fused model's inference and training step captured with
``torch.cuda.graph`` and replayed on new data give what the same steps give run eagerly.

Capture fails on any host synchronisation or capture-unsafe allocation in the forward, backward
or optimizer step, so these tests also prove there is none on the GPU path. Replay and eager run
the same kernels (one Triton configuration per shape under ``FASTRES_TRITON_AUTOTUNE=0``, as the
GPU check runs; deterministic cuDNN for PyTorch's convolution backward), so they agree to
rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from tests.models._util import randomize_bn

tv = pytest.importorskip("torchvision.models.resnet")

pytestmark = pytest.mark.gpu
BACKENDS = ["triton", "cuda"]
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32, same kernels: rounding-order differences at most


def fused_model() -> nn.Module:
    # stem, basic blocks, projection shortcuts: every fused call kind of a ResNet
    model = randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10))
    return fastres.fuse(model).cuda()


def warm_up(step, times: int = 3) -> None:
    """Run ``step`` on a side stream first (autotuning, lazy allocations), as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(side)


@pytest.fixture(autouse=True)
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_capture_and_replay(backend):
    model = fused_model().eval()
    static_x = torch.randn(8, 3, 64, 64, device="cuda")
    with fastres.use_backend(backend), torch.no_grad():
        warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, model(x), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_capture_and_replay(backend):
    model = fused_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    static_x = torch.randn(8, 3, 64, 64, device="cuda")
    static_target = torch.randint(0, 10, (8,), device="cuda")

    def step(m: nn.Module, opt: torch.optim.Optimizer, x, target) -> torch.Tensor:
        loss = nn.functional.cross_entropy(m(x), target)
        loss.backward()
        opt.step()
        return loss

    def eager_step(m, opt, x, target) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        return step(m, opt, x, target)

    with fastres.use_backend(backend):
        warm_up(lambda: eager_step(model, optimizer, static_x, static_target))
        # the eager twin starts where the captured model starts (capture itself runs nothing)
        twin = copy.deepcopy(model)
        twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=1e-4)
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(model, optimizer, static_x, static_target)
        for _ in range(3):
            x, target = torch.randn_like(static_x), torch.randint_like(static_target, 0, 10)
            static_x.copy_(x)
            static_target.copy_(target)
            graph.replay()
            torch.testing.assert_close(static_loss, eager_step(twin, twin_optimizer, x, target),
                                       **TOL)
    replayed, eager = model.state_dict(), twin.state_dict()
    assert list(replayed) == list(eager)
    for key, value in replayed.items():  # weights, running statistics, num_batches_tracked
        torch.testing.assert_close(value, eager[key], **TOL, msg=key)
