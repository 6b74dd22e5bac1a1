"""``fastres.summary`` and ``fastres summary``: rows, exact totals, the fused dispatch column."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastres
from fastres import cli

torchvision = pytest.importorskip("torchvision")


def pytorch_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """PyTorch's own FLOP count (2 per multiply-add of conv and matmul) of the plain model."""
    shadow = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        shadow(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def output_shapes(model: nn.Module, shape: tuple[int, ...], names: list[str]) -> dict:
    shapes = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        model.eval()(torch.randn(shape))
    return shapes


def test_resnet18_totals_rows_and_fused_column():
    plain = torchvision.models.resnet18()
    fused = fastres.fuse(plain)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    s = fastres.summary(fused, (3, 224, 224), batch_size=2, device="cuda", print_summary=False)
    assert s.total_params == 11_689_512 == s.trainable_params
    assert sum(r.params for r in s.rows) == s.total_params
    assert s.total_flops == pytorch_flops(plain, (2, 3, 224, 224))
    rows = {r.name: r for r in s.rows}
    assert list(rows)[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert list(rows)[-2:] == ["avgpool", "fc"]
    expected = output_shapes(plain, (2, 3, 224, 224), list(rows))
    assert {name: r.output_shape for name, r in rows.items()} == expected
    # static dispatch for a CUDA device (no GPU needed): auto prefers triton
    assert rows["conv1"].fused == {"triton gemm_flat, BN folded": 1}  # 3 input channels
    assert rows["layer1.0"].fused == {"triton gemm, BN folded": 2}
    assert rows["layer2.0"].fused == {"triton gemm, BN folded": 3}  # + projection shortcut
    assert not rows["fc"].fused and rows["fc"].flops == 2 * 2 * 512 * 1000
    assert "11,689,512" in str(s)
    # the model itself is untouched (the pass ran on a meta copy)
    assert all(torch.equal(v, state[k]) and v.device.type == "cpu"
               for k, v in fused.state_dict().items())


def test_grouped_training_and_backend_choice():
    model = fastres.models.resnext50_32x4d(num_classes=10)
    s = fastres.summary(model, (3, 64, 64), batch_size=2, device="cuda", training=True,
                        dtype=torch.bfloat16, print_summary=False)
    rows = {r.name: r for r in s.rows}
    # a fastres model runs its stem in its own forward: charged to a first row
    assert s.rows[0].name == "(ResNet.forward)" and rows["conv1"].output_shape is None
    assert rows["(ResNet.forward)"].fused == {"triton gemm_flat + BN stats": 1}
    assert rows["layer1.0"].fused == {"triton gemm + BN stats": 3,
                                      "triton direct + BN stats": 1}  # 4 channels per group
    plain = fastres.unfuse(copy.deepcopy(model))
    assert s.total_flops == pytorch_flops(plain, (2, 3, 64, 64))
    with fastres.use_backend("reference"):
        s = fastres.summary(model, (3, 64, 64), device="cuda", print_summary=False)
    assert s.rows[0].fused == {"reference PyTorch conv + BN": 1}


def test_summary_rejects_bad_sizes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="input_size"):
        fastres.summary(model, (224, 224), print_summary=False)
    with pytest.raises(ValueError, match="batch_size"):
        fastres.summary(model, (3, 8, 8), batch_size=0, print_summary=False)


def test_cli_summary(capsys):
    assert cli.main(["summary", "resnet18", "--fused", "--plain", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 11,689,512" in out and "triton gemm, BN folded ×2" in out
    assert cli.main(["summary", "resnet50", "--input", "3,64,64", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "[1, 2048, 2, 2]" in out and "BN folded" not in out
    with pytest.raises(SystemExit, match="C,H,W"):
        cli.main(["summary", "resnet18", "--input", "3x64x64"])
