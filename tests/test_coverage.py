"""Coverage floors of fastres.fuse on the models of issue 18, and the ``fastres coverage``
command. Models are built weights-free on the CPU, each once per session."""

from __future__ import annotations

import functools
import json

import pytest

from fastres.cli import main
from fastres.coverage import build_model, coverage

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
FrozenBatchNorm2d = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d


def frozen_fpn_backbone():
    """fasterrcnn_resnet50_fpn's backbone with its default FrozenBatchNorm2d (what the builder
    makes with pretrained weights; weights=None alone would give BatchNorm2d)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    return _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)


ACCEPTANCE = {
    **{name: functools.partial(build_model, name) for name in (
        "resnet50", "resnext50_32x4d", "regnet_y_400mf", "regnet_x_400mf",
        "deeplabv3_resnet50", "timm:seresnet50", "timm:seresnext26d_32x4d",
        "timm:ecaresnet50d", "timm:resnetrs50", "timm:resnet50d", "timm:resnext50d_32x4d",
        "timm:resnet33ts", "timm:seresnext26ts", "timm:regnety_008", "timm:regnetz_005",
        "timm:resnet50d[drop_path_rate=0.1]", "timm:resnetaa50", "timm:cspresnet50")},
    "fasterrcnn_resnet50_fpn.backbone (FrozenBatchNorm2d)": frozen_fpn_backbone,
}

# Their activation is SiLU: the fused op applies it (not PyTorch after the op).
SILU_MODELS = ["timm:resnet33ts", "timm:seresnext26ts", "timm:regnetz_005"]


@functools.cache
def result(name: str) -> dict:
    return coverage(ACCEPTANCE.get(name, functools.partial(build_model, name))())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACCEPTANCE))
def test_coverage_floor_and_every_unfused_pair_has_a_reason(name):
    r = result(name)
    assert r["conv_norm"] >= 30, r  # the probe found the model's conv → norm pairs
    assert r["fused_per_layer"] >= 0.95 * r["conv_norm"], r
    assert "no reason given" not in r["unfused"], r
    assert r["in_block_ops"] <= r["fused_per_layer"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SILU_MODELS)
def test_silu_is_applied_in_the_op(name):
    r = result(name)
    assert not any("SiLU" in why for why in r["act_outside"]), r["act_outside"]


# ResNet-structured models whose blocks the block op serves whole (ResNet-D's avg-pool shortcut
# and drop path included; RegNetX/Y and ByobNet blocks with ReLU read by structure): at least 90%
# of their convs train inside block ops; SE/ECA gates before the residual add and RegNetY's SE
# between conv b and conv c included.
BLOCK_OP_MODELS = ["resnet50", "resnext50_32x4d", "timm:resnet50d", "timm:resnext50d_32x4d",
                   "timm:resnet50d[drop_path_rate=0.1]", "regnet_x_400mf", "timm:regnetx_002",
                   "regnet_y_400mf", "timm:regnety_008", "timm:gernet_s", "timm:seresnet50",
                   "timm:seresnext26d_32x4d", "timm:ecaresnet50d", "timm:resnetrs50",
                   "fasterrcnn_resnet50_fpn.backbone (FrozenBatchNorm2d)"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BLOCK_OP_MODELS)
def test_block_op_floor(name):
    r = result(name)
    assert r["in_block_ops"] >= 0.9 * r["conv_norm"], r


def test_coverage_command_json_and_text(capsys):
    assert main(["coverage", "timm:resnet18", "timm:seresnet18[drop_path_rate=0.05]",
                 "--json", "--input", "3,32,32"]) == 0
    out = json.loads(capsys.readouterr().out)
    plain = out["timm:resnet18"]
    assert plain["conv_norm"] == plain["fused_per_layer"] == 20 and not plain["unfused"]
    assert plain["in_block_ops"] == 19  # the stem is fused per layer, every block is one op
    se = out["timm:seresnet18[drop_path_rate=0.05]"]  # the SE gate and drop path in the op
    assert se["fused_per_layer"] == 20 and se["in_block_ops"] == 19 and not se["block_notes"]
    assert main(["coverage", "timm:resnet18", "--input", "3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "conv layers followed by a norm" in text and "100.0%" in text


def test_coverage_names_unfused_pairs_with_their_reason():
    from torch import nn

    class OddBatchNorm2d(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), OddBatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    r = coverage(model, input_size=(3, 16, 16))
    assert r["conv_norm"] == 2 and r["fused_per_layer"] == 1
    assert r["unfused"] == {
        "OddBatchNorm2d is not a plain nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d":
        ["0"]}


def test_build_model_rejects_a_bad_name():
    with pytest.raises(ValueError, match="cannot read model name"):
        build_model("timm:resnet18[")
