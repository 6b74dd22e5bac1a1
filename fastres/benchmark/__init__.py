"""Benchmark library behind ``fastres bench`` and ``bench/``: timing, roofline, cases, report.

* :mod:`.timing`: CUDA-event (or host-clock) timing with warm-up, median, L2-defeating input
  rotation; the card's ceilings (device copy TB/s, matrix product TFLOP/s).
* :mod:`.roofline`: FLOPs and minimum bytes of a fused conv layer; the roofline bound.
* :mod:`.cases`: layer cases read off the architectures; eager / compile / fastres callables.
* :mod:`.runner`: :class:`BenchConfig` and :func:`run` (one JSON-ready dict per run).
* :mod:`.report`: table, JSON file, PNG plot.
* :mod:`.env`: card, driver, versions, commit, date.
"""

from .roofline import Ceilings, ConvShape, Epilogue, achieved, conv_flops, conv_min_bytes
from .runner import CPU_BANNER, SCHEMA, BenchConfig, run
from .timing import Timing, copies_to_defeat_l2, measure_ceilings, time_calls

__all__ = [
    "CPU_BANNER",
    "SCHEMA",
    "BenchConfig",
    "Ceilings",
    "ConvShape",
    "Epilogue",
    "Timing",
    "achieved",
    "conv_flops",
    "conv_min_bytes",
    "copies_to_defeat_l2",
    "measure_ceilings",
    "run",
    "time_calls",
]
