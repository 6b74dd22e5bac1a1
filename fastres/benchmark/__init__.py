"""Benchmark library behind ``fastres bench`` and ``bench/``: timing, roofline, cases, report.

* :mod:`.timing`: CUDA-event (or host-clock) timing with warm-up, median, L2-defeating input
  rotation; the card's ceilings (device copy TB/s, matrix product TFLOP/s).
* :mod:`.roofline`: FLOPs and minimum bytes of a fused conv layer; the roofline bound.
* :mod:`.cases`: layer and block cases read off the architectures; eager / compile / fastres
  callables (a block's fastres systems: the block op, and the same block layer by layer).
* :mod:`.memory`: bytes a forward keeps for backward (unique non-parameter storages).
* :mod:`.traffic`: paper HBM-traffic model of a training step, eager / per-layer / block fused.
* :mod:`.runner`: :class:`BenchConfig` and :func:`run` (one JSON-ready dict per run).
* :mod:`.report`: table, JSON file, PNG plot.
* :mod:`.env`: card, driver, versions, commit, date.
"""

from .memory import saved_bytes, saved_bytes_ratio
from .roofline import Ceilings, ConvShape, Epilogue, achieved, conv_flops, conv_min_bytes
from .runner import CPU_BANNER, SCHEMA, BenchConfig, run
from .timing import Timing, copies_to_defeat_l2, measure_ceilings, time_calls
from .traffic import step_traffic, traffic_report

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
    "saved_bytes",
    "saved_bytes_ratio",
    "step_traffic",
    "time_calls",
    "traffic_report",
]
