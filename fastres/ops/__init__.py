"""Functional fused ops (``torch.library`` custom ops with autograd)."""

from .conv_bn_relu import conv_bn_relu

__all__ = ["conv_bn_relu"]
