"""fastres.fuse / unfuse on torchvision, timm and plain Sequential models."""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastres
from fastres.coverage import fused_convs
from fastres.nn import BasicBlock, Bottleneck
from fastres.nn.stem import FoldedBatchNorm2d, StemConv2d
from fastres.swap import FusedPreAct, FusedSequential, FuseError, fuse_report
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
    assert type(fused.conv1) is StemConv2d
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
    assert fuse_report(fused) == [] and type(fused.conv1) is StemConv2d
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
    # resnet26d's deep stem: the inner conv-bn-relu runs are fused in the Sequential, its last
    # conv with the model's bn1 and act1 across the Sequential's boundary
    assert type(fused.conv1[6]) is StemConv2d and type(fused.bn1) is FoldedBatchNorm2d
    assert count(fused, FusedSequential) == 1
    assert all(why.startswith("runs layer by layer") for _, why in fuse_report(fused))


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


def test_state_dict_round_trip():
    original = randomize_bn(torchvision.models.resnet18())
    fused = fastres.fuse(torchvision.models.resnet18())
    fused.load_state_dict(original.state_dict())  # torchvision → fused
    back = torchvision.models.resnet18()
    back.load_state_dict(fused.state_dict())  # fused → torchvision
    for (k1, v1), (k2, v2) in zip(original.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


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
    assert sorted(fused._runs) == [0, 3]
    assert fused._runs[0].length == 3 and fused._runs[3].length == 2
    assert list(fused.state_dict()) == list(original.state_dict())
    check_equivalent(original, fused, torch.randn(3, 3, 9, 9), train=train)


def se_resnet18_with_odd_norms() -> nn.Module:
    """timm resnet18 with SE blocks (fastres blocks, one block op each with the gate) and two
    BatchNorm2d subclasses, which are never fused (a subclass's forward could differ)."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=4,
                              block_args={"attn_layer": "se"})
    model.layer2[0].bn1 = OddBatchNorm2d(128)
    model.layer4[1].bn2 = OddBatchNorm2d(512)
    return model


def test_strict_lists_every_reason_and_changes_nothing():
    model = se_resnet18_with_odd_norms()
    with pytest.raises(FuseError) as err:
        fastres.fuse(model, strict=True, inplace=True)
    message = str(err.value)
    for path in ("layer2.0.conv1", "layer4.1.conv2"):
        assert f"{path}: OddBatchNorm2d is not a plain nn.BatchNorm2d" in message
    assert "SEModule" not in message  # an SE block is fused per layer: nothing to refuse
    assert type(model.conv1) is nn.Conv2d  # nothing was changed
    with pytest.warns(UserWarning, match="OddBatchNorm2d"):
        fused = fastres.fuse(model)
    report = fuse_report(fused)
    unfused = [r for r in report if not r[1].startswith("runs layer by layer")]
    assert [p for p, _ in unfused] == ["layer2.0.conv1", "layer4.1.conv2"]
    gated = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
             if f"layer{i}.{j}" not in ("layer2.0", "layer4.1")]
    assert [p for p, _ in report if p in gated] == []  # SE-gated blocks train as block ops
    assert all(fused.get_submodule(p).block_reason() is None for p in gated)
    per_layer, _, _ = fused_convs(fused)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and not n.endswith(("fc1", "fc2"))]  # SE's own convs are followed by no norm
    assert sorted(set(convs) - per_layer) == ["layer2.0.conv1", "layer4.1.conv2"]
    # the SE blocks become fastres blocks; the two with an odd norm stay timm's (fused by
    # structure, their other pairs per layer)
    assert sorted(n for n, m in fused.named_modules() if isinstance(m, BasicBlock)) == gated
    assert type(fused.conv1) is StemConv2d  # the plain stem is still fused
    x = torch.randn(2, 3, 32, 32)
    check_equivalent(randomize_bn(model).eval(), fuse_quietly(model).eval(), x, train=False,
                     backward=False)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: timm.create_model("resnet18", pretrained=False, act_layer=nn.SiLU), "SiLU"),
    (lambda: timm.create_model("resnet18", pretrained=False, aa_layer=nn.AvgPool2d),
     "anti-aliasing"),
])
def test_blocks_the_block_op_cannot_take_fuse_per_layer(make, expected):
    """Another activation, anti-aliasing: the block stays
    timm's class as isinstance sees it, its conv + BN pairs run fused by structure, the report
    says why it is not one block op; eval outputs match."""
    model = randomize_bn(make())
    fused = fuse_quietly(model)
    notes = [(p, why) for p, why in fuse_report(fused) if why.startswith("runs layer by layer")]
    assert notes and any(expected in why for _, why in notes), notes
    per_layer, block_op, _ = fused_convs(fused)
    for path, _ in notes:
        block = fused.get_submodule(path)
        assert isinstance(block, type(model.get_submodule(path))) and type(block) is not type(
            model.get_submodule(path))
        assert {f"{path}.conv1", f"{path}.conv2"} <= per_layer
        assert not {f"{path}.conv1", f"{path}.conv2"} & block_op
    check_equivalent(model.eval(), fused.eval(), torch.randn(2, 3, 32, 32), train=False,
                     backward=False)
    plain = fastres.unfuse(fused)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]


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
    plain.load_state_dict(original.state_dict())  # the copy loads plain keys
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


# ------------------------------------------------------------------------------------------------
# A fused model is the same model: names, order, attribute paths, shared tensors, round trips
# ------------------------------------------------------------------------------------------------

FAMILIES = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=4),
    "tv-resnext-blocks": TRAIN["resnext50_32x4d-blocks"],
    "tv-wide-blocks": TRAIN["wide_resnet50_2-blocks"],
    "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=4),
    "timm-resnext50_32x4d": lambda: timm.create_model("resnext50_32x4d", num_classes=4),
    "timm-resnet26d": lambda: timm.create_model("resnet26d", num_classes=4),
    "timm-resnetv2_50": lambda: timm.create_model("resnetv2_50", num_classes=4),
    "sequential": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)), nn.Flatten()),
    "fastres-resnet18": lambda: fastres.models.resnet18(num_classes=4, base_channels=8),
    "fastres-resnext50": lambda: fastres.models.resnext50_32x4d(num_classes=4, base_channels=16),
    "fastres-preact_resnet18": lambda: fastres.models.preact_resnet18(num_classes=4,
                                                                     base_channels=8),
}


def layout(model: nn.Module) -> dict[str, list]:
    """Every name a training script may rely on, in order, with the objects behind them."""
    return {
        "parameters": list(model.named_parameters()),
        "buffers": list(model.named_buffers()),
        "modules": [name for name, _ in model.named_modules()],
        "state_dict": list(model.state_dict(keep_vars=True).items()),
    }


def resolve(model: nn.Module, path: str):
    """``model.a.0.b`` by attribute access, as user code writes it (``model.layer1[0].bn2``)."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def assert_same_layout(before: dict[str, list], fused: nn.Module) -> None:
    after = layout(fused)
    for what in before:
        if what == "modules":
            assert after[what] == before[what], what
            continue
        assert [n for n, _ in after[what]] == [n for n, _ in before[what]], what
        for name, tensor in before[what]:
            assert dict(after[what])[name] is tensor, f"{what} {name}: not the same tensor"
            assert resolve(fused, name) is tensor, f"{name}: attribute path"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuse_keeps_every_name_and_tensor(family):
    model = FAMILIES[family]()
    original_types = [type(m) for m in model.modules()]
    before = layout(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fuse_quietly(model, inplace=True) is model
    assert_same_layout(before, model)
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())
    if family.startswith(("tv", "timm-resnet1", "timm-resnext")):
        assert type(model.conv1) is StemConv2d and type(model.bn1) is FoldedBatchNorm2d
        assert isinstance(model.layer1[0].bn2.weight, nn.Parameter)
    # checkpoints load both ways, strictly, with no hook in between
    fresh = FAMILIES[family]()
    assert not any(m._state_dict_hooks or m._load_state_dict_pre_hooks for m in model.modules())
    model.load_state_dict(randomize_bn(fresh).state_dict())
    back = FAMILIES[family]()
    back.load_state_dict(model.state_dict())
    for (k1, v1), (k2, v2) in zip(fresh.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    fastres.unfuse(model)
    assert [type(m) for m in model.modules()] == original_types
    assert_same_layout(before, model)


def frozen(bn: nn.BatchNorm2d) -> nn.Module:
    out = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(out, name).copy_(getattr(bn, name).detach())
    return out


@pytest.mark.parametrize("replace", ["sync", "frozen"])
def test_stem_bn_replaced_after_fuse(replace):
    """A stem BN replaced after fusing breaks the stem's link. A SyncBatchNorm (eval: it runs on
    CPU) and a FrozenBatchNorm2d are folded in anew at the next call. Either way the output
    is the replaced model's."""
    original = randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4)).eval()
    fused = fastres.fuse(original)
    if replace == "sync":
        fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused).eval()
        assert type(fused.bn1) is nn.SyncBatchNorm and type(fused.conv1) is StemConv2d
    else:
        fused.bn1 = frozen(fused.bn1)
        original.bn1 = frozen(original.bn1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = [fused(x), original(x), copy.deepcopy(original).double()(x.double())]
    assert_close_ratio("output", outs[0], outs[2], outs[1])
    plain = nn.SyncBatchNorm if replace == "sync" else FrozenBatchNorm2d
    assert isinstance(fused.bn1, plain) and type(fused.bn1).__name__ == f"Folded{plain.__name__}"


class OddBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass: its forward could differ, so it is never fused."""


def test_sequential_child_replaced_after_fuse():
    """A FusedSequential finds its runs anew when a child was replaced: a BN fuses again, a
    module the fused op cannot serve runs plain."""
    original = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    fused = fastres.fuse(original)
    new = randomize_bn(nn.BatchNorm2d(8), seed=3)
    fused[1], original[1] = new, copy.deepcopy(new)
    fused[4], original[4] = OddBatchNorm2d(4), OddBatchNorm2d(4)
    check_equivalent(original.eval(), fused.eval(), torch.randn(2, 3, 9, 9), train=False,
                     backward=False)
    assert fused._runs[0].norm is new and 3 not in fused._runs


# ------------------------------------------------------------------------------------------------
# Bad input stays harmless
# ------------------------------------------------------------------------------------------------


def structure(model: nn.Module) -> list[tuple]:
    """Every module's path, object, type, plain attributes and hooks: what fuse could change
    (fuse adds one forward pre-hook and one forward hook on the root: the layout rule)."""
    return [(name, id(m), type(m), sorted(m.__dict__), len(m._state_dict_hooks),
             len(m._load_state_dict_pre_hooks), len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()]


def test_fuse_adds_only_the_root_layout_hooks():
    model = FAMILIES["tv-resnet18"]()
    fused = fuse_quietly(model)
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in fused.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == [("", 1, 1)]
    assert fuse_quietly(fused, inplace=True) is fused  # fusing again keeps the one pair
    assert len(fused._forward_hooks) == len(fused._forward_pre_hooks) == 1
    fastres.unfuse(fused)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fused.modules())


def test_strict_failure_leaves_the_model_untouched():
    # fusable stem, fusable Sequential, fusable blocks, an SE block fused by structure, and one
    # pair that cannot be fused
    model = timm.create_model("resnet18", num_classes=4)
    model.layer3[1] = timm.create_model("resnet18", block_args={"attn_layer": "se"}).layer3[1]
    model.layer3[1].bn2 = OddBatchNorm2d(256)
    model.head_seq = nn.Sequential(nn.Conv2d(512, 8, 1), nn.BatchNorm2d(8))
    before = structure(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FuseError, match=r"layer3\.1\.conv2: OddBatchNorm2d is not"):
        fastres.fuse(model, strict=True, inplace=True)
    assert structure(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["tv-resnet18", "timm-resnetv2_50", "sequential",
                                   "fastres-resnet18"])
def test_fusing_twice_is_a_noop(family):
    model = randomize_bn(FAMILIES[family]()).eval()
    once = fuse_quietly(model)
    after_once = structure(once)
    report = fuse_report(once)
    assert fuse_quietly(once, inplace=True) is once
    assert structure(once) == after_once and fuse_report(once) == report
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(once(x), fuse_quietly(model)(x))


@pytest.mark.parametrize("family", ["tv-resnet18", "timm-resnet26d", "timm-resnetv2_50",
                                    "sequential"])
def test_unfuse_of_fuse_round_trips_the_state_dict(family):
    model = randomize_bn(FAMILIES[family]())
    expected = model.state_dict()
    back = fastres.unfuse(fuse_quietly(model))
    state = back.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in expected.items())
    assert state._metadata == expected._metadata  # per-module versions, as PyTorch saves them
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


def without_num_batches_tracked(state: dict, keep_metadata: bool) -> OrderedDict:
    old = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    if keep_metadata:
        old._metadata = state._metadata
    return old


def test_checkpoint_without_num_batches_tracked_loads_as_in_pytorch():
    """A pre-1.0 checkpoint (no ``num_batches_tracked``, no version metadata) loads strictly and
    keeps the counters; with version-2 metadata the missing keys are an error. Both exactly as
    in the unfused model; then a training step with momentum=None (which reads the counter)."""
    source = randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4))
    plain = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4)
    fused = fastres.fuse(plain)
    for m in (plain, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
                bn.num_batches_tracked.fill_(3)
    errors = []
    for m in (plain, fused):
        with pytest.raises(RuntimeError) as err:
            m.load_state_dict(without_num_batches_tracked(source.state_dict(), True))
        errors.append(str(err.value).replace("fastres", ""))
        m.load_state_dict(without_num_batches_tracked(source.state_dict(), False))
    assert "Missing key(s)" in errors[0] and errors[0] == errors[1]
    assert all(int(t) == 3 for k, t in fused.state_dict().items() if "num_batches" in k)
    check_equivalent(plain, fused, torch.randn(2, 3, 32, 32), train=True)


def test_frozen_batchnorm_pairs_fuse_with_gradients_for_input_and_weight_only():
    """torchvision's FrozenBatchNorm2d (detection backbones): a fixed affine fused per layer, in
    training as in eval; its buffers get no gradient and do not move."""
    original = randomize_bn(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d,
                                                        num_classes=5))
    fused = fuse_quietly(original)
    assert type(fused.conv1) is StemConv2d
    blocks = [m for m in fused.modules() if isinstance(m, fastres.nn.BasicBlock)]
    assert len(blocks) == 8 and all(not b.unfused_reasons for b in blocks)
    check_equivalent(original, fused, torch.randn(2, 3, 48, 48), train=True)
    assert all(b.grad is None for b in fused.buffers())


def test_drop_path_and_avg_down_blocks_become_one_block_op():
    """timm's ResNet-D with drop path: every block a fastres block whose drop path and avg-pool
    shortcut the block op serves (their numerics: tests/ops/test_block_modern.py)."""
    model = timm.create_model("resnet26d", pretrained=False, drop_path_rate=0.1)
    fused = fuse_quietly(model)
    blocks = [m for m in fused.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 8 and all(b.block_reason() is None for b in blocks)
    assert sum(b.block_layout().shortcut_pool is not None for b in blocks) == 3
    assert not any(why.startswith("runs layer by layer") for _, why in fuse_report(fused))
