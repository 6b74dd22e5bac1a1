"""What a model's steps launch on a device class, before buying time on one: ``fastres kernels``.

    fastres kernels resnet50 --device sm_100 --batch 256 --dtype bf16 [--compile]

Runs a training step (forward, loss, backward) and an eval step of the fused model with fake
CUDA tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and strides, no
memory, no GPU) inside :func:`fastres.backends.devices.simulate` of the class, so dispatch and
the Triton pruners answer for that card. The op layer and the backends' launch planning run as
they would on the card; only the launch itself is replaced (:func:`fastres.backends.triton.
_tuning.recording`): each Triton launch is recorded with its kernel, its configuration (the
first one left after pruning, as with ``FASTRES_TRITON_AUTOTUNE=0``), its constexprs and the
specialisation Triton's JIT derives from its arguments (pointer dtypes; integers equal to 1
become constants, multiples of 16 get ``tt.divisibility``). Launches with the same kernel,
configuration and specialisation are one compile unit: what Triton compiles once per process.

Three things the fake run does differently from a real one, none of which changes what is
launched: the fused ops' custom-op implementations are called directly (FakeTensorMode would
run their fake kernels instead); autograd's backward is walked in Python (the C++ engine looks
for a CUDA context for the streams of CUDA tensors, and there is none), node by node with the
same backward functions; and the optimizer step (plain PyTorch, no Triton) is left out.

With ``--compile`` each unit is compiled for the class's target with the real compiler in a
process pool (``triton.compile`` as :mod:`fastres.analysis.kernel_report` does) and its SASS
read: registers, spills, MMA, asynchronous copies. The sum of the compile times is what the
first step waits for with autotuning off (Triton compiles a unit when it is first launched, one
after another in the launching process); the pool's wall time is what a parallel precompile
would take, not what the JIT does. These are this machine's CPU times.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import os
import resource
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backends import devices

MODES = ("train", "eval")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# triton.testing.do_bench's defaults, with which triton.autotune times each configuration
BENCH_WARMUP_MS, BENCH_REP_MS = 25, 100
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
       torch.bool: "i1"}


@dataclasses.dataclass
class Unit:
    """One compile unit: a kernel with one configuration and one argument specialisation."""

    kernel: str  # "conv:_conv_gemm_kernel"
    config: str  # "BLOCK_M=128,... w8 s3" (Tuned kernels) or the constexprs of a plain kernel
    dtype: str  # the first pointer argument's element type ("bf16")
    signature: dict[str, str]  # every non-constexpr argument's Triton type
    constexprs: dict[str, Any]
    ints: dict[str, int]  # the integer arguments of the first launch
    ones: list[str]  # integer arguments equal to 1: compile-time constants
    divisible: list[str]  # arguments with tt.divisibility 16 (aligned pointers, multiples of 16)
    num_warps: int
    num_stages: int
    tensor_cores: bool  # a tensor-core kernel (held to the report's MMA rule)
    candidates: int  # configurations left after pruning (1: a plain kernel)
    modes: list[str] = dataclasses.field(default_factory=list)
    launches: int = 0
    unaligned: list[str] = dataclasses.field(default_factory=list)  # pointers off 16 bytes
    compiled: dict[str, Any] | None = None  # --compile: the kernel report's row

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["constexprs"] = {k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
                             for k, v in self.constexprs.items()}
        return out


@dataclasses.dataclass
class Report:
    """What ``fastres kernels`` found for one model, device class, batch and dtype."""

    model: str
    device: devices.DeviceClass
    batch: int
    resolution: int
    dtype: str
    modes: list[str]
    units: list[Unit]
    served: dict[str, Counter]  # mode -> Counter of "op direction backend"
    tuning_keys: int  # distinct autotuner keys (each times its surviving configurations)
    tuning_configs: int  # configurations the autotuner would time in all
    tuning_units: int  # distinct compile units if every surviving configuration compiles
    compile_seconds: float | None = None  # sum over units (--compile)
    compile_wall: float | None = None  # with the process pool
    compile_jobs: int | None = None
    compile_load: float | None = None  # the machine's 1-minute load average after compiling
    only: str = ""  # units kept: those whose kernel name contains this


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------


def _kernel_name(fn: Any) -> str:
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}:{fn.__name__}"


def _tensor_core_kernels() -> set[Any]:
    """The jit functions the kernel report holds to the tensor-core rule (MMA, async copies)."""
    from .analysis.compile import MODULES

    return {s.kernel for m in MODULES for s in importlib.import_module(m).compile_specs()
            if s.tensor_cores}


class _Recorder:
    """The sink of :func:`fastres.backends.triton._tuning.recording`: launches to units."""

    def __init__(self) -> None:
        self.mode = ""
        self.units: dict[tuple, Unit] = {}
        self.tuning: dict[tuple, list[tuple]] = {}  # autotuner key -> unit keys of candidates
        self._tensor_cores = _tensor_core_kernels()

    def _unit(self, fn: Any, args: tuple, kwargs: dict[str, Any], label: str | None,
              candidates: int) -> tuple[tuple, Unit]:
        from .analysis.compile import CompileSpec, launch_source
        from .backends.triton._tuning import aligned16

        bound = dict(zip(fn.arg_names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in fn.arg_names)
        signature, constexprs, ints, unaligned = {}, {}, {}, []
        dtype = ""
        for param in fn.params:
            name = param.name
            value = bound.get(name, param.default)
            if param.is_constexpr:
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TL[value.dtype]
                dtype = dtype or _TL[value.dtype]
                if not aligned16(value):
                    unaligned.append(name)
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                ints[name] = value
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif value is None:
                constexprs[name] = None
            else:
                raise TypeError(f"{_kernel_name(fn)}: cannot record argument {name}={value!r}")
        num_warps, num_stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        spec = CompileSpec(_kernel_name(fn), fn, signature, constexprs, num_warps, num_stages,
                           ints=ints)
        sig, consts, attrs = launch_source(spec)
        divisible = [fn.arg_names[i[0]] for i in attrs]
        ones = [k for k in ints if k not in sig]
        if label is None:
            label = ",".join(f"{k}={v}" for k, v in constexprs.items()
                             if k != "INTERPRET" and v is not None)
        key = (fn, tuple(sig.items()), tuple(map(repr, consts.items())), tuple(divisible),
               num_warps, num_stages, tuple(unaligned))
        unit = Unit(_kernel_name(fn), label, dtype, signature, constexprs, ints, ones, divisible,
                    num_warps, num_stages, fn in self._tensor_cores, candidates,
                    unaligned=unaligned)
        return key, unit

    def __call__(self, fn: Any, args: tuple, kwargs: dict[str, Any], tuned: Any,
                 candidates: list | None) -> None:
        from .backends.triton._tuning import config_label

        label = None if tuned is None else config_label(tuned.last_config)
        key, unit = self._unit(fn, args, kwargs, label, len(candidates or [None]))
        unit = self.units.setdefault(key, unit)
        unit.launches += 1
        if self.mode not in unit.modes:
            unit.modes.append(self.mode)
        if tuned is None:
            return
        # the autotuner's key: its key arguments and every tensor argument's dtype
        named = dict(zip(fn.arg_names, args))
        tune_key = (fn, *(kwargs.get(k, named.get(k)) for k in tuned.key),
                    *(a.dtype for a in args if isinstance(a, torch.Tensor)))
        if tune_key not in self.tuning:
            plain = {k: v for k, v in kwargs.items() if k not in tuned.last_config.all_kwargs()}
            self.tuning[tune_key] = [
                self._unit(fn, args, {**plain, **c.all_kwargs()}, config_label(c), 0)[0]
                for c in candidates]


class _RunFusedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Calls fastres's custom ops' implementations (the backends' Python launch code) on fake
    tensors, where FakeTensorMode alone would call their fake kernels."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastres":
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func)
            if opdef is not None:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _autocast(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast to ``dtype`` set directly: ``torch.autocast("cuda")`` turns itself off
    where no CUDA device is present."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


class _NoDeviceSwitch:
    """Stands in for ``torch.cuda.device`` while recording: there is no device to switch to."""

    def __init__(self, device: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_tensor_args: dict[Any, list[bool]] = {}  # Python autograd.Function node -> tensor args


@contextlib.contextmanager
def _tracking_function_args() -> Iterator[None]:
    """Remember which forward arguments of each Python ``autograd.Function`` call were tensors:
    its backward returns one gradient per argument, its node has an edge per tensor argument
    only (the C++ engine keeps that map internally)."""
    function = torch.autograd.Function
    base = function.__dict__["apply"]  # a descriptor: bound to each subclass on lookup

    def apply(cls, *args, **kwargs):
        out = base.__get__(None, cls)(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if isinstance(first, torch.Tensor) and first.grad_fn is not None:
            _tensor_args[first.grad_fn] = [isinstance(a, torch.Tensor) for a in args]
        return out

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = base
        _tensor_args.clear()


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the C++ engine: each autograd node is called once all the
    nodes feeding it have run, with the sum of the gradients it received (gradients of leaves
    are not accumulated: nothing reads them here). Needs :func:`_tracking_function_args` active
    during the forward."""
    root = loss.grad_fn
    waiting: Counter = Counter()
    seen, stack = {root}, [root]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            waiting[node] += 1
            if node not in seen:
                seen.add(node)
                stack.append(node)
    grads: dict[Any, list] = {root: [torch.ones_like(loss)]}
    ready = [root]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            inputs = grads.pop(node)
            if type(node).__name__ == "AccumulateGrad":
                continue
            if callable(node):  # a C++ node: one output per edge
                outputs = node(*inputs)
            else:  # a Python autograd.Function: one per forward argument, edges for tensors
                outputs = node.apply(*inputs)
                outputs = (outputs,) if not isinstance(outputs, tuple) else outputs
                outputs = [g for g, t in zip(outputs, _tensor_args[node], strict=True) if t]
            if isinstance(outputs, torch.Tensor) or outputs is None:
                outputs = (outputs,)
            for (nxt, nr), grad in zip(node.next_functions, outputs, strict=True):
                if nxt is None:
                    continue
                slots = grads.setdefault(nxt, [None] * len(nxt._input_metadata))
                if grad is not None:
                    slots[nr] = grad if slots[nr] is None else slots[nr] + grad
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    ready.append(nxt)
    if grads:
        raise RuntimeError(f"backward: {len(grads)} autograd nodes never became ready")


def _fake_cuda(model: nn.Module) -> None:
    """Replace every parameter and buffer by a fake CUDA tensor of the same shape, dtype and
    strides (inside FakeTensorMode)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cuda")
                module._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype,
                                                            device="cuda")


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The fused model ``fastres kernels`` looks at, as ``fastres summary --fused`` builds it."""
    from .cli import summary_model

    return summary_model(name, True, num_classes, command="kernels")


def record(model: nn.Module, device: devices.DeviceClass | int, *, batch: int,
           resolution: int = 224, dtype: torch.dtype = torch.bfloat16,
           modes: Sequence[str] = MODES, backend: str = "auto",
           ) -> tuple[list[Unit], dict[str, Counter], _Recorder]:
    """The compile units of ``modes`` steps of ``model`` (parameters as they are: fp32, with
    fp16 / bf16 under autocast) on device class ``device`` (a class or a target such as 100),
    with fake CUDA tensors; ``model``'s parameters and buffers are replaced by fake ones.
    Also returns which backend served the fused passes of each mode, and the recorder."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import backends
    from .backends.triton import _tuning
    from .backends.triton import conv as triton_conv

    if _tuning.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter's kernels have their own "
                           "configurations, not the GPU's; unset it")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    target = device.target if isinstance(device, devices.DeviceClass) else device
    smem = device.smem_per_block if isinstance(device, devices.DeviceClass) else None
    recorder = _Recorder()
    served: dict[str, Counter] = {}
    half = dtype in (torch.float16, torch.bfloat16)
    placeholders = dict(triton_conv._placeholders)  # it caches one tensor per device
    real_device_switch = torch.cuda.device
    model = model.to(memory_format=torch.channels_last)
    try:
        torch.cuda.device = _NoDeviceSwitch
        with (devices.simulate(target, smem), FakeTensorMode(), _RunFusedOps(),
              _tuning.recording(recorder), backends.use_backend(backend),
              _tracking_function_args()):
            _fake_cuda(model)
            x = torch.empty(batch, 3, resolution, resolution, device="cuda",
                            memory_format=torch.channels_last)
            for mode in modes:
                recorder.mode = mode
                cast = _autocast(dtype) if half else contextlib.nullcontext()
                with backends.record_calls() as calls:
                    if mode == "train":
                        model.train()
                        labels = torch.zeros(batch, dtype=torch.long, device="cuda")
                        with cast:
                            loss = F.cross_entropy(model(x).float(), labels)
                        backward(loss)
                    else:
                        model.eval()
                        with torch.no_grad(), cast:
                            model(x)
                served[mode] = Counter(f"{c.op} {c.direction} {c.backend}" for c in calls)
    finally:
        torch.cuda.device = real_device_switch
        triton_conv._placeholders.clear()
        triton_conv._placeholders.update(placeholders)
    return list(recorder.units.values()), served, recorder


# ---------------------------------------------------------------------------------------------
# Compiling units
# ---------------------------------------------------------------------------------------------


def _compile_unit(task: tuple[str, str, dict, dict, dict, int, int, bool, int]
                  ) -> tuple[dict[str, Any], float, str]:
    """Compile one unit for target ``cc`` (a worker process): the kernel report's row."""
    from .analysis import kernel_report
    from .analysis.compile import CompileSpec
    from .backends.triton._tuning import Tuned

    module, name, signature, constexprs, ints, warps, stages, tensor_cores, cc = task
    fn = getattr(importlib.import_module(module), name)
    if isinstance(fn, Tuned):  # a module attribute wrapped by _tuning.autotune
        fn = fn.fn
    spec = CompileSpec(f"{name}", fn, signature, constexprs, warps, stages, ints=ints,
                       shape_class="launch", tensor_cores=tensor_cores)
    cpu = _cpu_seconds()
    row, took, trace = kernel_report.compile_row(spec, cc, module)
    row["cpu_seconds"] = round(_cpu_seconds() - cpu, 3)
    return row, took, trace


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas runs as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _cold_cache(path: str) -> None:
    """Pool initializer: compile into an empty Triton cache, so that every unit is compiled
    (Triton's disk cache would hand back what an earlier run compiled, in no time)."""
    os.environ["TRITON_CACHE_DIR"] = path


def compile_units(units: Sequence[Unit], target: int, jobs: int | None = None
                  ) -> tuple[float, float]:
    """Compile every unit for ``target`` into an empty Triton cache (sets :attr:`Unit.compiled`,
    whose ``seconds`` is the wall time and ``cpu_seconds`` the CPU time of its compile, ptxas
    included); returns ``(sum of the units' CPU times, wall time of the pool)`` in seconds."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: compiling needs the real compiler")
    tasks = []
    for u in units:
        module = next(m for m in _kernel_modules() if m.endswith("." + u.kernel.split(":")[0]))
        tasks.append((module, u.kernel.split(":")[1], u.signature, u.constexprs, u.ints,
                      u.num_warps, u.num_stages, u.tensor_cores, target))
    start = time.perf_counter()
    total = 0.0
    with (tempfile.TemporaryDirectory(prefix="fastres-kernels-") as cache,
          concurrent.futures.ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1,
                                                 initializer=_cold_cache,
                                                 initargs=(cache,)) as pool):
        for unit, (row, took, trace) in zip(units, pool.map(_compile_unit, tasks)):
            row["seconds"] = round(took, 3)
            if trace:
                row["trace"] = trace
            unit.compiled = row
            total += row["cpu_seconds"]
    return total, time.perf_counter() - start


def _kernel_modules() -> tuple[str, ...]:
    from .analysis.compile import MODULES

    return MODULES


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def parse_device(text: str) -> devices.DeviceClass:
    """``sm_100``, ``100``, ``10.0`` or ``sm_120a`` -> that device class."""
    t = text.strip().lower().removeprefix("sm_").removeprefix("sm").rstrip("a")
    try:
        if "." in t:
            major, minor = (int(v) for v in t.split("."))
        else:
            major, minor = divmod(int(t), 10)
    except ValueError:
        raise ValueError(f"--device wants a target such as sm_90 or 9.0, got {text!r}") from None
    cls = devices.make_class((major, minor))
    if cls is None:
        raise ValueError(f"{text}: fastres serves compute capability 7.0 and later")
    return cls


def kernels_report(model_name: str, device: str | devices.DeviceClass, *, batch: int,
                   resolution: int = 224, dtype: str = "bf16", modes: Sequence[str] = MODES,
                   compile: bool = False, only: str = "", jobs: int | None = None,
                   num_classes: int = 1000, backend: str = "auto") -> Report:
    """Record (and with ``compile`` compile) what ``model_name``'s steps launch on ``device``;
    ``only`` keeps the units whose kernel name contains it."""
    cls = parse_device(device) if isinstance(device, str) else device
    if dtype not in DTYPES:
        raise ValueError(f"--dtype wants one of {', '.join(DTYPES)}, got {dtype!r}")
    model = build_model(model_name, num_classes)
    units, served, recorder = record(model, cls, batch=batch, resolution=resolution,
                                     dtype=DTYPES[dtype], modes=modes, backend=backend)
    units = [u for u in units if only in u.kernel]
    tuning_units = {k for keys in recorder.tuning.values() for k in keys}
    report = Report(model_name, cls, batch, resolution, dtype, list(modes), units, served,
                    tuning_keys=len(recorder.tuning),
                    tuning_configs=sum(len(v) for v in recorder.tuning.values()),
                    tuning_units=len(tuning_units | set(recorder.units)), only=only)
    if compile and units:
        report.compile_seconds, report.compile_wall = compile_units(units, cls.target, jobs)
        report.compile_jobs = jobs or os.cpu_count() or 1
        report.compile_load = os.getloadavg()[0]
    return report


def report_json(report: Report) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(report).items() if k not in ("units", "device")}
    out["device"] = dataclasses.asdict(report.device) | {"name": report.device.name}
    out["served"] = {m: dict(c) for m, c in report.served.items()}
    out["units"] = [u.as_json() for u in report.units]
    return out


def unit_problems(unit: Unit, cls: devices.DeviceClass) -> list[str]:
    """What is wrong with a compiled unit on device class ``cls``: the kernel report's rules,
    shared memory beyond the class's limit, a launch with unaligned pointers (compiled as if
    aligned: what ran would differ)."""
    row = unit.compiled
    if row is None:
        return []
    found = list(row["violations"])
    if row["status"] == "ok" and row["shared"] > cls.smem_per_block:
        found.append(f"{row['shared'] / 1024:.0f} KB shared memory, over the "
                     f"{cls.smem_per_block // 1024} KB of {cls.name}")
    if unit.unaligned:
        found.append(f"pointers not 16-byte aligned: {', '.join(unit.unaligned)}")
    return found


def unit_clean(unit: Unit, cls: devices.DeviceClass) -> bool | None:
    """Whether a compiled unit has no :func:`unit_problems` (None: not compiled)."""
    return None if unit.compiled is None else not unit_problems(unit, cls)


def _prose(text: str) -> list[str]:
    """A sentence of the report, wrapped at 100 columns."""
    return textwrap.wrap(text, width=100, subsequent_indent="    ")


def report_lines(report: Report) -> list[str]:
    cls = report.device
    lines = _prose(f"{report.model}: Triton kernels of a {'+'.join(report.modes)} step on "
             f"{cls.describe()}; batch {report.batch}, {report.resolution}x{report.resolution}, "
             f"{report.dtype}, autotuning off (first configuration left after pruning)")
    for mode, calls in report.served.items():
        detail = ", ".join(f"{n} {k}" for k, n in sorted(calls.items()))
        lines += _prose(f"  {mode}: fused passes served: {detail or 'none'}")
    compiled = any(u.compiled for u in report.units)
    head = f"{'#':>3s} {'mode':10s} {'kernel':30s} {'dtype':5s} {'launch':>6s}"
    if compiled:
        head += f" {'regs':>4s} {'smemKB':>6s} {'spill':>5s} {'mma':7s} {'g2s':7s} {'cpu s':>6s}"
    lines += [head + "  configuration | integer arguments specialised to 1"
              + ("; compile status" if compiled else ""),
              "-" * (len(head) + 40)]
    for i, u in enumerate(report.units, 1):
        line = f"{i:3d} {'+'.join(u.modes):10s} {u.kernel:30s} {u.dtype:5s} {u.launches:6d}"
        row = u.compiled
        if row is not None and row["status"] == "ok":
            line += (f" {row['regs']:4d} {row['shared'] / 1024:6.1f} "
                     f"{row['spill_store_bytes']:5d} {row['mma']:7s} {row['g2s']:7s} "
                     f"{row['cpu_seconds']:6.2f}")
        line += f"  {u.config}" + (f" | =1: {','.join(u.ones)}" if u.ones else "")
        if row is not None:
            line += f"; {'; '.join(unit_problems(u, cls)) or 'clean'}"
        lines.append(line)
    per_mode = {m: sum(m in u.modes for u in report.units) for m in report.modes}
    lines.append(f"{len(report.units)} distinct compile units ("
                 + ", ".join(f"{m}: {n}" for m, n in per_mode.items())
                 + f"), {sum(u.launches for u in report.units)} launches")
    if report.compile_seconds is not None:
        clean = sum(bool(unit_clean(u, cls)) for u in report.units)
        lines += _prose(
            f"compiled for sm_{cls.target}: {clean} of {len(report.units)} clean. Cold first "
            f"step with autotuning off: {report.compile_seconds:.1f} s of compiling (CPU time "
            f"summed over the units: Triton's JIT compiles each unit at its first launch, one "
            f"after another, in the launching process), {report.compile_wall:.1f} s wall here "
            f"with {report.compile_jobs} processes (a parallel precompile: the JIT does not do "
            f"this; load average {report.compile_load:.1f} on {os.cpu_count()} cores). This "
            f"machine's CPU, empty Triton cache; a later process finds the units in Triton's "
            f"disk cache.")
    # triton.autotune times each configuration with triton.testing.do_bench's defaults
    timing = report.tuning_configs * (BENCH_WARMUP_MS + BENCH_REP_MS) / 1000
    line = (f"with autotuning on (the whole step): {report.tuning_keys} autotuner keys time "
            f"{report.tuning_configs} configurations in all, each compiled and then timed on the "
            f"GPU (do_bench: {BENCH_WARMUP_MS} ms warm-up + {BENCH_REP_MS} ms of repetitions, so "
            f">= {timing:.0f} s of timing); {report.tuning_units} distinct compile units")
    if report.compile_seconds is not None and report.units and not report.only:
        mean = report.compile_seconds / len(report.units)
        line += (f", ~{mean * report.tuning_units:.0f} s of compiling at this step's mean "
                 f"{mean:.1f} s per unit (an estimate: not compiled)")
    lines += _prose(line)
    return lines
