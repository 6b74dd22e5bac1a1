"""How many configurations the Triton autotuners may try.

``FASTRES_TRITON_AUTOTUNE=0`` (read at import) makes every autotuned kernel run the first
configuration that fits the shape, without compiling and timing the others: correctness runs on a
GPU (the GPU tests, ``bench/gpu_check.sh``) then cost one compile per kernel variant instead of
one per configuration and shape. The default (``1``) tunes over every configuration. Under the
Triton interpreter each kernel has a single configuration anyway.
"""

from __future__ import annotations

import os

import triton

AUTOTUNE = os.environ.get("FASTRES_TRITON_AUTOTUNE", "1") != "0"


def limit(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` as offered to the autotuner: all of them, or the first with autotuning off."""
    return configs if AUTOTUNE else configs[:1]
