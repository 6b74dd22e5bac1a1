"""ResNet, ResNeXt, Wide ResNet and pre-activation ResNets built from fastres' fused blocks.

One class (:class:`ResNet`) and one builder serve every variant; the factories are one line each.
The torchvision-named models (``resnet*``, ``resnext*``, ``wide_resnet*``) have exactly
torchvision's modules and state_dict keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.0``, ``fc``) and the same initialisation, so
``model.load_state_dict(torchvision.models.resnet50().state_dict())`` works as is.

Pre-activation models: the stem is conv + BN + ReLU (fused) and the first block of the first
stage takes that activated output without a BN + ReLU of its own, as in fb.resnet.torch and the
Wide ResNet code. For WRN this is the same function and the same parameters as "bare conv stem,
first block pre-activates" written the other way round. A final BN + ReLU precedes pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..nn.blocks import BasicBlock, Bottleneck, FusedBlock, PreActBasicBlock, PreActBottleneck

Tensor = torch.Tensor
Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]
PREACT_BLOCKS = (PreActBasicBlock, PreActBottleneck)


class ResNet(FusedBlock):
    """A ResNet of ``block`` with ``layers[i]`` blocks in stage ``i``.

    Args:
        block: one of :class:`BasicBlock`, :class:`Bottleneck`, :class:`PreActBasicBlock`,
            :class:`PreActBottleneck`.
        layers: blocks per stage (4 stages for ImageNet models, 3 for CIFAR ones).
        num_classes: outputs of the final ``fc``.
        stem: ``"imagenet"`` (7×7 stride-2 conv, BN, ReLU, 3×3 max-pool) or ``"cifar"`` (3×3
            conv, BN, ReLU).
        base_channels: stem width and first stage's ``channels``; stage ``i`` has
            ``base_channels · 2^i · widen_factor`` (64 for ImageNet, 16 for CIFAR by default).
            Small values make narrow test models.
        widen_factor: Wide ResNet's k on the stage widths (the stem is not widened).
        groups, width_per_group: ResNeXt cardinality and per-group width (torchvision's names).
        replace_stride_with_dilation: per stage 2..4, dilate instead of striding (torchvision).
        zero_init_residual: zero the last BN's γ in each block (post-activation blocks).
        dropout: dropout between the two convs of each :class:`PreActBasicBlock` (Wide ResNet).
        in_channels: image channels.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        stem: str = "imagenet",
        base_channels: int | None = None,
        widen_factor: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if base_channels is None:
            base_channels = 64 if stem == "imagenet" else 16
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False] * (len(layers) - 1)
        if len(replace_stride_with_dilation) != len(layers) - 1:
            raise ValueError(f"replace_stride_with_dilation needs {len(layers) - 1} entries, got "
                             f"{replace_stride_with_dilation!r}")
        preact = block in PREACT_BLOCKS
        self.preact = preact
        block_kwargs: dict[str, Any] = {"groups": groups, "base_width": width_per_group}
        if dropout:
            block_kwargs["dropout"] = dropout

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, base_channels, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None

        self.in_channels = base_channels
        self.dilation = 1
        strides = [1] + [2] * (len(layers) - 1)
        dilate = [False, *replace_stride_with_dilation]
        for i, (n, stride) in enumerate(zip(layers, strides)):
            channels = base_channels * 2**i * widen_factor
            stage = self._make_stage(block, channels, n, stride, dilate[i], block_kwargs,
                                     first_preact=not (preact and i == 0))
            self.add_module(f"layer{i + 1}", stage)
        out_channels = self.in_channels
        # pre-activation nets end in BN + ReLU (plain; see blocks.py on prologue fusion)
        self.bn_final = nn.BatchNorm2d(out_channels) if preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(out_channels, num_classes)
        self.num_stages = len(layers)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual and not preact:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
        self.set_fused(True)

    def _make_stage(self, block: Block, channels: int, n: int, stride: int, dilate: bool,
                    block_kwargs: dict[str, Any], first_preact: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        extra = {} if first_preact else {"preact": False}
        blocks = [block(self.in_channels, channels, stride, dilation=self.dilation,
                        previous_dilation=previous_dilation, **extra, **block_kwargs)]
        self.in_channels = channels * block.expansion
        blocks += [block(self.in_channels, channels, dilation=self.dilation, **block_kwargs)
                   for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {"stem": (self.conv1, self.bn1, True)}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._run("stem", self.conv1, self.bn1, x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        if self.bn_final is not None:
            x = torch.relu(self.bn_final(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return "stem " + super().extra_repr()


def build_resnet(block: Block, layers: Sequence[int], **kwargs: Any) -> ResNet:
    """The one builder behind every factory; ``kwargs`` go to :class:`ResNet`."""
    return ResNet(block, layers, **kwargs)


def _with_defaults(kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {**defaults, **kwargs}


# ImageNet, torchvision names and state_dict keys
def resnet18(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kw)


def resnet34(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kw)


def resnet50(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kw)


def resnet101(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kw)


def resnet152(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kw)


def resnext50_32x4d(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes,
                        **_with_defaults(kw, groups=32, width_per_group=4))


def resnext101_32x8d(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes,
                        **_with_defaults(kw, groups=32, width_per_group=8))


def resnext101_64x4d(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes,
                        **_with_defaults(kw, groups=64, width_per_group=4))


def wide_resnet50_2(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes,
                        **_with_defaults(kw, width_per_group=128))


def wide_resnet101_2(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes,
                        **_with_defaults(kw, width_per_group=128))


# ImageNet, pre-activation (He et al. 2016)
def preact_resnet18(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(PreActBasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kw)


def preact_resnet34(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(PreActBasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kw)


def preact_resnet50(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(PreActBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kw)


def preact_resnet101(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(PreActBottleneck, [3, 4, 23, 3], num_classes=num_classes, **kw)


def preact_resnet152(num_classes: int = 1000, **kw: Any) -> ResNet:
    return build_resnet(PreActBottleneck, [3, 8, 36, 3], num_classes=num_classes, **kw)


# CIFAR (32×32): Wide ResNet-28-10 (Zagoruyko & Komodakis 2016), pre-act ResNet-164/1001
def wrn28_10(num_classes: int = 10, dropout: float = 0.0, **kw: Any) -> ResNet:
    return build_resnet(PreActBasicBlock, [4, 4, 4], num_classes=num_classes, dropout=dropout,
                        **_with_defaults(kw, stem="cifar", widen_factor=10))


def preact_resnet164(num_classes: int = 10, **kw: Any) -> ResNet:
    return build_resnet(PreActBottleneck, [18, 18, 18], num_classes=num_classes,
                        **_with_defaults(kw, stem="cifar"))


def preact_resnet1001(num_classes: int = 10, **kw: Any) -> ResNet:
    return build_resnet(PreActBottleneck, [111, 111, 111], num_classes=num_classes,
                        **_with_defaults(kw, stem="cifar"))
