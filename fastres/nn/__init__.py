"""Fused nn.Modules: same parameters and state_dict keys as the unfused PyTorch modules."""

from .conv_bn_relu import ConvBNReLU

__all__ = ["ConvBNReLU"]
