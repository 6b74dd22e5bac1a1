"""Where the Triton kernels run and how many configurations their autotuners may try.

``INTERPRET``: ``TRITON_INTERPRET=1`` at import, when ``@triton.jit`` builds interpreted kernels
(CPU tests); every module of this package reads it from here.

``FASTRES_TRITON_AUTOTUNE=0`` (read at import) makes every autotuned kernel run the first
configuration that fits the shape, without compiling and timing the others: correctness runs on a
GPU (the GPU tests, ``bench/gpu_check.sh``) then cost one compile per kernel variant instead of
one per configuration and shape. The default (``1``) tunes over every configuration. Under the
Triton interpreter each kernel has a single configuration anyway.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("FASTRES_TRITON_AUTOTUNE", "1") != "0"


def limit(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` as offered to the autotuner: all of them, or the first with autotuning off."""
    return configs if AUTOTUNE else configs[:1]


def target(x: torch.Tensor | None) -> int | None:
    """The compiled target a tensor's device gets: 90 (Hopper and later) or 80; None off CUDA.
    Keys the configurations pruned because they spill there (the kernel report)."""
    if x is None or not x.is_cuda:
        return None
    return 90 if torch.cuda.get_device_capability(x.device)[0] >= 9 else 80
