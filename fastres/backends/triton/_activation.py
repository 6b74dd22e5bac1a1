"""SiLU's forward and derivative, the jit helpers the conv epilogue and the BN kernels share.

fp32 in and out, written as PyTorch's kernels write them (``x / (1 + exp(-x))`` and
``s·(1 + x·(1 − s))``, s = 1 / (1 + exp(−x))), so that NaN and ±Inf come out where eager's do:
exp(−x) overflows to +Inf for x below about −88, giving s = 0 and silu(x) = −0 as PyTorch does,
never a NaN for a finite x.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu(v):
    """``v·sigmoid(v)`` of fp32 ``v``."""
    return v / (1.0 + tl.exp(-v))


@triton.jit
def silu_grad(v):
    """d silu(v) / dv = s·(1 + v·(1 − s)), s = sigmoid(v), of fp32 ``v``."""
    s = 1.0 / (1.0 + tl.exp(-v))
    return s * (1.0 + v * (1.0 - s))
