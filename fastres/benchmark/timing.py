"""Timing that means something on a GPU, and the card's ceilings.

GPU work is asynchronous: each call is bracketed by CUDA events (or, on CPU, by the host clock),
after warm-up calls that keep compilation, autotuning and handle creation out of the numbers.
The median of many calls is reported. Inputs rotate among several copies whose total size is
over twice the L2 cache, so a call never finds its inputs still in L2 from the call before.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .roofline import Ceilings

DEFAULT_L2_BYTES = 50 * 2**20  # H100: 50 MB; used when the device does not say


@dataclass
class Timing:
    """Seconds per call: the median and the spread of ``repeats`` timed calls."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    copies: int
    timer: str
    first_call_s: float | None = None  # the first warm-up call: compilation, autotuning, caches
    samples_s: list[float] = field(default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "samples_s"}
        if with_samples:
            d["samples_s"] = self.samples_s
        return d


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def copies_to_defeat_l2(bytes_per_copy: int, device: torch.device, *, max_copies: int = 64) -> int:
    """How many input copies to rotate so their total is over twice the L2 cache (at least 2)."""
    if device.type != "cuda" or bytes_per_copy <= 0:
        return 1
    need = math.ceil(2 * l2_bytes(device) / bytes_per_copy) + 1
    return max(2, min(max_copies, need))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[Any], object],
    inputs: Sequence[Any],
    device: torch.device,
    *,
    warmup: int = 5,
    repeats: int = 20,
) -> Timing:
    """Time ``fn(inputs[i % len(inputs)])``; returns the median over ``repeats`` calls.

    On CUDA each call sits between two events recorded on the current stream, and all events
    are read after one final synchronize, so the host never stalls the queue between calls. The
    first warm-up call is timed on its own with the host clock (``first_call_s``): what a user
    waits for before the first result (compilation, autotuning).
    """
    if not inputs:
        raise ValueError("time_calls needs at least one input set")
    first_call_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        if i == 0:
            synchronize(device)
            first_call_s = time.perf_counter() - t0
    synchronize(device)
    samples: list[float] = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for i, (start, end) in enumerate(events):
            args = inputs[(warmup + i) % len(inputs)]
            start.record()
            fn(args)
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
        timer = "cuda-events"
    else:
        for i in range(repeats):
            args = inputs[(warmup + i) % len(inputs)]
            t0 = time.perf_counter()
            fn(args)
            samples.append(time.perf_counter() - t0)
        timer = "perf_counter"
    return Timing(
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        repeats=repeats,
        warmup=warmup,
        copies=len(inputs),
        timer=timer,
        first_call_s=first_call_s,
        samples_s=samples,
    )


def measure_ceilings(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, *, quick: bool = False
) -> Ceilings:
    """Measure the card once: a large device copy (TB/s) and a large matrix product (TFLOP/s).

    Inputs are random (never zeros: a product of zeros runs faster than real data). Copy bytes
    count both the read and the write.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        copy_bytes, n = (256 * 2**20, 4096) if quick else (2 * 2**30, 8192)
        warmup, repeats = (2, 5) if quick else (3, 10)
    else:  # only a sanity figure for the tiny CPU configuration
        copy_bytes, n, warmup, repeats = 32 * 2**20, 512, 1, 3
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # CPU half-precision matmul is an emulation, not a ceiling
    src = torch.randint(0, 255, (copy_bytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    copy = time_calls(lambda t: t[1].copy_(t[0]), [(src, dst)], device, warmup=warmup,
                      repeats=repeats)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    mm = time_calls(lambda t: torch.mm(*t), [(a, b)], device, warmup=warmup, repeats=repeats)
    del a, b
    tbps = 2 * copy_bytes / copy.median_s / 1e12
    tflops = 2 * n**3 / mm.median_s / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(
        tflops=tflops,
        tbps=tbps,
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        details={
            "copy_bytes": copy_bytes,
            "copy_median_s": copy.median_s,
            "matmul_n": n,
            "matmul_median_s": mm.median_s,
        },
    )
