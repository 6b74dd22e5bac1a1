"""Residual blocks found by structure (fastres.nn.graph_block): torchvision's RegNetX and RegNetY
blocks, timm's RegNet Bottleneck (with and without SE) and ByobNet blocks with ReLU train and infer
as one block op, on the reference and triton backends, against float64 by the error-ratio rule;
everything else keeps its per-layer fusion and the report names the structural limit."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres.nn.graph import GraphFused
from fastres.nn.graph_block import GraphBlock, read_block
from fastres.swap import fuse_report
from tests.models._util import check_equivalent, randomize_bn
from tests.ops.test_block import _run_steps, _shift_bn, compare_steps

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CL = torch.channels_last


def fuse_quietly(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastres.fuse(model, **kw)


def tv_regnet_block(width_in: int, width_out: int, stride: int, group_width: int,
                    se_ratio: float | None = None, act: type = nn.ReLU) -> nn.Module:
    """torchvision's RegNet ``ResBottleneckBlock`` (RegNetX; with ``se_ratio`` RegNetY)."""
    from torchvision.models.regnet import ResBottleneckBlock

    return ResBottleneckBlock(width_in, width_out, stride, nn.BatchNorm2d, act,
                              group_width=group_width, se_ratio=se_ratio)


def timm_regnet_block(in_chs: int, out_chs: int, stride: int, group_size: int,
                      drop_path_rate: float = 0.0, se_ratio: float = 0.0) -> nn.Module:
    """timm's RegNet ``Bottleneck``: ConvNormAct with BatchNormAct2d; with ``se_ratio``
    RegNetY's SEModule between conv2 and conv3."""
    from timm.models.regnet import Bottleneck

    return Bottleneck(in_chs, out_chs, stride, group_size=group_size, se_ratio=se_ratio,
                      drop_path_rate=drop_path_rate)


def timm_byob_basic(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """timm ByobNet ``BasicBlock`` with ReLU (gernet's) and the avg-pool shortcut."""
    from timm.models.byobnet import BasicBlock, LayerFn

    return BasicBlock(in_chs, out_chs, stride=stride, downsample="avg", layers=LayerFn())


# (block, input channels, size, seeded: its drop path draws per step)
CASES = {
    "tv-regnetx-proj-s2": (lambda: tv_regnet_block(8, 16, 2, 4), 8, 7, False),
    "tv-regnetx-identity": (lambda: tv_regnet_block(16, 16, 1, 8), 16, 5, False),
    "timm-regnetx-proj-s2-drop-path": (lambda: timm_regnet_block(8, 16, 2, 4, 0.3), 8, 7, True),
    "timm-byob-basic-avgpool-s2": (lambda: timm_byob_basic(8, 12, 2), 8, 8, False),
    # RegNetY: the SE gate between conv b and conv c, in the block op
    "tv-regnety-se-proj-s2": (lambda: tv_regnet_block(8, 16, 2, 4, se_ratio=0.25), 8, 7, False),
    "tv-regnety-se-identity": (lambda: tv_regnet_block(16, 16, 1, 4, se_ratio=0.25), 16, 5,
                               False),
    "timm-regnety-se-proj-s2-drop-path": (
        lambda: timm_regnet_block(8, 16, 2, 4, 0.3, se_ratio=0.25), 8, 7, True),
}


def _build(name: str) -> tuple[nn.Module, int, int, bool]:
    make, cin, hw, seeded = CASES[name]
    return _gated(_shift_bn(randomize_bn(make()))), cin, hw, seeded


def _gated(block: nn.Module) -> nn.Module:
    """``block`` with its SE's weights scaled up: a gate that varies over samples and channels
    (at init it is ~0.5 everywhere)."""
    for m in block.modules():
        if type(m).__name__ in ("SqueezeExcitation", "SEModule"):
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(3.0)
    return block


def _served(block: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    with fastres.backends.record_calls() as calls:
        block(x.clone().requires_grad_()).sum().backward()
    return [(c.direction, c.op) for c in calls]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_block_trains_and_infers_as_one_block_op(name: str, backend: str) -> None:
    """Two training steps (output, input and parameter gradients), the running statistics and
    an eval forward of the fused block through the block op, against float64 and plain PyTorch
    in float32; parameter names unchanged; one block op per forward and per backward."""
    check_graph_block(*_build(name), backend)


# ImageNet sizes (regnet_y_400mf's stage 2 and 3 blocks, timm regnety_008's stage 2 with drop
# path): N·H·W tiles cross image boundaries, where the gate changes per sample
GPU_CASES = {
    "tv-regnety-stage2-proj": (lambda: tv_regnet_block(48, 104, 2, 8, se_ratio=0.25), 48, 56,
                               False),
    "tv-regnety-stage3-identity": (lambda: tv_regnet_block(208, 208, 1, 8, se_ratio=0.25), 208,
                                   14, False),
    "timm-regnety-stage2-drop-path": (
        lambda: timm_regnet_block(64, 128, 2, 16, 0.1, se_ratio=0.25), 64, 56, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "dtype"), [
    ("tv-regnety-stage2-proj", torch.bfloat16), ("tv-regnety-stage3-identity", torch.float32),
    ("tv-regnety-stage3-identity", torch.bfloat16),
    ("timm-regnety-stage2-drop-path", torch.bfloat16)])
def test_regnety_block_on_cuda(name: str, dtype: torch.dtype) -> None:
    """RegNetY blocks on the GPU's compiled kernels: the gated conv prologue and wgrad, the
    activation sums and the gate's reduction over real tiles, one step and an eval forward."""
    make, cin, hw, seeded = GPU_CASES[name]
    check_graph_block(_gated(_shift_bn(randomize_bn(make()))), cin, hw, seeded, "triton",
                      steps=1, dtype=dtype, device="cuda", n=4)


def _pre_activation(block: nn.Module, x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The block's input to its final ReLU (its last ReLU module; an SE's own comes before it)
    in a training forward on a copy, seeded as the steps are."""
    block = copy.deepcopy(block).train()
    seen = []
    last = [m for m in block.modules() if isinstance(m, nn.ReLU)][-1]
    last.register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        block(x)
    return seen[0]


def check_graph_block(original: nn.Module, cin: int, hw: int, seeded: bool, backend: str,
                      steps: int = 2, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      n: int | None = None) -> None:
    """``steps`` training steps and an eval forward of ``original`` fused (one block op each)
    against it in float64 (the truth) and in ``dtype`` (the baseline), all on ``device``."""
    fused = fuse_quietly(copy.deepcopy(original)).to(device, dtype)
    assert isinstance(fused, GraphBlock) and isinstance(fused, type(original))
    assert fused.block_reason() is None and fuse_report(fused) == []
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert list(fused.state_dict()) == list(original.state_dict())
    # drop path: three samples, so a draw can drop one and keep another
    n = n or (3 if seeded else 2)
    x = torch.randn(n, cin, hw, hw).to(device, dtype).contiguous(memory_format=CL)
    truth = copy.deepcopy(original).to(device).double()
    baseline = copy.deepcopy(original).to(device, dtype).to(memory_format=CL)
    upstream = torch.randn(truth.eval()(x.double()).shape, dtype=torch.float64).to(device)
    seed = 11 if seeded else None
    if dtype != torch.float32:  # outputs within rounding of the final ReLU's 0 (test_block.py)
        pre_ref = _pre_activation(truth, x.double(), seed)
        band = 2 * (_pre_activation(baseline, x, seed).double() - pre_ref).abs().max().item()
        band += 4 * torch.finfo(dtype).eps * pre_ref.abs().max().item()
        upstream[pre_ref.abs() <= band] = 0.0
    with fastres.backends.record_calls() as served:
        got = _run_steps(fused, x, upstream, steps, backend, seed)
    assert [(c.direction, c.op, c.backend) for c in served] == (
        [("forward", "residual_block", backend), ("backward", "residual_block", backend)] * steps
        + [("forward", "residual_block", backend)]), "the block did not run as one block op"
    want = _run_steps(truth, x.double(), upstream, steps, None, seed)
    base = _run_steps(baseline, x, upstream, steps, None, seed)
    compare_steps(got, want, base, steps)
    for m_f, m_o in zip(fused.modules(), truth.modules()):
        if isinstance(m_f, nn.BatchNorm2d):
            assert int(m_f.num_batches_tracked) == int(m_o.num_batches_tracked) == steps


@pytest.mark.parametrize(("name", "blocks"), [("regnet_x_400mf", 22), ("regnet_y_400mf", 16)])
def test_regnet_model_blocks_are_block_ops_and_unfuse_restores(name: str, blocks: int) -> None:
    """Every block of a torchvision RegNetX / RegNetY (its SE included) is one block op, the
    stem per layer; unfuse gives back the plain classes and strict fusing does not raise."""
    model = randomize_bn(getattr(torchvision.models, name)(num_classes=4))
    before = [(n, type(m)) for n, m in model.named_modules()]
    fused = fastres.fuse(model, strict=True)
    found = [m for m in fused.modules() if isinstance(m, GraphBlock)]
    assert len(found) == blocks and all(b.block_reason() is None for b in found)
    served = _served(fused, torch.randn(2, 3, 32, 32))
    assert served.count(("forward", "residual_block")) == blocks
    assert served.count(("backward", "residual_block")) == blocks
    assert served.count(("forward", "conv_bn_relu")) == 1  # the stem
    fastres.unfuse(fused)
    assert [(n, type(m)) for n, m in fused.named_modules()] == before


def test_regnety_training_step_runs_only_the_gates_own_pytorch_ops(monkeypatch) -> None:
    """Triton backend, seen by the profiler: a RegNetY block's convs and BNs run in its kernels,
    the only PyTorch convolutions are the SE gate's fc1 and fc2 on (N, C, 1, 1). Standalone
    passes: forward the gate's per-sample sums and the join; backward the join's reduction, the
    gate's gradient sums and the reduction that forms conv b's BN gradient through the gate."""
    from tests.backends.test_triton_block import _standalone
    from tests.ops.test_block_gate import profiled_gated_step

    original, cin, hw, _ = _build("tv-regnety-se-proj-s2")
    fused = fuse_quietly(original).train()
    x = torch.randn(2, cin, hw, hw).contiguous(memory_format=CL).requires_grad_()
    _, backward = profiled_gated_step(fused, x, monkeypatch)
    assert _standalone(backward) == {"_bn_bwd_reduce_kernel": 2}, backward
    assert all(p.grad is not None for p in fused.f.se.parameters())


@pytest.mark.parametrize("name", ["tv-regnety-se-proj-s2", "timm-regnety-se-proj-s2-drop-path"])
def test_regnety_block_saves_less_than_eager(name: str) -> None:
    """The gated block op keeps the raw conv outputs and per-channel statistics for backward
    (the gate's own (N, C) graph besides), where eager keeps every BN input and output, the
    ReLU outputs and the gated activation."""
    from tests.ops.test_block_modern import seeded_saved_bytes

    original, cin, hw, _ = _build(name)
    fused = fuse_quietly(original).train()
    x = torch.randn(2, cin, hw, hw).contiguous(memory_format=CL)
    fused_bytes, eager_bytes = seeded_saved_bytes(fused, original.train(), x, "reference")
    assert fused_bytes < 0.7 * eager_bytes, (fused_bytes, eager_bytes)


def test_layer_by_layer_and_a_replaced_child_fall_back_to_per_layer_fusion() -> None:
    original, cin, hw, _ = _build("tv-regnetx-proj-s2")
    fused = fuse_quietly(original)
    x = torch.randn(2, cin, hw, hw)
    with fastres.nn.layer_by_layer():
        served = _served(copy.deepcopy(fused), x)  # a copy: its running statistics advance
    assert ("forward", "residual_block") not in served and ("forward", "conv_bn_relu") in served
    # the ReLU between conv b and conv c becomes a SiLU: the block op cannot take it any more
    for m in (original, fused):
        m.f.b[2] = nn.SiLU()
    assert "f.b.2 is a SiLU now" in fused.block_reason()
    assert any("f.b.2 is a SiLU now" in why for _, why in fuse_report(fused))
    assert ("forward", "residual_block") not in _served(copy.deepcopy(fused), x)
    check_equivalent(original, fused, x, train=False, backward=False)
    check_equivalent(original, fused, x, train=True)


def test_sync_batchnorm_conversion_keeps_the_block_op() -> None:
    """convert_sync_batchnorm after fusing replaces the norms: one process, still one block op
    (as for the fastres blocks), the same numbers as the converted eager block."""
    original, cin, hw, _ = _build("tv-regnetx-proj-s2")
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fuse_quietly(original))
    original = nn.SyncBatchNorm.convert_sync_batchnorm(original)
    assert isinstance(fused.f.b[1], nn.SyncBatchNorm) and fused.block_reason() is None
    x = torch.randn(2, cin, hw, hw)
    assert _served(copy.deepcopy(fused), x) == [("forward", "residual_block"),
                                                ("backward", "residual_block")]
    check_equivalent(original, fused, x, train=True)


def test_fused_block_deep_copies_and_pickles_as_a_block() -> None:
    original, cin, hw, _ = _build("timm-byob-basic-avgpool-s2")
    fused = fuse_quietly(original).eval()
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    x = torch.randn(2, cin, hw, hw)
    with torch.no_grad():
        expected = fused(x)
        for twin in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
            assert type(twin) is type(fused) and twin.block_reason() is None
            assert torch.equal(twin(x), expected)
    fastres.unfuse(fused)
    assert type(fused) is type(original) and not isinstance(fused, GraphFused)


# ------------------------------------------------------------------------------------------------
# What is not one block op, and why
# ------------------------------------------------------------------------------------------------


class NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TwoConvs(nn.Module):
    """Two 4-channel conv + BN pairs; subclasses say how they are joined."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)


class SplitBlock(TwoConvs):
    """Half the channels through two convs, added to the other half (CSP-style split)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(a)))))
        return F.relu(y + b)


class InnerShortcut(TwoConvs):
    """The shortcut is the first conv's activation, not the block input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + h)


class InlineGate(TwoConvs):
    """An SE-style gate written in the block's own forward, not a module the op can call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = h * torch.sigmoid(h.mean((2, 3), keepdim=True))
        return F.relu(self.bn2(self.conv2(h)) + x)


LIMITS = {
    "inline gate": (InlineGate, "a channel gate computed in the block's own forward"),
    "SiLU": (lambda: tv_regnet_block(8, 16, 2, 4, act=nn.SiLU),
             "SiLU activation in a block (block op is ReLU only)"),
    "no add": (NoResidual, "no residual add"),
    "split": (SplitBlock, "a split of the tensor"),
    "inner shortcut": (InnerShortcut, "ReLU activation before the residual add"),
}


@pytest.mark.parametrize("name", list(LIMITS))
def test_report_names_the_structural_limit_and_per_layer_fusion_stays(name: str) -> None:
    make, why = LIMITS[name]
    original = _shift_bn(randomize_bn(make()))
    assert why in read_block(original)
    holder = nn.Sequential(original)  # fused as a child: the report names its path
    fused = fuse_quietly(holder)
    notes = [(p, w) for p, w in fuse_report(fused) if w.startswith("runs layer by layer")]
    assert len(notes) == 1 and notes[0][0] == "0" and why in notes[0][1], notes
    assert not isinstance(fused[0], GraphBlock)
    cin = next(m for m in original.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, cin * (2 if name == "split" else 1), 6, 6)
    with fastres.backends.record_calls() as calls:
        copy.deepcopy(fused)(x)  # a copy: its running statistics advance
    assert not any(c.op == "residual_block" for c in calls)
    assert any(c.op == "conv_bn_relu" for c in calls)  # still fused per layer
    check_equivalent(holder, fused, x, train=False, backward=False)
