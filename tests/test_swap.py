"""fastres.fuse / unfuse on torchvision, timm and plain Sequential models."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastres
from fastres.nn import BasicBlock, Bottleneck
from fastres.swap import FusedPreAct, FusedSequential, FusedStem, FuseError, fuse_report
from tests.models._util import check_equivalent, check_sgd_step, randomize_bn
from tests.numerics import assert_close_ratio

# absent on the GPU machines (no package registry there): the module is skipped
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
tv = pytest.importorskip("torchvision.models.resnet")
FrozenBatchNorm2d = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d


def fuse_quietly(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastres.fuse(model, **kw)


def count(model: nn.Module, *classes) -> int:
    return sum(type(m) in classes for m in model.modules())


TORCHVISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_fused_matches_original_eval(name):
    original = randomize_bn(TORCHVISION[name]()).eval()
    fused = fastres.fuse(original)  # nothing to report: no warning
    assert fuse_report(fused) == []
    assert type(fused.conv1) is FusedStem
    assert count(fused, tv.BasicBlock, tv.Bottleneck) == 0
    assert count(fused, BasicBlock, Bottleneck) == count(original, tv.BasicBlock, tv.Bottleneck)
    assert list(fused.state_dict()) == list(original.state_dict())
    check_equivalent(original, fused, torch.randn(2, 3, 32, 32), train=False, backward=False)


# Training with gradients: full resnet50, and one-block-per-stage torchvision ResNets for the
# ResNeXt and Wide blocks (same torchvision classes, a quarter of the CPU time). resnet18 in
# training: test_sgd_step_matches_and_optimizer_survives_inplace_fuse.
TRAIN = {
    "resnet50": TORCHVISION["resnet50"],
    "resnext50_32x4d-blocks": lambda: tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=10,
                                                groups=32, width_per_group=4),
    "wide_resnet50_2-blocks": lambda: tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=10,
                                                width_per_group=128),
}


@pytest.mark.parametrize("name", list(TRAIN))
def test_torchvision_fused_matches_original_train(name):
    original = randomize_bn(TRAIN[name]())
    fused = fastres.fuse(original)
    # 64×64: layer4's batch statistics see 8 values per channel, not a degenerate 2
    check_equivalent(original, fused, torch.randn(2, 3, 64, 64), train=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_resnet50(train):
    original = randomize_bn(timm.create_model("resnet50", pretrained=False, num_classes=10))
    fused = fastres.fuse(original)
    assert fuse_report(fused) == [] and type(fused.conv1) is FusedStem
    assert count(fused, Bottleneck) == 16
    assert list(fused.state_dict()) == list(original.state_dict())
    check_equivalent(original, fused, torch.randn(2, 3, 64, 64), train=train, backward=train)


def test_timm_resnetv2_preact_and_avg_down():
    for name in ("resnetv2_50", "resnetv2_50d", "resnet26d"):
        original = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
        fused = fuse_quietly(original)
        assert list(fused.state_dict()) == list(original.state_dict())
        assert count(fused, FusedPreAct, Bottleneck) > 0
        check_equivalent(original, fused, torch.randn(2, 3, 32, 32), train=False,
                         backward=False)
    # resnet26d's deep stem: inner conv-bn-relu runs are fused, the last conv+bn1 is reported
    assert any("deep stem" in why for _, why in fuse_report(fused))
    assert count(fused, FusedSequential) == 1


def test_sgd_step_matches_and_optimizer_survives_inplace_fuse():
    original = randomize_bn(torchvision.models.resnet18(num_classes=5))
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,))
    check_sgd_step(original, fastres.fuse(original), x, target)

    model = copy.deepcopy(original)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    assert fastres.fuse(model, inplace=True) is model
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}
    nn.functional.cross_entropy(model(x), target).backward()
    before = model.layer1[0].conv1.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.layer1[0].conv1.weight, before)


def test_state_dict_round_trip_and_named_parameters():
    original = randomize_bn(torchvision.models.resnet18())
    fused = fastres.fuse(torchvision.models.resnet18())
    fused.load_state_dict(original.state_dict())  # torchvision → fused
    back = torchvision.models.resnet18()
    back.load_state_dict(fused.state_dict())  # fused → torchvision
    for (k1, v1), (k2, v2) in zip(original.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    names = [n for n, _ in fused.named_parameters()]
    # the blocks keep torchvision's parameter names; only the fused stem's are nested
    assert names[:3] == ["conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias"]
    assert names[3:] == [n for n, _ in original.named_parameters()][3:]


def test_unfuse_gives_back_plain_modules_with_identical_outputs():
    for make in (lambda: torchvision.models.resnet18(num_classes=4),
                 lambda: timm.create_model("resnetv2_50", pretrained=False, num_classes=4),
                 lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())):
        original = randomize_bn(make()).eval()
        fused = fuse_quietly(original)
        plain = fastres.unfuse(fused)
        assert not any(type(m).__module__.startswith("fastres") for m in plain.modules())
        assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
        assert list(plain.state_dict()) == list(original.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(plain(x), original(x))


def test_unfuse_native_model_runs_plain():
    model = randomize_bn(fastres.models.resnet18(num_classes=4, base_channels=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused_out = model(x)
        fastres.unfuse(model)
        assert all(not m._views for m in model.modules() if isinstance(m, fastres.nn.FusedBlock))
        plain_out = model(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert_close_ratio("native fused vs plain", fused_out, ref, plain_out)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_plain_sequential_runs(train):
    # Conv biases only in eval: in training the BN removes them and their exact gradient is 0,
    # so both results would be rounding noise around 0 and the error ratio would be meaningless.
    bias = not train
    original = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 4, 1, bias=bias), nn.BatchNorm2d(4), nn.ReLU()),
    ))
    fused = fastres.fuse(original)
    assert type(fused) is FusedSequential and type(fused[6]) is FusedSequential
    assert sorted(fused._runs) == [0, 3] and fused._runs[0][1] == 3 and fused._runs[3][1] == 2
    assert list(fused.state_dict()) == list(original.state_dict())
    check_equivalent(original, fused, torch.randn(3, 3, 9, 9), train=train)


def test_strict_lists_every_reason_and_changes_nothing():
    model = timm.create_model("resnet18", pretrained=False, num_classes=4,
                              block_args={"attn_layer": "se"})
    with pytest.raises(FuseError) as err:
        fastres.fuse(model, strict=True, inplace=True)
    message = str(err.value)
    for path in ("layer1.0", "layer1.1", "layer2.0", "layer4.1"):
        assert f"{path}: se (attention) is SEModule" in message
    assert type(model.conv1) is nn.Conv2d  # nothing was changed
    with pytest.warns(UserWarning, match="SEModule"):
        fused = fastres.fuse(model)
    assert len(fuse_report(fused)) == 8
    assert count(fused, BasicBlock) == 0  # every SE block stays timm's
    assert type(fused.conv1) is FusedStem  # the plain stem is still fused


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1), "DropPath"),
    (lambda: timm.create_model("resnet18", pretrained=False, act_layer=nn.SiLU), "SiLU"),
    (lambda: timm.create_model("resnet18", pretrained=False, aa_layer=nn.AvgPool2d),
     "anti-aliasing"),
    (lambda: torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), "FrozenBatchNorm2d"),
    (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18()),
     "SyncBatchNorm"),
])
def test_unfusable_blocks_are_left_with_reason(make, expected):
    model = make()
    fused = fuse_quietly(model)
    reasons = fuse_report(fused)
    assert reasons and all(isinstance(p, str) for p, _ in reasons)
    assert any(expected in why for _, why in reasons), reasons
    for path, _ in reasons:  # every block with a reason stays as it was
        if path != "stem":
            assert type(fused.get_submodule(path)) is type(model.get_submodule(path))


def test_drop_path_zero_is_a_noop_and_fuses():
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.0)
    assert fuse_report(fastres.fuse(model)) == []


def test_compile_fullgraph_forward_backward():
    original = randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4))
    fused = fastres.fuse(original)
    compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for m, inp in ((compiled, x), (fused, x), (copy.deepcopy(original).double(), x.double())):
        inp = inp.clone().requires_grad_()
        y = m(inp)
        y.sum().backward()
        outs.append(y)
        grads.append(inp.grad)
    assert_close_ratio("compiled output", *outs)
    assert_close_ratio("compiled input grad", *grads)


def test_fused_model_pickles_copies_and_unfuses_a_copy():
    original = randomize_bn(torchvision.models.resnet18(num_classes=4)).eval()
    fused = fastres.fuse(original)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(fused)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x)) and torch.equal(twin(x), fused(x))
    plain = fastres.unfuse(twin)
    assert type(plain.conv1) is nn.Conv2d
    plain.load_state_dict(original.state_dict())  # no stem key hooks left on the copy
    assert list(plain.state_dict()) == list(original.state_dict())
    assert list(fused.state_dict()) == list(original.state_dict())  # the fused one keeps its
    assert list(loaded.state_dict()) == list(original.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_fused_torchvision_on_cuda(name, train):
    """The default ("auto") backend on a GPU against float64 on the CPU, PyTorch on the GPU as
    the baseline."""
    original = randomize_bn(TORCHVISION[name]()).cuda()
    fused = fastres.fuse(original)
    check_equivalent(original, fused, torch.randn(4, 3, 64, 64, device="cuda"), train=train)
