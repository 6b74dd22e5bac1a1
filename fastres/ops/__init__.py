"""Functional fused ops (``torch.library`` custom ops with autograd)."""

from . import backend_timing  # noqa: F401  (hands the backends their call timer)
from .conv_bn_relu import conv_bn_relu

__all__ = ["conv_bn_relu"]
