"""fastres.models: every factory runs; torchvision-named ones are torchvision's models, fused."""

from __future__ import annotations

import copy

import pytest
import torch

torchvision = pytest.importorskip("torchvision")  # absent on the GPU machines
from torch import nn

import fastres
from fastres import models
from fastres.nn import FusedBlock, PreActBasicBlock, PreActBottleneck
from tests.models._util import check_equivalent, check_sgd_step, randomize_bn
from tests.numerics import assert_close_ratio

TORCHVISION_NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
PREACT_NAMES = ["preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
                "preact_resnet152"]
CIFAR_NAMES = ["wrn28_10", "preact_resnet164", "preact_resnet1001"]

# narrow versions for forward runs on 2 CPU cores (the real widths are checked on "meta")
NARROW = {"base_channels": 16}
CIFAR_NARROW = {"wrn28_10": {"base_channels": 2}, "preact_resnet164": {"base_channels": 4},
                "preact_resnet1001": {"base_channels": 2}}


def plain_copy(model: nn.Module) -> nn.Module:
    """The same model running every conv → BN → ReLU in plain PyTorch."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, FusedBlock):
            m.set_fused(False)
    return model


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_layout_at_full_size(name):
    """Same keys, shapes and parameter count as torchvision's model (built on meta: no memory)."""
    with torch.device("meta"):
        ours = getattr(models, name)()
        theirs = getattr(torchvision.models, name)()
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize(("name", "millions"), [
    ("wrn28_10", 36.5), ("preact_resnet164", 1.7), ("preact_resnet1001", 10.3),
    ("preact_resnet50", 25.5),
])
def test_paper_sizes(name, millions):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.02)


@pytest.mark.parametrize("name", TORCHVISION_NAMES + PREACT_NAMES + CIFAR_NAMES)
def test_every_factory_runs_and_matches_plain_pytorch(name):
    kw = CIFAR_NARROW.get(name, NARROW)
    model = randomize_bn(getattr(models, name)(num_classes=7, **kw))
    # Eval with random running stats; the 1001-layer net in training mode instead: at init its
    # residual stream grows ~2x per unit without batch statistics and overflows float32.
    model.train(name == "preact_resnet1001")
    fused_blocks = [m for m in model.modules() if isinstance(m, FusedBlock) and m._views]
    assert len(fused_blocks) >= 3
    # eval is per-pixel, so tiny images do (CIFAR nets: 8×8 for the 1001-layer one)
    x = torch.randn(2, 3, *((8, 8) if name == "preact_resnet1001" else (16, 16)))
    with torch.no_grad():
        out = model(x)
        base = plain_copy(model)(x)
        ref = plain_copy(model).double()(x.double())
    assert out.shape == (2, 7)
    assert_close_ratio(name, out, ref, base)


def test_preact_structure():
    model = models.preact_resnet50(base_channels=8)
    first = model.layer1[0]
    assert isinstance(first, PreActBottleneck) and first.bn1 is None  # stem's BN+ReLU feeds it
    assert all(b.bn1 is not None for b in list(model.layer1)[1:])
    assert model.bn_final is not None and model.maxpool is not None
    wrn = models.wrn28_10(dropout=0.3, base_channels=2)
    assert isinstance(wrn.layer1[0], PreActBasicBlock)
    assert all(isinstance(b.dropout, nn.Dropout) for s in (wrn.layer1, wrn.layer2, wrn.layer3)
               for b in s)
    assert wrn.fc.in_features == 2 * 4 * 10 and len(wrn.layer3) == 4


# resnext50_32x4d / wide_resnet50_2 weights: same keys and shapes (test_torchvision_layout...),
# and their blocks against torchvision's in tests/nn/test_blocks.py and tests/test_swap.py
@pytest.mark.parametrize("name", ["resnet50"])
def test_loads_torchvision_weights_and_matches_eval(name):
    original = randomize_bn(getattr(torchvision.models, name)(num_classes=10))
    ours = getattr(models, name)(num_classes=10)
    ours.load_state_dict(original.state_dict())
    check_equivalent(original, ours, torch.randn(2, 3, 32, 32), train=False, backward=False)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_matches_torchvision_with_gradients(train):
    original = randomize_bn(torchvision.models.resnet18(num_classes=10))
    ours = models.resnet18(num_classes=10)
    ours.load_state_dict(original.state_dict())
    # 64×64 so that layer4's batch statistics see 8 values per channel, not a degenerate 2
    check_equivalent(original, ours, torch.randn(2, 3, 64, 64), train=train)


def test_state_dict_round_trip():
    original = randomize_bn(torchvision.models.resnet18())
    ours = models.resnet18()
    ours.load_state_dict(original.state_dict())
    back = torchvision.models.resnet18()
    back.load_state_dict(ours.state_dict())
    for (k1, v1), (k2, v2) in zip(original.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_sgd_step_matches_torchvision():
    original = randomize_bn(torchvision.models.resnet18(num_classes=5))
    ours = models.resnet18(num_classes=5)
    ours.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    check_sgd_step(original, ours, x, torch.randint(0, 5, (2,)))


def test_zero_init_residual():
    model = models.resnet50(base_channels=16, zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in model.layer1)
    assert model.layer1[0].bn1.weight.all()


def test_dilation_matches_torchvision():
    original = randomize_bn(torchvision.models.resnet50(
        num_classes=4, replace_stride_with_dilation=[False, True, True]))
    ours = models.resnet50(num_classes=4, replace_stride_with_dilation=[False, True, True])
    ours.load_state_dict(original.state_dict())
    check_equivalent(original, ours, torch.randn(1, 3, 32, 32), train=False, backward=False)


def test_module_in_fastres_namespace():
    assert fastres.models.resnet50 is models.resnet50
