"""The ``fastres`` command: ``fastres bench``, ``fastres info``, ``fastres tune``,
``fastres summary``, ``fastres memory``, ``fastres kernels`` and ``fastres coverage``.

``fastres bench`` times fastres against PyTorch eager and ``torch.compile`` (model img/s, a
training step of single residual blocks: the block op vs the same block layer by layer, and
per-layer times with ``--layers``; ``--levels`` chooses), prints a table, and writes
``results.json`` and ``results.png`` to ``--out``. ``fastres info`` lists versions, the GPU,
and which backends can run here and why not. ``fastres tune MODEL`` autotunes a model's conv
shapes once (kept in Triton's disk cache). ``fastres summary MODEL`` prints a model's layer
table (see :mod:`fastres.summary`). ``fastres memory MODEL`` counts the bytes a training step
keeps for backward, fastres vs eager, next to the paper traffic model of
:mod:`fastres.benchmark.traffic`. ``fastres kernels MODEL --device sm_XX`` lists the Triton
compile units a model's training and eval steps launch on a device class, without a GPU, and with
``--compile`` compiles them for it (see :mod:`fastres.kernels`).
:mod:`fastres.benchmark.traffic`. ``fastres coverage MODEL...`` says how many of a model's convs
followed by a norm ``fastres.fuse`` fuses, per layer and in block ops, and why not the rest
(:mod:`fastres.coverage`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the benchmark modules import torch: only when a command needs them
    from .benchmark.runner import BenchConfig

from .backends import NAMES as _BACKEND_NAMES

BACKENDS = tuple(n for n in _BACKEND_NAMES if n != "auto")


# ---------------------------------------------------------------------------------------------
# fastres info
# ---------------------------------------------------------------------------------------------


def _sample_call(device, dtype):
    """A ResNet-50 3x3 convolution in training on ``device``: what a backend is asked about."""
    import torch

    from .backends import CallInfo, ConvParams

    return CallInfo(device=torch.device(device), dtype=dtype, x_shape=(32, 64, 56, 56),
                    weight_shape=(64, 64, 3, 3), conv=ConvParams((1, 1), (1, 1), (1, 1), 1),
                    batch_stats=True, has_residual=False, act="relu")


def _info_device():
    """The device ``fastres info`` reports on: the current CUDA device, else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def backend_report(device=None) -> list[tuple[str, bool, str]]:
    """``(name, available, note)`` for each backend on ``device`` (default: the current CUDA
    device, else the CPU); the note says why not, or any caveat."""
    import torch

    from . import backends
    from .backends import devices

    device = _info_device() if device is None else torch.device(device)
    on_cuda = device.type == "cuda"
    cls = devices.device_class(device)
    rows = []
    for name in BACKENDS:
        impl = backends.load(name)
        if impl is None:
            rows.append((name, False, backends.load_error(name) or "failed to load"))
            continue
        notes = []
        if on_cuda:
            why = backends.availability(name, _sample_call(device, torch.float32))
            if why is not None:
                rows.append((name, False, why))
                continue
            why_bf16 = backends.availability(name, _sample_call(device, torch.bfloat16))
            if why_bf16 is not None:
                notes.append(f"not in bfloat16: {why_bf16}")
            if name == "triton" and cls is not None and not cls.tensor_cores:
                notes.append(f"no tensor cores for Triton on {cls.name}: auto serves reference, "
                             "backend='triton' runs when asked")
        if name == "triton" and not on_cuda:
            interp = os.environ.get("TRITON_INTERPRET") == "1"
            notes.append("no CUDA device: kernels run under the Triton interpreter (correctness "
                         "only)" if interp else
                         "no CUDA device: usable only under the interpreter (TRITON_INTERPRET=1)")
        elif name == "cuda":
            from .backends.cuda import BUILT_ARCHS

            if not on_cuda:
                notes.append("extension loaded, but its kernels need a CUDA device")
            notes.append(f"holds {', '.join(BUILT_ARCHS)}")
        elif name == "reference":
            notes.append("plain PyTorch; ground truth and CPU fallback")
        rows.append((name, True, "; ".join(notes)))
    return rows


def auto_line(device=None) -> str:
    """What ``"auto"`` serves on ``device`` and why (:func:`fastres.backends.auto_reason`)."""
    import torch

    from .backends import auto_reason

    device = _info_device() if device is None else torch.device(device)
    why = auto_reason(device)
    if why is not None:
        return f"reference (PyTorch): {why}"
    line = "the fused kernels (triton, then cuda, then reference where they cannot serve)"
    if why_bf16 := auto_reason(device, torch.bfloat16):
        line += f"; bfloat16 on reference: {why_bf16}"
    return line


# What each backend's training backward runs for the convolution's dgrad / wgrad.
_BACKWARD_USES = {
    "triton": "Triton dgrad/wgrad kernels that form dy while loading it (no PyTorch conv)",
    "cuda": "its dReLU/dBN kernels, then PyTorch's convolution backward (cuDNN)",
    "reference": "PyTorch (cuDNN on GPU)",
}


# How each backend serves a whole residual block in training (fastres.ops.block).
_BLOCKS_USE = {
    "triton": "one block op: BN+ReLU in the next conv's prologue, dReLU/dBN in dgrad's epilogue",
    "cuda": "no block kernels yet: blocks run layer by layer (the per-layer fused op)",
    "reference": "one block op in plain PyTorch (the ground truth)",
}


def info_lines(device=None) -> list[str]:
    """The lines of ``fastres info`` for ``device`` (default: the current CUDA device, else the
    CPU; a simulated device class answers for a card that is not here)."""
    import torch

    import fastres

    from .backends import devices
    from .benchmark.env import driver_version, gpu_record, triton_version

    gpu = gpu_record()
    lines = [
        f"fastres  {fastres.__version__}",
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__}",
        f"triton   {triton_version() or 'not installed'}",
        f"CUDA     {torch.version.cuda or 'none (CPU build of torch)'}",
        f"driver   {driver_version() or 'none'}",
        "GPU      " + (f"{gpu['name']} (capability {gpu['capability']}, "
                       f"{gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs)"
                       if gpu else "none"),
    ]
    device = _info_device() if device is None else torch.device(device)
    if device.type == "cuda":
        cls = devices.device_class(device)
        lines.append("class    " + (cls.describe() if cls is not None else
                                    "none (older than sm_70, or no device to ask)"))
    lines += [
        f"backend in force: {fastres.get_backend()}",
        f"auto serves: {auto_line(device)}",
        "backends:",
    ]
    for name, ok, note in backend_report(device):
        status = "available" if ok else "unavailable"
        lines.append(f"  {name:<10} {status:<12} {note}")
        lines.append(f"  {'':<10} {'':<12} backward: {_BACKWARD_USES[name]}")
        lines.append(f"  {'':<10} {'':<12} blocks:   {_BLOCKS_USE[name]}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# ---------------------------------------------------------------------------------------------
# fastres bench
# ---------------------------------------------------------------------------------------------


def _module_or_none(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress callback: a rich bar, else tqdm, else one plain line per step.

    The first call announces the ceiling measurement, which ``total`` does not count.
    """
    rich_progress = _module_or_none("rich.progress") if enabled else None
    tqdm_module = _module_or_none("tqdm") if enabled and rich_progress is None else None
    started = [False]
    if rich_progress is not None:
        rp = rich_progress
        with rp.Progress(rp.TextColumn("{task.description:<60}"), rp.BarColumn(),
                         rp.MofNCompleteColumn(), rp.TimeElapsedColumn()) as bar:
            task = bar.add_task("fastres bench", total=total)

            def advance(label: str) -> None:
                if started[0]:
                    bar.advance(task)
                started[0] = True
                bar.update(task, description=label[:60])

            yield advance
            bar.update(task, completed=total, description="done")
    elif tqdm_module is not None:
        with tqdm_module.tqdm(total=total, dynamic_ncols=True) as bar:

            def advance_tqdm(label: str) -> None:
                if started[0]:
                    bar.update(1)
                started[0] = True
                bar.set_description(label[:60])

            yield advance_tqdm
            bar.update(total - bar.n)
    else:
        step = [0]

        def plain(label: str) -> None:
            if enabled:
                print(f"[{step[0]}/{total}] {label}", flush=True)
            step[0] += 1

        yield plain


def bench_config(args: argparse.Namespace) -> BenchConfig:
    from .benchmark.cases import LAYER_MODEL_NAMES, MODEL_NAMES
    from .benchmark.runner import BenchConfig

    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    models = args.model or list(MODEL_NAMES)
    for name in models:
        if name not in MODEL_NAMES:
            raise SystemExit(f"fastres bench: unknown model {name!r}; choose from "
                             f"{', '.join(MODEL_NAMES)}")
    # the layer and block levels cover ResNet-50 and ResNeXt-50, narrowed to those named with
    # --model
    layer_models = [m for m in models if m in LAYER_MODEL_NAMES] or list(LAYER_MODEL_NAMES)
    levels = bench_levels(args)
    return BenchConfig(
        models=models if "model" in levels else [],
        modes=modes,
        batch=args.batch,
        resolution=args.resolution,
        dtype=args.dtype,
        compile=args.compile,
        compile_modes=args.compile_modes.split(","),
        model_compile_mode=args.model_compile_mode,
        layers="layer" in levels,
        layer_models=layer_models,
        layer_limit=args.layer_limit,
        blocks="block" in levels,
        block_models=list(layer_models),
        block_limit=args.block_limit,
        block_compile=args.block_compile,
        backend=args.backend,
        time_limit_s=args.time_limit,
        quick=args.quick,
        device=args.device,
    )


LEVELS = ("model", "block", "layer")


def bench_levels(args: argparse.Namespace) -> set[str]:
    """The levels ``fastres bench`` measures: ``--levels`` if given (``--layers`` adds the layer
    level to it), else model and block, plus layer with ``--layers``; ``--layers-only`` is
    ``--levels layer``."""
    if args.layers_only:
        return {"layer"}
    if args.levels:
        levels = {v.strip() for v in args.levels.split(",") if v.strip()}
        unknown = levels - set(LEVELS)
        if unknown or not levels:
            raise SystemExit(f"fastres bench: --levels takes a comma list of {', '.join(LEVELS)};"
                             f" got {args.levels!r}")
    else:
        levels = {"model", "block"}
    if args.layers:
        levels.add("layer")
    return levels


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import report
    from .benchmark.runner import CPU_BANNER, plan, run

    config = bench_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    cpu = not torch.cuda.is_available() if args.device is None else args.device == "cpu"
    if cpu:
        print("=" * len(CPU_BANNER))
        print(CPU_BANNER)
        print("=" * len(CPU_BANNER), flush=True)
    total = plan(config if not cpu else _tiny_preview(config))["total"]
    with _progress_bar(total, not args.no_progress) as advance:
        results = run(config, progress=advance,
                      on_update=lambda r: report.write_json(r, json_path))  # last: final
    png = report.write_plot(results, out / "results.png")
    report.print_report(results, use_rich=not args.no_progress)
    print(f"results: {json_path}")
    print(f"plot:    {png}" if png else "plot:    not written (matplotlib is not installed)")
    failed = [
        f"{e.get('model')} {e.get('id', '')} {e['mode']} {name}"
        for e in results["models"] + results["blocks"] + results["layers"]
        for name, s in e.get("systems", {}).items() if s.get("status") == "error"
    ] + [f"{e.get('id')} {e['mode']}: setup failed"
         for e in results["blocks"] + results["layers"] if "error" in e]
    if failed:
        print(f"{len(failed)} measurement(s) failed (reasons in the JSON):")
        for line in failed[:20]:
            print("  " + line)
    return 1 if failed and args.strict else 0


def _tiny_preview(config: BenchConfig) -> BenchConfig:
    """The configuration :func:`run` will use on CPU (for sizing the progress bar)."""
    import copy

    from .benchmark.runner import tiny_cpu

    return tiny_cpu(copy.deepcopy(config))


# ---------------------------------------------------------------------------------------------
# fastres tune
# ---------------------------------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> int:
    """Run a model's first steps so that every conv shape is autotuned and the choices land in
    Triton's on-disk cache: later processes with the same shapes start without tuning."""
    import time

    import torch

    from .backends.triton import _tuning
    from .benchmark.cases import MODEL_NAMES, ModelBench
    from .benchmark.runner import DTYPES
    from .benchmark.timing import synchronize

    if args.model not in MODEL_NAMES and not _has_model(args.model):
        raise SystemExit(f"fastres tune: unknown model {args.model!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("no CUDA device: the steps run, but there is nothing to tune (Triton runs on CUDA)")
    elif not _tuning.AUTOTUNE:
        print("FASTRES_TRITON_AUTOTUNE=0: kernels take their first fitting configuration; "
              "nothing is tuned")
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    for mode in modes:
        bench = ModelBench(args.model, "fastres", training=mode == "train", batch=args.batch,
                           resolution=args.resolution, dtype=DTYPES[args.dtype], device=device)
        step, times = bench.step(), []
        for i in range(2):
            t0 = time.perf_counter()
            step(bench.inputs[i % len(bench.inputs)])
            synchronize(device)
            times.append(time.perf_counter() - t0)
        print(f"{args.model} {mode} batch {args.batch} {args.dtype}: first step {times[0]:.2f} s "
              f"(compiling, autotuning), second {times[1]:.3f} s")
        del bench
    if device.type == "cuda" and _tuning.AUTOTUNE:
        where = (f"Triton's cache ({_triton_cache_dir()})" if _tuning._CACHE_KW
                 else "this process only: this Triton has no on-disk autotune cache")
        print(f"tuning results kept in {where}")
    return 0


def _has_model(name: str) -> bool:
    from . import models

    return hasattr(models, name)


def _triton_cache_dir() -> str:
    try:
        import triton

        return str(triton.knobs.cache.dir)
    except AttributeError:
        return os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")


# ---------------------------------------------------------------------------------------------
# fastres summary
# ---------------------------------------------------------------------------------------------


def summary_model(name: str, fused: bool, num_classes: int, command: str = "summary"):
    """``timm:NAME`` from timm; otherwise fastres' model (``--fused``) or the plain one
    (torchvision's where it has the name), as ``fastres bench`` builds them."""
    import warnings

    from .benchmark.cases import fastres_model, reference_model

    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name.removeprefix("timm:"), num_classes=num_classes)
        if not fused:
            return model
        with warnings.catch_warnings():  # what stays unfused shows in the table's types
            warnings.simplefilter("ignore")
            from . import fuse

            return fuse(model, inplace=True)
    make = fastres_model if fused else reference_model
    try:
        return make(name, num_classes=num_classes)
    except (RuntimeError, AttributeError, ImportError) as e:
        raise SystemExit(f"fastres {command}: cannot build model {name!r}: {e}") from e


def cmd_summary(args: argparse.Namespace) -> int:
    import torch

    from .summary import summary

    try:
        input_size = tuple(int(v) for v in args.input.split(","))
    except ValueError:
        raise SystemExit(f"fastres summary: --input wants C,H,W, got {args.input!r}") from None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = summary_model(args.model, args.fused, args.num_classes)
    result = summary(model, input_size, batch_size=args.batch, device=args.device, dtype=dtype,
                     training=args.train, print_summary=False)
    result.print(use_rich=not args.plain)
    return 0


# ---------------------------------------------------------------------------------------------
# fastres memory
# ---------------------------------------------------------------------------------------------


def memory_lines(name: str, *, batch: int, resolution: int, dtype: str, device: str | None,
                 backend: str, tbps: float | None) -> list[str]:
    """Bytes kept for backward (fastres vs eager, measured) and the traffic model's figures."""
    import torch

    from . import use_backend
    from .benchmark.cases import ModelBench, model_conv_layers
    from .benchmark.runner import DTYPES
    from .benchmark.traffic import traffic_report

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = {}
    with use_backend(backend):
        for system in ("eager", "fastres"):
            bench = ModelBench(name, system, training=True, batch=batch, resolution=resolution,
                               dtype=DTYPES[dtype], device=dev)
            saved[system] = bench.saved_bytes()
            del bench
    lines = [f"{name}: bytes a training step's forward keeps for backward (unique non-parameter "
             f"storages; batch {batch}, {resolution}x{resolution}, {dtype}, {dev}, "
             f"backend {backend})",
             f"  eager    {saved['eager']:15,d} bytes",
             f"  fastres  {saved['fastres']:15,d} bytes   "
             f"{saved['fastres'] / saved['eager']:.3f}x eager"]
    rep = traffic_report(model_conv_layers(name, 1, 224), dtype=torch.bfloat16, batch=256,
                         tbps=tbps)
    lines.append("paper HBM traffic of one training step (224x224, batch 256, bf16; "
                 "fastres.benchmark.traffic)" + (f", img/s at {tbps:g} TB/s" if tbps else ""))
    labels = {"eager": "eager", "per_layer": "per-layer fused", "block": "block fused"}
    for design, figures in rep["designs"].items():
        bound = figures["img_s_bound"]
        lines.append(f"  {labels[design]:<16} {figures['gb_per_step']:7.1f} GB"
                     + (f"   {bound:9,.0f} img/s" if bound else ""))
    if not tbps:
        lines.append("  (no bandwidth given: --tbps TB/s for the img/s this traffic allows)")
    return lines


def cmd_memory(args: argparse.Namespace) -> int:
    from .benchmark.cases import MODEL_NAMES

    if args.model not in MODEL_NAMES and not _has_model(args.model):
        raise SystemExit(f"fastres memory: unknown model {args.model!r}")
    print("\n".join(memory_lines(args.model, batch=args.batch, resolution=args.resolution,
                                 dtype=args.dtype, device=args.device, backend=args.backend,
                                 tbps=args.tbps)))
    return 0


# ---------------------------------------------------------------------------------------------
# fastres kernels
# ---------------------------------------------------------------------------------------------


def cmd_kernels(args: argparse.Namespace) -> int:
    import json

    from .kernels import kernels_report, report_json, report_lines, unit_clean

    if args.batch < 1 or args.resolution < 1:
        raise SystemExit("fastres kernels: --batch and --resolution must be positive")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    try:
        report = kernels_report(args.model, args.device, batch=args.batch,
                                resolution=args.resolution, dtype=args.dtype, modes=modes,
                                compile=args.compile, only=args.only, jobs=args.jobs,
                                num_classes=args.num_classes, backend=args.backend)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fastres kernels: {e}") from e
    print("\n".join(report_lines(report)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report_json(report), indent=1) + "\n")
    # with --compile, a unit that fails to compile or breaks a rule fails the command
    return 1 if args.compile and not all(unit_clean(u, report.device) for u in report.units) else 0
# fastres coverage
# ---------------------------------------------------------------------------------------------


def cmd_coverage(args: argparse.Namespace) -> int:
    import json

    from .coverage import build_model, coverage, coverage_lines

    try:
        size = tuple(int(v) for v in args.input.split(","))
    except ValueError:
        raise SystemExit(f"fastres coverage: --input wants C,H,W, got {args.input!r}") from None
    results = {}
    for spec in args.models:
        try:
            model = build_model(spec)
        except (ValueError, RuntimeError, AttributeError, ImportError, TypeError) as e:
            raise SystemExit(f"fastres coverage: cannot build model {spec!r}: {e}") from e
        results[spec] = coverage(model, input_size=size)
        if not args.json:
            print("\n".join(coverage_lines(spec, results[spec])))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastres", description="Fused conv + BN + ReLU for ResNet-family CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, GPU, and which backends are available")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench", help="fastres vs eager vs torch.compile: img/s, per-layer times",
        description="Time fastres against PyTorch eager (channels_last, autocast) and "
                    "torch.compile on the same card in the same run. Without a CUDA device a "
                    "tiny CPU configuration runs (its numbers say nothing about GPU speed).")
    bench.add_argument("--model", action="append", metavar="NAME",
                       help="model to time (repeatable): resnet18, resnet50, resnext50_32x4d, "
                            "wide_resnet50_2, preact_resnet50; default: all five")
    bench.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    bench.add_argument("--batch", type=int, default=256)
    bench.add_argument("--resolution", type=int, default=224)
    bench.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="also time torch.compile (default: yes)")
    bench.add_argument("--compile-modes", default="default,max-autotune",
                       help="torch.compile modes for the layer level, comma-separated "
                            "(default: default,max-autotune; max-autotune compiles slowly)")
    bench.add_argument("--model-compile-mode", default="default",
                       help="torch.compile mode for the model level")
    bench.add_argument("--layers", action="store_true",
                       help="also time every distinct conv shape of ResNet-50 and ResNeXt-50 "
                            "(only those of them named with --model, if any is)")
    bench.add_argument("--layers-only", action="store_true",
                       help="only the layer level (same as --levels layer)")
    bench.add_argument("--levels", default=None, metavar="LIST",
                       help="levels to measure, comma list of model, block, layer (default: "
                            "model,block; --layers adds layer). block: a training step "
                            "(forward + backward) of single ResNet-50 / ResNeXt-50 bottlenecks, "
                            "the fastres block op vs the same block layer by layer vs eager; "
                            "needs --mode train or both")
    bench.add_argument("--block-limit", type=int, default=None,
                       help="only the first N blocks of each model (stage order, the projection "
                            "block of a stage before its identity block)")
    bench.add_argument("--block-compile", action="store_true",
                       help="also time torch.compile of each block (a cold compile per block)")
    bench.add_argument("--layer-limit", type=int, default=None,
                       help="only the first N distinct shapes of each model")
    bench.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                       help="fastres backend for the layer level; auto: every available one")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    bench.add_argument("--out", default="fastres-bench",
                       help="output folder for results.json and results.png "
                            "(default: ./fastres-bench)")
    bench.add_argument("--quick", action="store_true",
                       help="fewer repeats, two layer shapes and the first stage's two blocks "
                            "per model")
    bench.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                       help="skip (and record as skipped) what is left after this long")
    bench.add_argument("--no-progress", action="store_true",
                       help="plain output: no progress bar, plain-text table")
    bench.add_argument("--strict", action="store_true",
                       help="exit 1 if any measurement failed")
    bench.set_defaults(func=cmd_bench)

    tune = sub.add_parser(
        "tune", help="autotune every conv shape of a model once; kept on disk for later runs",
        description="Run a fused model's first training step and/or inference pass so that "
                    "every Triton kernel is compiled and autotuned for its shapes; the choices "
                    "are kept in Triton's on-disk cache, so later processes start warm.")
    tune.add_argument("model", help="a fastres.models name, e.g. resnet50")
    tune.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    tune.add_argument("--batch", type=int, default=256)
    tune.add_argument("--resolution", type=int, default=224)
    tune.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    tune.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    tune.set_defaults(func=cmd_tune)

    summ = sub.add_parser(
        "summary", help="one row per layer or block: shape, params, FLOPs, fused kernel",
        description="Layer table of a model: output shapes, parameters, FLOPs and, for fused "
                    "calls, the backend and kernel dispatch would choose (nothing is timed).")
    summ.add_argument("model", help="a torchvision / fastres model name (resnet50, "
                                    "preact_resnet50, ...) or timm:NAME")
    summ.add_argument("--input", default="3,224,224", metavar="C,H,W",
                      help="one sample's shape (default: 3,224,224)")
    summ.add_argument("--fused", action="store_true",
                      help="the fastres model (or fastres.fuse of timm's) instead of the plain one")
    summ.add_argument("--batch", type=int, default=1)
    summ.add_argument("--num-classes", type=int, default=1000)
    summ.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    summ.add_argument("--device", default=None,
                      help="device whose dispatch to show: cuda or cpu (default: cuda if present)")
    summ.add_argument("--train", action="store_true", help="dispatch of a training step")
    summ.add_argument("--plain", action="store_true", help="plain-text table, not rich")
    summ.set_defaults(func=cmd_summary)

    mem = sub.add_parser(
        "memory", help="bytes kept for backward, fastres vs eager; paper HBM traffic of a step",
        description="Count the bytes a training step's forward keeps for backward (unique "
                    "non-parameter storages, torch.autograd.graph.saved_tensors_hooks) for the "
                    "fastres model and the plain one, same batch and dtype; print next to it "
                    "the paper HBM-traffic model of a training step (eager, per-layer fused, "
                    "block fused) at batch 256, bf16.")
    mem.add_argument("model", help="a fastres.models / torchvision name, e.g. resnet50")
    mem.add_argument("--batch", type=int, default=2)
    mem.add_argument("--resolution", type=int, default=224)
    mem.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="fp32, or autocast to bf16/fp16 as fastres bench runs")
    mem.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    mem.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                     help="fastres backend of the fused model (default: auto)")
    mem.add_argument("--tbps", type=float, default=None,
                     help="memory bandwidth in TB/s, for the img/s each design's traffic allows")
    mem.set_defaults(func=cmd_memory)

    kern = sub.add_parser(
        "kernels", help="the Triton kernels a model's steps launch on a GPU class, no GPU needed",
        description="List the Triton kernel specialisations a model's training step (forward "
                    "and backward) and eval step launch on a device class, with the "
                    "configuration each uses with autotuning off, found by running the steps "
                    "on fake CUDA tensors (no GPU needed); --compile compiles each for that "
                    "target, says whether it compiles clean and what the first step's "
                    "compiling costs (this machine's CPU).")
    kern.add_argument("model", help="a fastres.models / torchvision name, or timm:NAME")
    kern.add_argument("--device", required=True,
                      help="the device class: sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, sm_75 "
                           "(or a capability such as 10.0)")
    kern.add_argument("--batch", type=int, default=256)
    kern.add_argument("--resolution", type=int, default=224)
    kern.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                      help="autocast to bf16/fp16 (fp32 parameters), or fp32")
    kern.add_argument("--mode", default="train,eval", help="train, eval or train,eval")
    kern.add_argument("--num-classes", type=int, default=1000)
    kern.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                      help="fastres backend the fused ops ask for (default: auto)")
    kern.add_argument("--compile", action="store_true",
                      help="compile each unit for the target and read its SASS")
    kern.add_argument("--only", default="", metavar="TEXT",
                      help="only units whose kernel name contains TEXT")
    kern.add_argument("--jobs", type=int, default=None, help="compile processes (default: cores)")
    kern.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    kern.set_defaults(func=cmd_kernels)
    cov = sub.add_parser(
        "coverage", help="how much of a model fastres.fuse fuses, and why not the rest",
        description="Build each model weights-free, find the convs followed by a norm (one eval "
                    "forward on a small random input, by data flow), fuse a copy and print: "
                    "those convs, how many run fused per layer, how many train inside block "
                    "ops, activations applied after the op, and the reasons for the rest.")
    cov.add_argument("models", nargs="+", metavar="MODEL",
                     help="timm:NAME, fastres:NAME or a torchvision name; keyword arguments in "
                          "brackets and attributes after a dot, e.g. "
                          "'timm:resnet50d[drop_path_rate=0.1]', "
                          "fasterrcnn_resnet50_fpn.backbone")
    cov.add_argument("--input", default="3,64,64", help="C,H,W of the probe input")
    cov.add_argument("--json", action="store_true", help="print JSON instead of text")
    cov.set_defaults(func=cmd_coverage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
