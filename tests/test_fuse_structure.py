"""fastres.fuse by structure: traced blocks and Sequential subclasses (RegNet, ByobNet, CSP, SE,
drop-path, FrozenBatchNorm2d backbones), the layout rule at the model boundary, numerics."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastres
from fastres.coverage import coverage, fused_convs
from fastres.nn.graph import GraphFused, run_chain
from fastres.nn.graph_block import GraphBlock
from fastres.nn.layout import HOOKS_ATTR
from fastres.swap import FusedSequential, fuse_report
from tests.models._util import check_equivalent, check_sgd_step, randomize_bn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
FrozenBatchNorm2d = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d

CL = torch.channels_last


def fuse_quietly(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastres.fuse(model, **kw)


class Flat(nn.Module):
    """A model returning a dict of feature maps, as one tensor (for the equivalence helpers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return torch.cat([v.flatten(1) for v in out.values()], 1)


class Seeded(nn.Module):
    """Reseeds before each forward: drop-path / dropout draw the same masks in every run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1234)
        return self.model(x)


def no_dropout(model: nn.Module) -> nn.Module:
    """``model`` with its Dropouts at p = 0: eager CPU Dropout draws a different mask for a
    float64 or channels_last input than for an NCHW float32 one under the same seed, so a float64
    truth cannot share the float32 model's mask (the fused model's own mask is eager's: see
    test_deeplabv3_layout_and_dropout_under_a_seed)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def frozen_fpn_backbone() -> nn.Module:
    """fasterrcnn_resnet50_fpn's backbone as torchvision builds it for pretrained weights:
    FrozenBatchNorm2d everywhere (weights=None alone would give BatchNorm2d); every layer
    trainable, so that every conv weight has a gradient to compare."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    return _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 5)


# ------------------------------------------------------------------------------------------------
# What is found, and the model stays the same model
# ------------------------------------------------------------------------------------------------


def test_sequential_subclass_and_traced_block_keep_class_names_and_unfuse():
    model = torchvision.models.regnet_y_400mf(num_classes=4)
    before = [(n, type(m)) for n, m in model.named_modules()]
    params = list(model.named_parameters())
    fused = fuse_quietly(model, inplace=True)
    # every pair fused; each block (its SE gate included) is one block op
    assert fuse_report(fused) == []
    stem = type(model.stem)
    assert isinstance(fused.stem, torchvision.models.regnet.SimpleStemIN)
    assert isinstance(fused.stem, FusedSequential) and stem.__name__ == "FusedSimpleStemIN"
    block = fused.trunk_output.block1[0]
    assert isinstance(block, torchvision.models.regnet.ResBottleneckBlock)
    assert isinstance(block, GraphBlock) and block.block_reason() is None
    assert [(n, p) for n, p in fused.named_parameters()] == params
    assert all(a is b for (_, a), (_, b) in zip(fused.named_parameters(), params))
    # the projection (a Conv2dNormActivation without activation) takes f(x) as its residual
    assert "proj.0+res" in repr(block)
    fastres.unfuse(fused)
    assert [(n, type(m)) for n, m in fused.named_modules()] == before
    assert not fused._forward_hooks and not fused._forward_pre_hooks


def test_fused_traced_model_pickles_and_deep_copies():
    original = randomize_bn(timm.create_model("resnet33ts", num_classes=4)).eval()
    fused = fuse_quietly(original)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(fused)
    assert type(loaded.stages[0][0]) is type(fused.stages[0][0])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fused(x)
        assert torch.equal(loaded(x), expected) and torch.equal(twin(x), expected)
    assert pickle.loads(pickle.dumps(fused.stem)) is not None
    for m in (loaded, twin):  # the layout hooks travel with the model, and unfuse removes them
        assert len(m._forward_hooks) == 1 and len(m._forward_pre_hooks) == 1
        fastres.unfuse(m)
        assert not m._forward_hooks and not m._forward_pre_hooks and HOOKS_ATTR not in m.__dict__
        assert not any(type(s).__module__.startswith("fastres") for s in m.modules())


def test_replaced_child_of_traced_block_runs_as_replaced():
    """The generated forward reaches children through the module: a norm replaced after
    fusing (a subclass the op does not take) runs as itself, the rest stays fused."""
    # SiLU blocks: not a fastres block's ReLU join, so traced
    original = randomize_bn(timm.create_model("seresnet18", num_classes=4,
                                              act_layer=nn.SiLU)).eval()
    fused = fuse_quietly(original)
    block = fused.layer2[1]
    assert isinstance(block, GraphFused)

    class OwnNorm(nn.BatchNorm2d):
        pass

    for m in (original, fused):
        new = OwnNorm(128).eval()
        new.load_state_dict(m.layer2[1].bn1.state_dict())
        m.layer2[1].bn1 = new
    check_equivalent(original, fused, torch.randn(2, 3, 32, 32), train=False, backward=False)


def test_run_chain_adds_a_residual_it_cannot_take():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(6)).eval()
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 1, 1)  # broadcast: added after
    with torch.no_grad():
        out = run_chain(conv, bn, x, residual, "relu")
        expected = torch.relu(bn(conv(x)) + residual)
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------------
# Same outputs, same layout
# ------------------------------------------------------------------------------------------------


def assert_same_layout(eager_out, fused_out) -> None:
    if isinstance(eager_out, dict):
        assert list(eager_out) == list(fused_out)
        for k in eager_out:
            assert_same_layout(eager_out[k], fused_out[k])
        return
    assert eager_out.shape == fused_out.shape
    # the memory order; a size-1 dimension's stride is arbitrary (eager's own varies)
    strides = [[s for s, n in zip(t.stride(), t.shape) if n > 1] for t in (eager_out, fused_out)]
    assert strides[0] == strides[1], (eager_out.stride(), fused_out.stride())
    for fmt in (torch.contiguous_format, CL):
        assert eager_out.is_contiguous(memory_format=fmt) == fused_out.is_contiguous(
            memory_format=fmt)


LAYOUT_MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=4),
    "timm-resnet18d": lambda: timm.create_model("resnet18d", num_classes=4),
    "timm-resnet33ts": lambda: timm.create_model("resnet33ts", num_classes=4),
    "timm-resnetv2_50": lambda: timm.create_model("resnetv2_50", num_classes=4),
    "fpn-frozen": frozen_fpn_backbone,
}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(LAYOUT_MODELS))
def test_output_layout_is_eagers(name, memory_format):
    original = randomize_bn(LAYOUT_MODELS[name]()).eval()
    fused = fuse_quietly(original)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert_same_layout(original(x), fused(x))
        if hasattr(original, "forward_features"):  # bypasses the root's forward (no hooks)
            eager, out = original.forward_features(x), fused.forward_features(x)
            assert_same_layout(eager, out)
            if memory_format == torch.contiguous_format:
                assert out.view(out.shape[0], -1).shape[1] == out[0].numel()


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_deeplabv3_layout_and_dropout_under_a_seed(memory_format):
    """deeplabv3_resnet50 at a tiny size: the head's Dropout (train mode) sees eager's layout,
    so the same seed draws the same mask; the output dict has eager's strides."""
    seg = torchvision.models.segmentation
    original = randomize_bn(seg.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                   num_classes=3))
    fused = fuse_quietly(original)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    outs = []
    for m in (original, fused):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m.train()(x))
    assert_same_layout(*outs)
    eager, out = outs[0]["out"], outs[1]["out"]
    assert out.view(-1).shape[0] == out.numel() or memory_format == CL
    # a different mask would move the output by O(1) (0.93 before the layout rule)
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def test_dropout_after_a_fused_sequential_run_matches_eager_under_a_seed():
    original = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)))
    fused = fuse_quietly(original)
    x = torch.randn(2, 3, 9, 9)
    outs = []
    for m in (original, fused):
        torch.manual_seed(3)
        outs.append(m.train()(x))
    assert outs[0].stride() == outs[1].stride()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Numerics: fused vs eager against float64 (error-ratio rule), eval and a training step
# ------------------------------------------------------------------------------------------------

NUMERICS = {
    "tv-regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=4),
    # RegNetX/Y and ByobNet ReLU blocks train as block ops (read by structure)
    "tv-regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=4),
    "timm-regnetx_002-drop_path": lambda: Seeded(timm.create_model(
        "regnetx_002", num_classes=4, drop_path_rate=0.1)),
    "timm-gernet_s": lambda: timm.create_model("gernet_s", num_classes=4),
    "timm-resnet33ts": lambda: timm.create_model("resnet33ts", num_classes=4),
    "timm-seresnext26d_32x4d": lambda: timm.create_model("seresnext26d_32x4d", num_classes=4),
    "timm-resnet50d-drop_path": lambda: Seeded(timm.create_model(
        "resnet50d", num_classes=4, drop_path_rate=0.1)),
    "timm-cspresnet50": lambda: timm.create_model("cspresnet50", num_classes=4),
    "fpn-frozen": lambda: Flat(frozen_fpn_backbone()),
    # the rest of issue 18's acceptance list (resnetrs50: at this size PyTorch's own fp32
    # gradients are off by up to 2% for most inputs, so its step is checked in float64, in
    # tests/ops/test_block_gate.py)
    "timm-regnety_008": lambda: timm.create_model("regnety_008", num_classes=4),
    "timm-seresnet50": lambda: timm.create_model("seresnet50", num_classes=4),
    "timm-ecaresnet50d": lambda: timm.create_model("ecaresnet50d", num_classes=4),
    "timm-resnext50d_32x4d": lambda: timm.create_model("resnext50d_32x4d", num_classes=4),
    "timm-seresnext26ts": lambda: timm.create_model("seresnext26ts", num_classes=4),
    "timm-regnetz_005": lambda: timm.create_model("regnetz_005", num_classes=4),
    "timm-resnetaa50": lambda: timm.create_model("resnetaa50", num_classes=4),
    "tv-deeplabv3_resnet50": lambda: no_dropout(Flat(
        torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=4, aux_loss=False))),
}


BLOCK_OP_NUMERICS = ("tv-regnet_y_400mf", "tv-regnet_x_400mf", "timm-regnetx_002-drop_path",
                     "timm-gernet_s", "timm-resnet50d-drop_path", "timm-seresnext26d_32x4d")


# seresnext26d at this input: one ReLU input after layer2.1's residual add is -1.9e-8 in float64
# and +1.8e-7 in fp32 (its rounding is ~8e-7), so every fp32 implementation that reaches it with
# the fused model's (equally accurate) upstream rounding takes the other branch: eager fp32 fed the
# fused model's layer2.1 input shows the same 60x gradient error, and giving the float64 truth
# that one fp32 decision brings the fused error to rounding level. A model-level artefact, not
# the block's: its block-level checks (tests/ops/test_block_gate.py) hold. Strict: if it passes,
# this note is stale.
FLIPPED_RELU = pytest.mark.xfail(strict=True, reason="one ReLU input within fp32 rounding of 0 "
                                 "takes the other branch (see the note above)")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=FLIPPED_RELU)
                                  if n == "timm-seresnext26d_32x4d" else n for n in NUMERICS])
def test_numerics_eval_and_train_against_float64(name):
    original = randomize_bn(NUMERICS[name]())
    fused = fuse_quietly(original)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert list(fused.state_dict()) == list(original.state_dict())
    per_layer, block_op, _ = fused_convs(fused)
    assert per_layer  # something is fused
    if name in BLOCK_OP_NUMERICS:  # the step below trains their blocks through the block op
        assert len(block_op) >= 0.9 * len(per_layer), (len(block_op), len(per_layer))
    x = torch.randn(2, 3, 64, 64)
    check_equivalent(original, fused, x, train=False, backward=False)
    if name == "fpn-frozen":  # FrozenBatchNorm2d: no running statistics, a fixed affine
        check_equivalent(original, fused, x, train=True)
        return
    check_sgd_step(original, fused, x, torch.randint(0, 4, (2,)))


def test_frozen_fpn_backbone_fuses_every_pair_including_the_body_stem():
    model = frozen_fpn_backbone()
    result = coverage(model)
    assert result["conv_norm"] == 53 and result["fused_per_layer"] == 53, result
    assert not result["unfused"]
    assert result["in_block_ops"] == 52 and not result["block_notes"], result  # all but the stem


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_frozen_bn_block_trains_as_one_block_op(backend):
    """A torchvision Bottleneck with FrozenBatchNorm2d (detection fine-tuning) is one block op
    on the frozen statistics, in training too: two steps (output, input and conv weight
    gradients; the frozen buffers untouched) and eval against float64 by the error-ratio
    rule."""
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops import FrozenBatchNorm2d

    from tests.ops.test_block import _run_steps, compare_steps

    projection = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), FrozenBatchNorm2d(16))
    original = randomize_bn(Bottleneck(8, 4, 2, projection, norm_layer=FrozenBatchNorm2d))
    fused = fuse_quietly(original)
    assert fused.block_reason() is None
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=CL)
    truth = copy.deepcopy(original).double()
    baseline = copy.deepcopy(original).to(memory_format=CL)
    upstream = torch.randn(truth(x.double()).shape, dtype=torch.float64)
    buffers = {k: v.clone() for k, v in fused.named_buffers()}
    with fastres.backends.record_calls() as served:
        got = _run_steps(fused, x, upstream, 2, backend, None)
    assert [(c.direction, c.op) for c in served] == [
        ("forward", "residual_block"), ("backward", "residual_block")] * 2 + [
        ("forward", "residual_block")]
    compare_steps(got, _run_steps(truth, x.double(), upstream, 2, None, None),
                  _run_steps(baseline, x, upstream, 2, None, None), 2)
    assert all(torch.equal(v, buffers[k]) for k, v in fused.named_buffers())
    fused.bn2 = nn.BatchNorm2d(fused.bn2.weight.shape[0])
    assert "FrozenBatchNorm2d and BatchNorms mixed in one block" in fused.block_reason()


class ResidualBlock(nn.Module):
    """A residual block no class list knows: conv-BN-ReLU, conv-BN, + input, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_a = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_b = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm_a(self.conv_a(x)))
        return torch.relu(self.norm_b(self.conv_b(y)) + x)


def test_traced_block_under_compile_fullgraph():
    from tests.numerics import assert_close_ratio

    original = randomize_bn(nn.Sequential(ResidualBlock(8), nn.Conv2d(8, 4, 1)))
    fused = fuse_quietly(original)
    assert [c.residual for c in fused[0].__dict__["_fastres_graph"].chains] == [False, True]
    assert fused[0].block_reason() is None  # read by structure: the compiled step's block op
    compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 12, 12)
    outs, grads = [], []
    for m, inp in ((compiled, x), (original, x), (copy.deepcopy(original).double(), x.double())):
        inp = inp.clone().requires_grad_()
        y = m(inp)
        y.sum().backward()
        outs.append(y)
        grads.append(inp.grad)
    assert outs[0].stride() == outs[1].stride()
    assert_close_ratio("compiled output", outs[0], outs[2], outs[1])
    assert_close_ratio("compiled input grad", grads[0], grads[2], grads[1])


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace (control flow on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_module_is_left_with_its_reason():
    model = nn.Sequential(DataDependent(), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="cannot be traced"):
        fused = fastres.fuse(model)
    assert [p for p, _ in fuse_report(fused)] == ["0"]
    assert type(fused[0]) is DataDependent and isinstance(fused, FusedSequential)
    result = coverage(model, input_size=(3, 8, 8))
    assert result["fused_per_layer"] == 1 and list(result["unfused"].values()) == [["0.conv"]]
    with pytest.raises(fastres.swap.FuseError, match="0: its conv → norm children"):
        fastres.fuse(model, strict=True)
