"""Block-fused training at the model level: fused torchvision / timm / fastres models train like
eager PyTorch for several SGD steps, keep no inner activation for backward, and say which blocks
run layer by layer and why. (Kernel-level checks: tests/ops/test_block.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres.benchmark.memory import saved_bytes
from fastres.nn import Bottleneck, PreActBottleneck
from tests.models._util import check_sgd_step, randomize_bn

tv = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

CL = torch.channels_last


def _served_ops(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    with fastres.backends.record_calls() as calls:
        model(x).sum().backward()
    return [(c.direction, c.op) for c in calls]


MODELS = {
    "resnet50": lambda: tv.resnet50(num_classes=5),
    "resnext50_32x4d": lambda: tv.resnext50_32x4d(num_classes=5),
    "timm_resnetv2_50": lambda: timm.create_model("resnetv2_50", num_classes=5),
}


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_trains_like_eager_for_several_sgd_steps(name: str) -> None:
    """Loss and every gradient at each of three steps, then the parameters and running
    statistics, against the float64 model, with every residual block one block op."""
    original = randomize_bn(MODELS[name]())
    fused = fastres.fuse(original)
    x = torch.randn(2, 3, 64, 64)
    blocks = sum(isinstance(m, fastres.nn.FusedBlock) and m.block_reason() is None
                 for m in fused.modules())
    assert blocks >= 16
    served = _served_ops(copy.deepcopy(fused), x)
    assert served.count(("forward", "residual_block")) == blocks
    assert served.count(("backward", "residual_block")) == blocks
    # a small learning rate: at batch 2 larger steps make the trajectory chaotic, and then even
    # plain PyTorch in fp32 parts from float64 by more than any tolerance
    check_sgd_step(original, fused, x, torch.randint(0, 5, (2,)), steps=3, lr=0.01)


def _block_saved_bytes(block: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(what the block op saves, the exact expectation: the input, the raw output of every
    conv a BatchNorm reads, the post-activation output, and (K,) fp32 mean and var per BN)."""
    got = saved_bytes(block, x)
    plain = copy.deepcopy(block).set_fused(False)
    convs, norms, proj, preact = plain.block_layout()[:4]
    reads = convs[:-1] if preact else [*convs, *([proj] if proj is not None else [])]
    raw: list[int] = []
    for conv in reads:
        conv.register_forward_hook(lambda m, i, o: raw.append(o.numel()))
    with torch.no_grad():
        out = plain(x)
    k_total = sum(n.num_features for n in norms)
    elt = x.element_size()
    expected = x.numel() * elt + sum(raw) * elt + 2 * 4 * k_total
    if not preact:
        expected += out.numel() * elt
    return got, expected


@pytest.mark.parametrize("preact", [False, True], ids=["bottleneck", "preact-bottleneck"])
def test_block_saves_raw_outputs_and_statistics_only(preact: bool) -> None:
    """No inner activation is kept: the saved bytes of a block are exactly its input, its raw
    conv outputs, its output (post-activation) and two fp32 vectors per BatchNorm."""
    cls = PreActBottleneck if preact else Bottleneck
    block = randomize_bn(cls(32, 16, stride=2)).train()
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=CL).requires_grad_()
    got, expected = _block_saved_bytes(block, x)
    assert got == expected


# Saved for backward, fastres vs eager, same model, batch and dtype (CPU, fp32, batch 2, 64²).
# Issue 10: without the inner activations ≈ 0.84 for ResNet-50, ≈ 0.75 for ResNeXt-50.
RATIO_BOUNDS = {"resnet50": 0.86, "resnext50_32x4d": 0.78, "preact_resnet50": 0.62}


@pytest.mark.parametrize("name", RATIO_BOUNDS)
def test_saved_bytes_ratio_against_eager(name: str) -> None:
    if name.startswith("preact"):
        fused = fastres.models.preact_resnet50(num_classes=5).train()
        eager = copy.deepcopy(fused)
        for m in eager.modules():
            if isinstance(m, fastres.nn.FusedBlock):
                m.set_fused(False)
    else:
        eager = getattr(tv, name)(num_classes=5).train()
        fused = fastres.fuse(eager)
    x = torch.randn(2, 3, 64, 64)
    ratio = saved_bytes(fused, x) / saved_bytes(eager, x)
    assert ratio <= RATIO_BOUNDS[name], f"{name}: fastres saves {ratio:.3f}x eager's bytes"


def test_fuse_report_names_blocks_that_train_layer_by_layer() -> None:
    """A Wide ResNet block with active dropout and a conv with a bias run layer by layer (their
    pairs still fused); fuse_report says which and why."""
    model = fastres.models.wrn28_10(num_classes=10, dropout=0.3)
    block = model.layer1[0]
    assert block.block_reason() == "dropout between the convolutions is active"
    notes = dict(fastres.swap.fuse_report(model))
    assert notes["layer1.0"] == "runs layer by layer: dropout between the convolutions is active"
    model.eval()
    assert block.block_reason() is None
    r = tv.resnet18()
    r.layer1[0].conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=True)
    fused = fastres.fuse(r)
    assert ("layer1.0", "runs layer by layer: a convolution has a bias") in (
        fastres.swap.fuse_report(fused))


def test_layer_by_layer_switch_forces_the_per_layer_op_in_this_thread_only() -> None:
    """``fastres.nn.layer_by_layer()``: the per-layer baseline of the block-level benchmark.
    The same block, same result; inside, every pass is a ``conv_bn_relu``, never a block op;
    it nests, ends with its ``with`` block, and another thread is not affected."""
    import threading

    from fastres.nn.blocks import forced_layer_by_layer

    block = randomize_bn(Bottleneck(16, 8, stride=2)).to(memory_format=CL)
    x = torch.randn(2, 16, 8, 8).to(memory_format=CL)
    fused_ops = _served_ops(copy.deepcopy(block), x)
    assert fused_ops == [("forward", "residual_block"), ("backward", "residual_block")]
    with fastres.nn.layer_by_layer():
        with fastres.nn.layer_by_layer():
            assert forced_layer_by_layer()
        assert forced_layer_by_layer()  # nested: still on after the inner one
        seen = []
        other = threading.Thread(target=lambda: seen.append(forced_layer_by_layer()))
        other.start()
        other.join()
        assert seen == [False]
        layer_ops = _served_ops(copy.deepcopy(block), x)
        out_layer = copy.deepcopy(block)(x)
    assert not forced_layer_by_layer()
    # conv1, conv2, conv3 and the projection: one forward and one backward each
    assert sorted(layer_ops) == sorted([("forward", "conv_bn_relu")] * 4
                                       + [("backward", "conv_bn_relu")] * 4)
    torch.testing.assert_close(out_layer, copy.deepcopy(block)(x), rtol=1e-5, atol=1e-5)
    assert _served_ops(copy.deepcopy(block), x) == fused_ops
