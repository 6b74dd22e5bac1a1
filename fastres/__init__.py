"""fastres: fused conv + BatchNorm + ReLU (+ residual) for ResNet-family CNNs."""

from . import nn, ops
from .backends import BackendUnavailableError, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "get_backend",
    "nn",
    "ops",
    "set_backend",
    "use_backend",
]
