"""Run the benchmark: model-level img/s, block-level training steps and layer-level times,
fastres vs eager vs compile.

:func:`run` measures everything a :class:`BenchConfig` asks for and returns one JSON-ready dict.
Every baseline is timed in the same run on the same card; the card's ceilings are measured once
at the start and stored with the results. A case that fails (out of memory, a backend error) is
recorded with its reason and the run goes on. Model-level work runs most valuable first (see
:func:`model_work`), and ``time_limit_s`` stops a measurement in the middle when it passes, so a
run cut short keeps what matters and every result so far is handed to ``on_update``. The block
level (:class:`.cases.BlockBench`) runs after fastres and eager of every model and before any
model-level torch.compile.

Schema ``fastres-bench/1``::

    schema, cpu_only, note (the CPU banner or None), elapsed_s
    environment: date_utc, host, python, torch, torch_cuda, cudnn, triton, fastres,
                 fastres_commit, gpu {name, capability, memory_gib, multiprocessors, l2_bytes},
                 driver
    config:      the BenchConfig as run (after the CPU or --quick adjustments), device
    ceilings:    tflops, tbps, device, dtype, details
    models[]:    model, mode, batch, resolution, dtype, flops_per_image, bytes_per_image,
                 roofline_img_s, speedup_vs_eager, speedup_vs_compile,
                 train only: saved_bytes_vs_eager (fastres / eager bytes kept for backward),
                 traffic {batch, dtype, tbps (the measured ceiling), designs {eager |
                          per_layer | block: gb_per_step, img_s_bound}} (the paper model of
                          :mod:`.traffic`; img_s_bound: that traffic alone at ``tbps``),
                 systems {eager | compile | fastres: status ("ok", "error", "skipped"),
                          reason, source, img_s, median_s, min_s, max_s, repeats, warmup,
                          first_call_s (the first step: compilation, autotuning),
                          served_per_step (fastres: {forward|backward: {backend: passes}}),
                          saved_bytes (train, fastres and eager: bytes the step's forward
                          keeps for backward, unique non-parameter storages, first input set),
                          copies,
                          timer, tflops, tbps, frac_peak_tflops, frac_peak_tbps,
                          frac_roofline}
    layers[]:    id, model, shape, label, epilogue, uses, mode, dtype, flops, bytes, copies,
                 bound_s, best_fastres, speedup_vs_eager, speedup_vs_compile-<mode>,
                 systems {eager | cudnn-conv (the conv alone) | compile-<mode> |
                          fastres-<backend>: status ("ok", "error", "unavailable",
                          "skipped"), reason, img_s, median_s, ..., tflops, tbps,
                          frac_peak_tflops, frac_peak_tbps, bound_s, frac_roofline, bound_by;
                          fastres-*: time_vs_cudnn_conv; fastres-triton: configs (kernel ->
                          the configuration it ran)}
    blocks[]:    id, model, block ("layer2.0"), label, x_shape, projection, convs, mode
                 ("train": forward + backward of the block, no optimizer), batch, dtype,
                 speedup_vs_eager | speedup_vs_fastres-layer | speedup_vs_compile (fastres's
                 step rate over the other's), saved_bytes_vs_eager (fastres),
                 traffic {batch, dtype, tbps, designs {eager | per_layer | block:
                          gb_per_step, img_s_bound, bound_ms}} (the paper model of the
                          block's convs alone; bound_ms: that traffic at ``tbps``),
                 systems {fastres (the block op) | fastres-layer (the same block inside
                          fastres.nn.layer_by_layer) | eager (torchvision's block) | compile:
                          status, reason, ms_per_step, img_s, median_s, ..., time_vs_eager,
                          saved_bytes, saved_bytes_vs_eager, served_per_step (fastres*:
                          {forward|backward: {"<backend> <op>": passes}})}
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from ..backends import record_calls
from ..backends.triton._tuning import launched_configs
from .cases import (
    BACKEND_NAMES,
    BLOCK_MODEL_NAMES,
    LAYER_MODEL_NAMES,
    MODEL_NAMES,
    BlockBench,
    LayerBench,
    ModelBench,
    block_cases,
    layer_cases,
    model_conv_layers,
    model_roofline,
    quick_block_cases,
    quick_layer_cases,
    roofline_img_s,
)
from .env import environment
from .roofline import Ceilings, achieved
from .timing import measure_ceilings, time_calls
from .traffic import traffic_report

SCHEMA = "fastres-bench/1"
CPU_BANNER = "no CUDA device: tiny CPU configuration, numbers say nothing about GPU speed"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))
    modes: list[str] = field(default_factory=lambda: ["train", "infer"])
    batch: int = 256
    resolution: int = 224
    dtype: str = "bf16"
    compile: bool = True
    compile_modes: list[str] = field(  # layer level
        default_factory=lambda: ["default", "max-autotune"])
    model_compile_mode: str = "default"
    layers: bool = False
    layer_models: list[str] = field(default_factory=lambda: list(LAYER_MODEL_NAMES))
    layer_limit: int | None = None  # first N distinct shapes per model
    backend: str = "auto"  # "auto": every backend that can serve the case
    # block level: a training step of single residual blocks (needs "train" in modes)
    blocks: bool = True
    block_models: list[str] = field(default_factory=lambda: list(BLOCK_MODEL_NAMES))
    block_limit: int | None = None  # first N blocks per model (stage order, projection first)
    block_compile: bool = False  # torch.compile per block: a cold compile of each (slow)
    warmup: int = 5
    repeats: int = 20
    model_warmup: int = 3
    model_repeats: int = 10
    time_limit_s: float | None = None
    quick: bool = False
    device: str | None = None

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_cpu(config: BenchConfig) -> BenchConfig:
    """The configuration a machine without a GPU runs: small enough for CI, every path touched."""
    config.batch = min(config.batch, 2)
    config.resolution = min(config.resolution, 32)
    config.warmup, config.repeats = 1, 3
    config.model_warmup, config.model_repeats = 1, 2
    config.compile_modes = config.compile_modes[:1]  # each compile costs seconds on CPU
    if config.quick:
        config.models = config.models[:1]
        config.block_models = config.block_models[:1]
    return config


def quick(config: BenchConfig) -> BenchConfig:
    """A short GPU run: fewer repeats, two layer cases per model."""
    config.warmup, config.repeats = 3, 10
    config.model_warmup, config.model_repeats = 2, 5
    return config


def _fastres_backends(config: BenchConfig) -> list[str]:
    """The backends the layer level times: with "auto", the kernel backends on CUDA (reference
    is eager PyTorch again), the reference backend alone on CPU (the tiny configuration)."""
    if config.backend != "auto":
        return [config.backend]
    if config.resolved_device().type == "cuda":
        return [b for b in BACKEND_NAMES if b != "reference"]
    return ["reference"]


def _layer_systems(config: BenchConfig) -> list[str]:
    systems = [f"fastres-{b}" for b in _fastres_backends(config)] + ["eager", "cudnn-conv"]
    if config.compile:
        systems += [f"compile-{m}" for m in config.compile_modes]
    return systems


def _block_systems(config: BenchConfig) -> list[str]:
    compiled = ["compile"] if config.compile and config.block_compile else []
    return ["fastres", "fastres-layer", "eager", *compiled]


def _model_systems(config: BenchConfig) -> list[str]:
    return ["fastres", "eager", *(["compile"] if config.compile else [])]


def model_work(config: BenchConfig) -> list[tuple[str, str, str]]:
    """``(model, mode, system)`` in the order they are measured: the most valuable first, so
    that a run cut short by its time limit has them. fastres and eager for every model and
    mode (in the order given: ResNet-50 first by default) before any torch.compile, whose
    cold compile of a training step takes a minute or more."""
    pairs = [(m, mode) for m in config.models for mode in config.modes]
    first = [(m, mode, s) for m, mode in pairs for s in ("fastres", "eager")]
    compiled = [(m, mode, "compile") for m, mode in pairs] if config.compile else []
    return first + compiled


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(e: BaseException) -> dict:
    reason = f"{type(e).__name__}: {e}".strip()
    return {"status": "error", "reason": reason[:2000],
            "traceback": traceback.format_exc(limit=6)[-4000:]}


class TimeLimitReached(BaseException):
    """Raised inside a measurement when the run's time limit passes.

    A BaseException, so that code under measurement (torch.compile, autotuners) that catches
    ``Exception`` to try something else does not swallow it.
    """


class _Clock:
    """The run's time limit: checked between measurements, and enforced *within* one (a cold
    torch.compile or a first autotuning step can outlast the whole budget) by a SIGALRM timer
    that raises :class:`TimeLimitReached` where the main thread is, between Python bytecodes."""

    def __init__(self, limit_s: float | None):
        self.start, self.limit_s = time.monotonic(), limit_s

    def left(self) -> float | None:
        if self.limit_s is None:
            return None
        return self.limit_s - (time.monotonic() - self.start)

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    @contextlib.contextmanager
    def enforced(self) -> Iterator[None]:
        left = self.left()
        can_alarm = (hasattr(signal, "setitimer")
                     and threading.current_thread() is threading.main_thread())
        if left is None or not can_alarm:
            yield
            return

        def stop(signum, frame):
            raise TimeLimitReached

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def plan(config: BenchConfig) -> dict:
    """The work a run will do: (model, mode) pairs and layer cases, and the task count."""
    model_tasks = [(m, mode) for m in config.models for mode in config.modes]
    layer_tasks = []
    if config.layers:
        for name in config.layer_models:
            cases = layer_cases(name, config.batch, config.resolution)
            if config.quick:
                cases = quick_layer_cases(cases)
            if config.layer_limit is not None:
                cases = cases[: config.layer_limit]
            layer_tasks += [(case, mode) for case in cases for mode in config.modes]
    block_tasks = []
    if config.blocks and "train" in config.modes:
        tiny = config.resolved_device().type != "cuda"
        for name in config.block_models:
            cases = block_cases(name, config.batch, config.resolution)
            if config.quick or tiny:
                cases = quick_block_cases(cases)
            if config.block_limit is not None:
                cases = cases[: config.block_limit]
            block_tasks += cases
    total = (len(model_tasks) * len(_model_systems(config))
             + len(layer_tasks) * len(_layer_systems(config))
             + len(block_tasks) * len(_block_systems(config)))
    return {"models": model_tasks, "layers": layer_tasks, "blocks": block_tasks, "total": total}


def run(
    config: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Measure what ``config`` asks; ``progress(label)`` is called once per timed system, and
    ``on_update(results)`` after each, so a caller can save partial results."""
    device = config.resolved_device()
    if device.type != "cuda":
        config = tiny_cpu(config)
    elif config.quick:
        config = quick(config)
    dtype = DTYPES[config.dtype]
    if device.type == "cuda":
        # what a tuned eager training script does; every system gets cuDNN's best algorithm
        torch.backends.cudnn.benchmark = True
    progress = progress or (lambda label: None)
    on_update = on_update or (lambda results: None)
    clock = _Clock(config.time_limit_s)
    work = plan(config)

    results: dict = {
        "schema": SCHEMA,
        "cpu_only": device.type != "cuda",
        "note": CPU_BANNER if device.type != "cuda" else None,
        "environment": environment(),
        "config": asdict(config) | {"device": str(device),
                                    "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "ceilings": None,
        "models": [],
        "blocks": [],
        "layers": [],
    }
    progress("measuring the card's ceilings")
    ceilings = measure_ceilings(device, dtype, quick=config.quick)
    results["ceilings"] = ceilings.to_dict()
    on_update(results)

    entries = {}
    for name, mode in work["models"]:
        entries[name, mode] = _model_entry(name, mode, config)
        results["models"].append(entries[name, mode])
    blocks_done = False
    for name, mode, system in model_work(config):
        if system == "compile" and not blocks_done:  # blocks before any cold compile
            _run_blocks(work["blocks"], config, device, dtype, ceilings, clock, progress,
                        results, on_update)
            blocks_done = True
        progress(f"{name} {mode} {system}")
        entry = entries[name, mode]
        entry["systems"][system] = _run_model_system(entry, system, config, device, dtype,
                                                     ceilings, clock)
        _ratios(entry, "fastres", ["eager", "compile"], "img_s")
        _saved_ratio(entry)
        on_update(results)
    if not blocks_done:
        _run_blocks(work["blocks"], config, device, dtype, ceilings, clock, progress, results,
                    on_update)
    for case, mode in work["layers"]:
        entry = _run_layer(case, mode, config, device, dtype, ceilings, clock, progress)
        results["layers"].append(entry)
        on_update(results)
    results["elapsed_s"] = round(time.monotonic() - clock.start, 1)
    on_update(results)
    return results


def _ratios(entry: dict, candidate: str, baselines: list[str], rate_key: str) -> None:
    """speedup_vs_<baseline> = rate(candidate) / rate(baseline), where both were measured."""
    systems = entry["systems"]
    mine = systems.get(candidate, {}).get(rate_key)
    for base in baselines:
        theirs = systems.get(base, {}).get(rate_key)
        if mine and theirs:
            entry[f"speedup_vs_{base}"] = mine / theirs


def _model_entry(name, mode, config) -> dict:
    """The result entry of one (model, mode); systems are added as they are measured."""
    return {"model": name, "mode": mode, "batch": config.batch,
            "resolution": config.resolution, "dtype": config.dtype, "systems": {}}


@functools.cache
def _conv_layers(name: str, resolution: int) -> tuple:
    return tuple(model_conv_layers(name, 1, resolution))


def _add_roofline(entry: dict, dtype, ceilings: Ceilings) -> None:
    """The entry's per-image FLOPs, bytes and roofline bound (once, when first measured)."""
    if "roofline_img_s" in entry or "roofline_error" in entry:
        return
    try:
        roof = model_roofline(_conv_layers(entry["model"], entry["resolution"]),
                              training=entry["mode"] == "train", dtype=dtype,
                              batch=entry["batch"])
        entry["flops_per_image"] = roof["flops_per_image"]
        entry["bytes_per_image"] = roof["bytes_per_image"]
        entry["roofline_img_s"] = roofline_img_s(roof, ceilings)
    except Exception as e:
        entry["roofline_error"] = f"{type(e).__name__}: {e}"


def _add_traffic(entry: dict, dtype, ceilings: Ceilings) -> None:
    """The paper traffic model of a training step at the entry's batch and dtype, with the
    img/s each design's traffic allows at the measured bandwidth (train entries, once)."""
    if entry["mode"] != "train" or "traffic" in entry or "traffic_error" in entry:
        return
    try:
        entry["traffic"] = traffic_report(
            _conv_layers(entry["model"], entry["resolution"]), dtype=dtype,
            batch=entry["batch"], tbps=ceilings.tbps or None)
    except Exception as e:
        entry["traffic_error"] = f"{type(e).__name__}: {e}"


def _saved_bytes(bench, clock) -> dict:
    """``{"saved_bytes": n}`` for a training system (nothing for inference or compile), or the
    reason it could not be counted; never raises."""
    try:
        with clock.enforced():
            n = bench.saved_bytes()
        return {} if n is None else {"saved_bytes": n}
    except TimeLimitReached:
        return {"saved_bytes_error": "time limit reached"}
    except Exception as e:
        return {"saved_bytes_error": f"{type(e).__name__}: {e}"[:500]}


def _saved_ratio(entry: dict) -> None:
    mine = entry["systems"].get("fastres", {}).get("saved_bytes")
    theirs = entry["systems"].get("eager", {}).get("saved_bytes")
    if mine and theirs:
        entry["saved_bytes_vs_eager"] = mine / theirs


def _run_model_system(entry, system, config, device, dtype, ceilings: Ceilings, clock) -> dict:
    """Measure one system of a model entry; never raises (failures are recorded)."""
    if clock.expired():
        return {"status": "skipped", "reason": "time limit reached"}
    _add_roofline(entry, dtype, ceilings)
    _add_traffic(entry, dtype, ceilings)
    bench = None
    t0 = time.monotonic()
    try:
        with clock.enforced():
            bench = ModelBench(entry["model"], system, training=entry["mode"] == "train",
                               batch=config.batch, resolution=config.resolution, dtype=dtype,
                               device=device, compile_mode=config.model_compile_mode)
            with record_calls() as served:
                timing = time_calls(bench.step(), bench.inputs, device,
                                    warmup=config.model_warmup, repeats=config.model_repeats)
        img_s = config.batch / timing.median_s
        result = {"status": "ok", "source": bench.source, "img_s": img_s, **timing.to_dict()}
        if served:  # which backend served the fused passes of one step (fastres only)
            steps = config.model_warmup + config.model_repeats
            counts = collections.Counter((c.direction, c.backend) for c in served)
            result["served_per_step"] = {
                d: {b: n // steps for (d2, b), n in sorted(counts.items()) if d2 == d}
                for d in sorted({d for d, _ in counts})
            }
        if "roofline_img_s" in entry:
            result["frac_roofline"] = img_s / entry["roofline_img_s"]
            result.update(achieved(entry["flops_per_image"] * config.batch,
                                   entry["bytes_per_image"] * config.batch,
                                   timing.median_s, None))
            result["frac_peak_tflops"] = result["tflops"] / ceilings.tflops
            result["frac_peak_tbps"] = result["tbps"] / ceilings.tbps
        if hasattr(bench, "saved_bytes"):  # after timing: a failure here keeps the timing
            result.update(_saved_bytes(bench, clock))
        return result
    except TimeLimitReached:
        return {"status": "skipped",
                "reason": f"time limit reached after {time.monotonic() - t0:.1f} s in this "
                          "system (set-up, compilation or warm-up did not finish)"}
    except Exception as e:
        return _failure(e)
    finally:
        bench = None  # the model, its optimizer state and inputs go before the next system
        _free(device)


def _run_layer(case, mode, config, device, dtype, ceilings: Ceilings, clock, progress) -> dict:
    training = mode == "train"
    entry: dict = case.to_dict() | {"mode": mode, "dtype": config.dtype, "systems": {}}
    try:
        bench = LayerBench(case, training=training, dtype=dtype, device=device)
    except Exception as e:
        entry["error"] = _failure(e)
        _free(device)
        return entry
    entry.update(flops=bench.flops, bytes=bench.bytes, copies=bench.copies,
                 bound_s=ceilings.bound_seconds(bench.flops, bench.bytes))
    for system in _layer_systems(config):
        progress(f"{case.id} {mode} {system}")
        if clock.expired():
            entry["systems"][system] = {"status": "skipped", "reason": "time limit reached"}
            continue
        try:
            with clock.enforced():
                fn, reason = bench.system(system)
                if fn is None:
                    entry["systems"][system] = {"status": "unavailable", "reason": reason}
                    continue
                launched_configs(clear=True)
                timing = time_calls(fn, bench.inputs, device, warmup=config.warmup,
                                    repeats=config.repeats)
            entry["systems"][system] = {
                "status": "ok",
                "img_s": case.shape.n / timing.median_s,
                **timing.to_dict(),
                **achieved(bench.flops, bench.bytes, timing.median_s, ceilings),
            }
            if system == "fastres-triton":  # which configuration each kernel ran (autotuned)
                entry["systems"][system]["configs"] = launched_configs(clear=True)
        except TimeLimitReached:
            entry["systems"][system] = {"status": "skipped",
                                        "reason": "time limit reached within this system"}
        except Exception as e:
            entry["systems"][system] = _failure(e)
    fused = {k: v for k, v in entry["systems"].items()
             if k.startswith("fastres-") and v.get("status") == "ok"}
    conv = entry["systems"].get("cudnn-conv", {})
    for result in fused.values():  # > 1: slower than cuDNN's convolution alone
        if conv.get("status") == "ok":
            result["time_vs_cudnn_conv"] = result["median_s"] / conv["median_s"]
    if fused:
        best = min(fused, key=lambda k: fused[k]["median_s"])
        entry["best_fastres"] = best
        entry["systems"]["fastres-best"] = fused[best] | {"backend": best}
        _ratios(entry, "fastres-best", _compile_and_eager(entry), "img_s")
        del entry["systems"]["fastres-best"]
    del bench
    _free(device)
    return entry


def _compile_and_eager(entry: dict) -> list[str]:
    return [k for k in entry["systems"] if k == "eager" or k.startswith("compile-")]


# ---------------------------------------------------------------------------------------------
# Block level
# ---------------------------------------------------------------------------------------------


def _run_blocks(cases, config, device, dtype, ceilings, clock, progress, results,
                on_update) -> None:
    for case in cases:
        results["blocks"].append(_run_block(case, config, device, dtype, ceilings, clock,
                                            progress))
        on_update(results)


def _served_per_step(served, steps: int) -> dict:
    """``{forward|backward: {"<backend> <op>": passes per step}}`` of recorded fused passes."""
    counts = collections.Counter((c.direction, f"{c.backend} {c.op}") for c in served)
    return {d: {k: n // steps for (d2, k), n in sorted(counts.items()) if d2 == d}
            for d in sorted({d for d, _ in counts})}


def _run_block(case, config, device, dtype, ceilings: Ceilings, clock, progress) -> dict:
    """A training step of one block on each block system; never raises (failures recorded)."""
    entry: dict = case.to_dict() | {"mode": "train", "batch": config.batch,
                                    "dtype": config.dtype, "systems": {}}
    try:
        traffic = traffic_report(case.layers, dtype=dtype, batch=config.batch,
                                 tbps=ceilings.tbps or None)
        for design in traffic["designs"].values():
            design["bound_ms"] = (design["gb_per_step"] / ceilings.tbps  # GB / (TB/s) = ms
                                  if ceilings.tbps else None)
        entry["traffic"] = traffic
    except Exception as e:
        entry["traffic_error"] = f"{type(e).__name__}: {e}"
    bench = None
    try:
        if clock.expired():
            raise TimeLimitReached
        with clock.enforced():
            bench = BlockBench(case, dtype=dtype, device=device, backend=config.backend,
                               compile_mode=config.model_compile_mode)
    except TimeLimitReached:
        entry["systems"] = {s: {"status": "skipped", "reason": "time limit reached"}
                            for s in _block_systems(config)}
        return entry
    except Exception as e:
        entry["error"] = _failure(e)
        _free(device)
        return entry
    entry["copies"] = bench.copies
    for system in _block_systems(config):
        progress(f"{case.id} train {system}")
        if clock.expired():
            entry["systems"][system] = {"status": "skipped", "reason": "time limit reached"}
            continue
        try:
            with clock.enforced():
                step = bench.system(system)
                with record_calls() as served:
                    timing = time_calls(step, bench.inputs, device, warmup=config.warmup,
                                        repeats=config.repeats)
            result = {"status": "ok", "ms_per_step": timing.median_s * 1e3,
                      "img_s": config.batch / timing.median_s, **timing.to_dict()}
            if served:
                result["served_per_step"] = _served_per_step(
                    served, config.warmup + config.repeats)
            result.update(_saved_bytes(_SystemSaved(bench, system), clock))
            entry["systems"][system] = result
        except TimeLimitReached:
            entry["systems"][system] = {"status": "skipped",
                                        "reason": "time limit reached within this system"}
        except Exception as e:
            entry["systems"][system] = _failure(e)
    systems = entry["systems"]
    eager = systems.get("eager", {})
    for result in systems.values():
        if result.get("status") == "ok" and eager.get("status") == "ok":
            result["time_vs_eager"] = result["median_s"] / eager["median_s"]
        if result.get("saved_bytes") and eager.get("saved_bytes"):
            result["saved_bytes_vs_eager"] = result["saved_bytes"] / eager["saved_bytes"]
    _ratios(entry, "fastres", ["eager", "fastres-layer", "compile"], "img_s")
    if "saved_bytes_vs_eager" in systems.get("fastres", {}):
        entry["saved_bytes_vs_eager"] = systems["fastres"]["saved_bytes_vs_eager"]
    bench = None
    _free(device)
    return entry


class _SystemSaved:
    """``saved_bytes()`` of one block system, in the shape :func:`_saved_bytes` takes."""

    def __init__(self, bench: BlockBench, system: str):
        self.bench, self.system = bench, system

    def saved_bytes(self) -> int | None:
        return self.bench.saved_bytes(self.system)
