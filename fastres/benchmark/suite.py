"""What the pytest-benchmark suites under ``bench/`` share with ``fastres bench``.

The suites measure the same cases as the command: :func:`suite_config` sizes them (full on a
GPU, tiny on CPU), :func:`layer_params` / :func:`model_params` list them with the baselines
first, so that each fastres measurement can be divided by baselines timed earlier in the same
session, and :func:`timed_layer` / :func:`timed_model` run one under ``benchmark.pedantic``.

Each timed call synchronises the GPU before returning (and the untimed setup synchronises before
it starts), so pytest-benchmark's host clock sees the whole GPU time of the call; that includes
one launch-and-sync latency (a few µs), which ``fastres bench`` (CUDA events) does not.

Environment variables narrow a run: ``FASTRES_BENCH_MODELS`` (comma list),
``FASTRES_BENCH_MODES`` (``train,infer``), ``FASTRES_BENCH_LAYER_LIMIT`` (first N shapes per
model), ``FASTRES_BENCH_COMPILE`` (``0`` to skip torch.compile), ``FASTRES_BENCH_COMPILE_MODES``
(layer level, default ``default,max-autotune`` on GPU), ``FASTRES_BENCH_BATCH``,
``FASTRES_BENCH_ROUNDS``, ``FASTRES_BENCH_BLOCK_MODELS`` (block level, default ResNet-50 and
ResNeXt-50), ``FASTRES_BENCH_BLOCK_LIMIT`` (first N blocks per model),
``FASTRES_BENCH_BLOCK_COMPILE`` (``1`` to time torch.compile per block too).
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cases import (
    BACKEND_NAMES,
    BLOCK_MODEL_NAMES,
    LAYER_MODEL_NAMES,
    MODEL_NAMES,
    BlockBench,
    BlockCase,
    LayerBench,
    LayerCase,
    ModelBench,
    block_cases,
    layer_cases,
    model_conv_layers,
    model_roofline,
    quick_block_cases,
    quick_layer_cases,
    roofline_img_s,
)
from .roofline import Ceilings, achieved
from .runner import CPU_BANNER, DTYPES
from .traffic import traffic_report


def _env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else default


@dataclass
class SuiteConfig:
    device: torch.device
    batch: int
    resolution: int
    dtype: str
    models: list[str]
    layer_models: list[str]
    modes: list[str]
    compile: bool
    compile_modes: list[str]
    layer_limit: int | None
    rounds: int
    warmup_rounds: int
    tiny: bool
    block_models: list[str] = field(default_factory=lambda: list(BLOCK_MODEL_NAMES))
    block_limit: int | None = None
    block_compile: bool = False
    store: dict = field(default_factory=dict)  # (case id, mode) -> {system: img/s}

    @property
    def note(self) -> str | None:
        return CPU_BANNER if self.tiny else None


def suite_config() -> SuiteConfig:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.backends.cudnn.benchmark = True  # as in fastres bench: cuDNN's best algorithm
    limit = os.environ.get("FASTRES_BENCH_LAYER_LIMIT")
    block_limit = os.environ.get("FASTRES_BENCH_BLOCK_LIMIT")
    return SuiteConfig(
        device=torch.device("cuda" if gpu else "cpu"),
        batch=int(os.environ.get("FASTRES_BENCH_BATCH", 256 if gpu else 2)),
        resolution=224 if gpu else 32,
        dtype=os.environ.get("FASTRES_BENCH_DTYPE", "bf16"),
        models=_env_list("FASTRES_BENCH_MODELS", list(MODEL_NAMES) if gpu else ["resnet18"]),
        layer_models=_env_list("FASTRES_BENCH_LAYER_MODELS", list(LAYER_MODEL_NAMES)),
        modes=_env_list("FASTRES_BENCH_MODES", ["train", "infer"]),
        compile=os.environ.get("FASTRES_BENCH_COMPILE", "1") != "0",
        compile_modes=_env_list("FASTRES_BENCH_COMPILE_MODES",
                                ["default", "max-autotune"] if gpu else ["default"]),
        layer_limit=int(limit) if limit else None,
        rounds=int(os.environ.get("FASTRES_BENCH_ROUNDS", 20 if gpu else 3)),
        warmup_rounds=5 if gpu else 1,
        tiny=not gpu,
        block_models=_env_list("FASTRES_BENCH_BLOCK_MODELS", list(BLOCK_MODEL_NAMES)),
        block_limit=int(block_limit) if block_limit else None,
        block_compile=os.environ.get("FASTRES_BENCH_BLOCK_COMPILE", "0") == "1",
    )


def layer_params(cfg: SuiteConfig) -> list[tuple[LayerCase, str, str]]:
    """(case, mode, system) in the order they run: per case and mode, baselines first.

    On CPU: one case per model (the first 3×3), inference and training.
    """
    params = []
    for name in cfg.layer_models:
        found = layer_cases(name, cfg.batch, cfg.resolution)
        if cfg.tiny:
            found = quick_layer_cases(found)[:1]
        if cfg.layer_limit is not None:
            found = found[: cfg.layer_limit]
        systems = ["eager"]
        if cfg.compile:
            systems += [f"compile-{m}" for m in cfg.compile_modes]
        systems += [f"fastres-{b}" for b in BACKEND_NAMES]
        params += [(case, mode, s) for case in found for mode in cfg.modes for s in systems]
    return params


def block_params(cfg: SuiteConfig) -> list[tuple[BlockCase, str]]:
    """(block case, system) in the order they run: per block, eager (and compile) first, then
    the same fastres block layer by layer, then the block op (training steps only).

    On CPU: the first block (projection) of the first model only.
    """
    if "train" not in cfg.modes:
        return []
    systems = ["eager", *(["compile"] if cfg.compile and cfg.block_compile else []),
               "fastres-layer", "fastres"]
    params = []
    for name in cfg.block_models[:1] if cfg.tiny else cfg.block_models:
        found = block_cases(name, cfg.batch, cfg.resolution)
        if cfg.tiny:
            found = quick_block_cases(found)[:1]
        if cfg.block_limit is not None:
            found = found[: cfg.block_limit]
        params += [(case, s) for case in found for s in systems]
    return params


def model_params(cfg: SuiteConfig) -> list[tuple[str, str, str]]:
    systems = ["eager", *(["compile"] if cfg.compile else []), "fastres"]
    return [(m, mode, s) for m in cfg.models for mode in cfg.modes for s in systems]


class _Slot:
    """Keeps the tensors of one layer (or block) case alive across its systems, and no more."""

    key: tuple | None = None
    bench: LayerBench | BlockBench | None = None


_slot = _Slot()


def _slot_bench(key: tuple, make: Callable[[], LayerBench | BlockBench], cfg: SuiteConfig):
    if _slot.key != key:
        _slot.bench = None
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        _slot.bench = make()
        _slot.key = key
    return _slot.bench


def _layer_bench(case: LayerCase, mode: str, cfg: SuiteConfig) -> LayerBench:
    return _slot_bench(("layer", case.id, mode), lambda: LayerBench(
        case, training=mode == "train", dtype=DTYPES[cfg.dtype], device=cfg.device), cfg)


def _pedantic(benchmark, fn: Callable, inputs: list, cfg: SuiteConfig) -> float:
    """Time ``fn`` over rotating inputs under pytest-benchmark; returns the median seconds."""
    cycle = itertools.cycle(inputs)
    cuda = cfg.device.type == "cuda"

    def setup():
        if cuda:
            torch.cuda.synchronize()

    def call():
        fn(next(cycle))
        if cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(call, setup=setup, rounds=cfg.rounds, iterations=1,
                       warmup_rounds=cfg.warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing measured
        return float("nan")
    return stats.stats.median


def _ratios(info: dict, mine: float, baselines: dict[str, float]) -> None:
    for name, theirs in baselines.items():
        info[f"speedup_vs_{name}"] = mine / theirs if theirs and mine == mine else None


def timed_layer(benchmark, case: LayerCase, mode: str, system: str, cfg: SuiteConfig,
                ceilings: Ceilings) -> dict:
    """Time one layer system; fills and returns ``benchmark.extra_info``. Skips if unavailable."""
    import pytest

    bench = _layer_bench(case, mode, cfg)
    fn, reason = bench.system(system)
    if fn is None:
        pytest.skip(reason)
    median = _pedantic(benchmark, fn, bench.inputs, cfg)
    info = benchmark.extra_info
    info.update(case=case.id, layer=case.shape.label(), epilogue=case.epilogue.label(),
                mode=mode, system=system, batch=case.shape.n, dtype=cfg.dtype,
                flops=bench.flops, bytes=bench.bytes, input_copies=bench.copies,
                bound_s=ceilings.bound_seconds(bench.flops, bench.bytes))
    if median == median:
        info["img_s"] = case.shape.n / median
        info.update(achieved(bench.flops, bench.bytes, median, ceilings))
        seen = cfg.store.setdefault((case.id, mode), {})
        if system.startswith("fastres-"):
            _ratios(info, info["img_s"], {k: v for k, v in seen.items()
                                          if not k.startswith("fastres-")})
        seen[system] = info["img_s"]
    if cfg.note:
        info["note"] = cfg.note
    return info


def timed_model(benchmark, name: str, mode: str, system: str, cfg: SuiteConfig,
                ceilings: Ceilings) -> dict:
    training = mode == "train"
    bench = ModelBench(name, system, training=training, batch=cfg.batch,
                       resolution=cfg.resolution, dtype=DTYPES[cfg.dtype], device=cfg.device)
    saved = None
    try:
        median = _pedantic(benchmark, bench.step(), bench.inputs, cfg)
        try:  # train, fastres / eager: bytes kept for backward; never costs the timing
            saved = bench.saved_bytes()
        except Exception as e:
            benchmark.extra_info["saved_bytes_error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        source = bench.source
        del bench
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    info = benchmark.extra_info
    info.update(model=name, mode=mode, system=system, source=source, batch=cfg.batch,
                resolution=cfg.resolution, dtype=cfg.dtype)
    roof = model_roofline(model_conv_layers(name, 1, cfg.resolution), training=training,
                          dtype=DTYPES[cfg.dtype], batch=cfg.batch)
    bound = roofline_img_s(roof, ceilings)
    info["roofline_img_s"] = bound
    if training:  # the paper traffic of eager / per-layer / block fused (see .traffic)
        info["traffic"] = traffic_report(model_conv_layers(name, 1, cfg.resolution),
                                         dtype=DTYPES[cfg.dtype], batch=cfg.batch,
                                         tbps=ceilings.tbps or None)
    if saved is not None:
        info["saved_bytes"] = saved
        kept = cfg.store.setdefault((name, mode, "saved_bytes"), {})
        kept[system] = saved
        if system == "fastres" and kept.get("eager"):
            info["saved_bytes_vs_eager"] = saved / kept["eager"]
    if median == median:
        img_s = cfg.batch / median
        info.update(img_s=img_s, frac_roofline=img_s / bound,
                    **achieved(roof["flops_per_image"] * cfg.batch,
                               roof["bytes_per_image"] * cfg.batch, median, None))
        info["frac_peak_tflops"] = info["tflops"] / ceilings.tflops
        info["frac_peak_tbps"] = info["tbps"] / ceilings.tbps
        seen = cfg.store.setdefault((name, mode), {})
        if system == "fastres":
            _ratios(info, img_s, dict(seen))
        seen[system] = img_s
    if cfg.note:
        info["note"] = cfg.note
    return info


def timed_block(benchmark, case: BlockCase, system: str, cfg: SuiteConfig,
                ceilings: Ceilings) -> dict:
    """Time a training step (forward + backward) of one block system; fills and returns
    ``benchmark.extra_info`` (ms per step, saved bytes, speed-ups and saved-bytes ratios over
    the systems timed before it, the paper traffic bound of each design)."""
    bench = _slot_bench(("block", case.id), lambda: BlockBench(
        case, dtype=DTYPES[cfg.dtype], device=cfg.device), cfg)
    median = _pedantic(benchmark, bench.system(system), bench.inputs, cfg)
    info = benchmark.extra_info
    info.update(case=case.id, block=case.path, label=case.label(), mode="train",
                system=system, batch=case.batch, dtype=cfg.dtype, input_copies=bench.copies)
    traffic = traffic_report(case.layers, dtype=DTYPES[cfg.dtype], batch=case.batch,
                             tbps=ceilings.tbps or None)
    for design in traffic["designs"].values():
        design["bound_ms"] = (design["gb_per_step"] / ceilings.tbps if ceilings.tbps
                              else None)
    info["traffic"] = traffic
    saved = bench.saved_bytes(system)
    if saved is not None:
        info["saved_bytes"] = saved
        kept = cfg.store.setdefault((case.id, "saved_bytes"), {})
        if kept.get("eager"):
            info["saved_bytes_vs_eager"] = saved / kept["eager"]
        kept[system] = saved
    if median == median:
        info["ms_per_step"] = median * 1e3
        info["img_s"] = case.batch / median
        seen = cfg.store.setdefault((case.id, "train"), {})
        if system.startswith("fastres"):
            _ratios(info, info["img_s"], dict(seen))
        seen[system] = info["img_s"]
    if cfg.note:
        info["note"] = cfg.note
    return info
