"""fastres: fused conv + BatchNorm + ReLU (+ residual) for ResNet-family CNNs."""

from . import models, nn, ops
from .backends import BackendUnavailableError, get_backend, set_backend, use_backend
from .summary import summary
from .swap import fuse, unfuse

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "fuse",
    "get_backend",
    "models",
    "nn",
    "ops",
    "set_backend",
    "summary",
    "unfuse",
    "use_backend",
]
