"""Fused nn.Modules: same parameters and state_dict keys as the unfused PyTorch modules."""

from .blocks import (
    BasicBlock,
    BlockLayout,
    Bottleneck,
    FusedBlock,
    PreActBasicBlock,
    PreActBottleneck,
    layer_by_layer,
)
from .conv_bn_relu import ConvBNReLU

__all__ = [
    "BasicBlock",
    "BlockLayout",
    "Bottleneck",
    "ConvBNReLU",
    "FusedBlock",
    "PreActBasicBlock",
    "PreActBottleneck",
    "layer_by_layer",
]
