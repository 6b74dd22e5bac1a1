"""Fused residual blocks: torchvision's keys, torchvision's function, and pre-activation math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tv = pytest.importorskip("torchvision.models.resnet")  # absent on the GPU machines

from fastres.nn import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from tests.models._util import check_equivalent, randomize_bn
from tests.numerics import assert_close_ratio


def tv_projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(tv.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# (torchvision block, fastres block, in_channels, channels, stride, groups, base_width)
CASES = [
    ("basic-identity", tv.BasicBlock, BasicBlock, 16, 16, 1, 1, 64),
    ("basic-proj-s2", tv.BasicBlock, BasicBlock, 8, 16, 2, 1, 64),
    ("bottleneck-proj", tv.Bottleneck, Bottleneck, 16, 8, 1, 1, 64),
    ("bottleneck-identity", tv.Bottleneck, Bottleneck, 32, 8, 1, 1, 64),
    ("resnext-s2", tv.Bottleneck, Bottleneck, 32, 16, 2, 8, 8),
    ("wide-s2", tv.Bottleneck, Bottleneck, 16, 8, 2, 1, 128),
]


def build_pair(case):
    _, tv_cls, fr_cls, cin, ch, stride, groups, base_width = case
    cout = ch * tv_cls.expansion
    ds = tv_projection(cin, cout, stride) if stride != 1 or cin != cout else None
    kw = {"groups": groups, "base_width": base_width}
    original = randomize_bn(tv_cls(cin, ch, stride, ds, **kw))
    fused = fr_cls(cin, ch, stride, **kw)
    fused.load_state_dict(original.state_dict())
    return original, fused, cin


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_keys_and_parameters_as_torchvision(case):
    original, fused, _ = build_pair(case)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in original.named_buffers()]
    assert isinstance(fused.conv1, nn.Conv2d) and type(fused.bn1) is nn.BatchNorm2d
    # every conv + BN pair runs fused (the projection too)
    expected = {"conv1", "conv2"} | ({"conv3"} if isinstance(fused, Bottleneck) else set())
    if original.downsample is not None:
        expected.add("downsample")
    assert set(fused._views) == expected and not fused.unfused_reasons


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_matches_torchvision(case, train):
    original, fused, cin = build_pair(case)
    x = torch.randn(3, cin, 9, 9)
    check_equivalent(original, fused, x, train=train)


def test_replaced_child_is_fused_again_or_runs_unfused_never_stale():
    """After a child is swapped, its pair runs the new module: fused again when it can be
    (a BatchNorm2d, a SyncBatchNorm), else unfused through the new module, with the reason."""
    original, fused, cin = build_pair(CASES[1])
    new_bn = randomize_bn(nn.BatchNorm2d(16), seed=5)
    fused.bn1 = new_bn
    original.bn1 = copy.deepcopy(new_bn)
    x = torch.randn(2, cin, 8, 8)
    check_equivalent(original.eval(), fused.eval(), x, train=False, backward=False)
    assert fused._views["conv1"].bn is new_bn
    # a module the fused op cannot serve: that pair runs unfused from now on
    odd = nn.Sequential(copy.deepcopy(new_bn))  # any non-BatchNorm module in bn1's place
    fused.bn1, original.bn1 = odd, copy.deepcopy(odd)
    check_equivalent(original.eval(), fused.eval(), x, train=False, backward=False)
    assert "conv1" not in fused._views and "Sequential" in fused.unfused_reasons["conv1"]


def test_sync_batchnorm_pairs_are_fused():
    block = nn.SyncBatchNorm.convert_sync_batchnorm(BasicBlock(8, 8))
    block.set_fused(True)
    assert set(block._views) == {"conv1", "conv2"} and not block.unfused_reasons
    assert all(type(v.bn) is nn.SyncBatchNorm for v in block._views.values())


# ---- pre-activation blocks against a plain functional statement of He et al. (2016) ----------


def preact_reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-activation unit written out with torch.nn.functional on the block's parameters."""

    def bn(m, t):
        if m.training:
            m.num_batches_tracked.add_(1)
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, m.training,
                            m.momentum, m.eps)

    def conv(m, t):
        return F.conv2d(t, m.weight, None, m.stride, m.padding, m.dilation, m.groups)

    a = x if block.bn1 is None else F.relu(bn(block.bn1, x))
    shortcut = x if block.downsample is None else conv(block.downsample, a)
    h = F.relu(bn(block.bn2, conv(block.conv1, a)))
    if isinstance(block, PreActBottleneck):
        h = F.relu(bn(block.bn3, conv(block.conv2, h)))
        return conv(block.conv3, h) + shortcut
    return conv(block.conv2, h) + shortcut


class Functional(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return preact_reference(self.block, x)


PREACT_CASES = [
    ("basic-identity", PreActBasicBlock, 16, 16, 1, {}),
    ("basic-proj-s2", PreActBasicBlock, 8, 16, 2, {}),
    ("basic-no-preact", PreActBasicBlock, 8, 16, 1, {"preact": False}),
    ("bottleneck-proj-s2", PreActBottleneck, 16, 8, 2, {}),
    ("bottleneck-identity", PreActBottleneck, 32, 8, 1, {}),
    ("bottleneck-grouped", PreActBottleneck, 32, 16, 2, {"groups": 4, "base_width": 16}),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", PREACT_CASES, ids=[c[0] for c in PREACT_CASES])
def test_preact_block_matches_functional_definition(case, train):
    _, cls, cin, ch, stride, kw = case
    fused = randomize_bn(cls(cin, ch, stride, **kw))
    original = Functional(copy.deepcopy(fused))
    fused_wrapped = Functional(fused)
    fused_wrapped.forward = fused.forward  # same keys ("block.*"), fused forward
    assert fused._views  # conv1+bn2+relu (and conv2+bn3+relu) are fused
    x = torch.randn(2, cin, 9, 9)
    check_equivalent(original, fused_wrapped, x, train=train)


def test_wrn_dropout_block_trains_and_is_identity_in_eval():
    block = randomize_bn(PreActBasicBlock(8, 8, dropout=0.3))
    assert isinstance(block.dropout, nn.Dropout)
    x = torch.randn(2, 8, 8, 8)
    block.eval()
    ref = Functional(copy.deepcopy(block)).eval()
    with torch.no_grad():
        assert_close_ratio("eval", block(x), ref.double()(x.double()), ref.float()(x))
    block.train()
    y1, y2 = block(x), block(x)
    assert not torch.equal(y1, y2)  # dropout is live in training


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="groups=1"):
        BasicBlock(8, 8, groups=2)
    with pytest.raises(ValueError, match="width is 0"):
        Bottleneck(8, 8, groups=2, base_width=4)


# ---- one tiny run through the Triton kernels (under the interpreter on CPU) -----------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bottleneck_on_triton_backend(train):
    import fastres
    from fastres import backends

    if backends.load("triton") is None:
        pytest.skip(f"triton backend unavailable: {backends.load_error('triton')}")
    case = ("resnext-s2", tv.Bottleneck, Bottleneck, 16, 8, 2, 4, 16)
    original, fused, cin = build_pair(case)
    with fastres.use_backend("triton"):
        check_equivalent(original, fused, torch.randn(2, cin, 6, 6), train=train)
