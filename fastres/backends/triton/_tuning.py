"""Where the Triton kernels run, and how a kernel's configuration is chosen at launch.

``INTERPRET``: ``TRITON_INTERPRET=1`` at import, when ``@triton.jit`` builds interpreted kernels
(CPU tests); every module of this package reads it from here.

Every multi-configuration kernel is wrapped by :func:`autotune` instead of ``triton.autotune``:

* by default (``FASTRES_TRITON_AUTOTUNE=1``) it *is* ``triton.autotune``: each new key times the
  configurations left after pruning and remembers the fastest, in memory and, where the installed
  Triton supports it (``cache_results``, triton >= 3.3), on disk in Triton's cache, so a second
  process (the next benchmark step, the next training run) with the same shapes pays nothing;
* with ``FASTRES_TRITON_AUTOTUNE=0`` (read at import), or when only one configuration is offered
  (always under the interpreter), the kernel is launched directly with the first configuration
  that survives pruning: no timing, one compile per kernel variant. (``triton.autotune`` with a
  single surviving configuration still benchmarks it on triton 3.6, ~125 ms per key.)

Either way :attr:`Tuned.last_config` says which configuration this thread's last launch ran (the
conv launcher needs its BLOCK_M to slice the per-tile statistics), and :meth:`Tuned.forced` pins
one configuration (the GPU test that checks every configuration the autotuner may pick).

Inside :func:`recording` no kernel is compiled or launched: every launch, of a :class:`Tuned`
kernel (with the first configuration left after pruning, as with autotuning off) or of a plain
``@triton.jit`` kernel, is handed to a sink instead (``fastres kernels``: what a step would
launch on a device class, with fake tensors and no GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import triton

from .. import devices

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("FASTRES_TRITON_AUTOTUNE", "1") != "0"

Prune = Callable[..., list[triton.Config]]  # (configs, named_args, **constexprs) -> configs

# Disk caching of tuning results, where this Triton has it (it skips it under the interpreter).
_CACHE_KW = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)


_ALL: list[Tuned] = []  # every Tuned kernel, for launched_configs()

# (jit function, args, kwargs with the configuration's, the Tuned kernel or None, the
# configurations left after pruning or None) -> None; see recording()
LaunchSink = Callable[[Any, tuple, dict[str, Any], "Tuned | None", "list[triton.Config] | None"],
                      None]
_sink: LaunchSink | None = None


@contextlib.contextmanager
def recording(sink: LaunchSink) -> Iterator[None]:
    """Inside the block launches are handed to ``sink`` and never compiled or run (see the module
    docstring). Plain ``@triton.jit`` launches all go through ``JITFunction.run``, which is
    replaced for the block (process-wide: record from one thread)."""
    global _sink
    from triton.runtime.jit import JITFunction

    def record_plain(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        sink(fn, args, kwargs, None, None)

    outer, run = _sink, JITFunction.run
    _sink, JITFunction.run = sink, record_plain
    try:
        yield
    finally:
        _sink, JITFunction.run = outer, run


def aligned16(t: torch.Tensor) -> bool:
    """Whether a tensor's data starts on a 16-byte boundary (what Triton specialises pointers on
    and a TMA descriptor needs). A tensor without memory (fake or meta: ``fastres kernels``) is
    placed as PyTorch's allocator would place it: storage start aligned, plus its offset."""
    if type(t) is torch.Tensor and not t.is_meta:  # the common case first: a real tensor
        return t.data_ptr() % 16 == 0
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or t.is_meta:
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def config_label(config: triton.Config) -> str:
    """``BLOCK_M=128,BLOCK_N=64,... w4 s3``: a configuration in one short string."""
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}"


def launched_configs(clear: bool = False) -> dict[str, str]:
    """The configuration each kernel ran with at its last launch (kernel name -> label), e.g. to
    record which one the autotuner chose for a benchmarked layer; ``clear`` forgets them after."""
    seen = {t.fn.__name__: config_label(t.last_config) for t in _ALL if t.last_config}
    if clear:
        for t in _ALL:
            t.last_config = None
    return seen


@dataclasses.dataclass(frozen=True)
class SmemModel:
    """The shared memory a tiled GEMM kernel's configuration takes, counted in tiles of its
    operands A (rows x depth) and B (depth x cols) at the operand's element size.

    ``staged``: the (A, B) tiles one software-pipeline buffer holds: one per tensor loaded into
    the operand (dgrad's dy operand is formed from dz, z and y: 3 A tiles); Triton keeps
    ``num_stages - 1`` buffers. ``once``: (A, B) tiles held outside the pipeline (an operand
    formed in registers and stored for the tensor cores, the epilogue's layout conversion).
    ``scratch``: bytes of barriers and reductions. The counts are fitted per kernel to the
    compiled figures of the kernel report (``bench/kernel_report.json``), separately for the
    mma.sync targets and the wgmma / tcgen05 ones, so that the estimate is at least what each
    compiled configuration takes (tests/backends/test_devices.py checks every row).
    """

    staged: tuple[int, int]
    once: tuple[int, int]
    scratch: int

    def bytes(self, a_elems: int, b_elems: int, stages: int, elem_size: int) -> int:
        staged = self.staged[0] * a_elems + self.staged[1] * b_elems
        once = self.once[0] * a_elems + self.once[1] * b_elems
        return ((max(stages, 2) - 1) * staged + once) * elem_size + self.scratch


def gemm_smem(models: tuple[SmemModel, SmemModel], a_elems: int, b_elems: int, stages: int,
              elem_size: int, cls: devices.DeviceClass | None) -> int:
    """Shared memory of a GEMM configuration on class ``cls``: ``models`` is (mma.sync targets,
    wgmma / tcgen05 targets); the latter where ``cls`` has TMA and an asynchronous MMA (sm_90,
    sm_100), the former elsewhere."""
    model = models[1] if cls is not None and cls.mma in ("HGMMA", "UTCHMMA") else models[0]
    return model.bytes(a_elems, b_elems, stages, elem_size)


def gate_smem(a_elems: int, stages: int) -> int:
    """Shared memory the gated prologue adds to a GEMM configuration (IN_GATE, conv's
    ``_gate``): its fp32 per-(sample, channel) gate, gathered per element of the A tile (the
    rows of a tile span samples), is staged by the software pipeliner like the A tile itself
    (kernel report: exactly one fp32 A tile per pipeline buffer more)."""
    return (max(stages, 2) - 1) * a_elems * 4


def reduction_smem(cols: int, num_warps: int) -> int:
    """Shared memory of a kernel whose only staging is a cross-warp reduction of ``cols`` fp32
    values per warp (the direct convolutions, the BatchNorm kernels), barriers included."""
    return cols * 4 * num_warps + 1024


def fitting(configs: Sequence[triton.Config], need: Callable[[triton.Config], int],
            limit: int | None) -> list[triton.Config]:
    """The configurations whose shared memory ``need(config)`` fits ``limit`` bytes (every one
    off CUDA, ``limit`` None). If none does, the one needing the least with fewer pipeline
    stages until it fits (a small-memory device, e.g. sm_75's 64 KB), so a launch never asks
    for more than the device has."""
    if limit is None:
        return list(configs)
    fit = [c for c in configs if need(c) <= limit]
    if fit or not configs:
        return fit
    smallest = min(configs, key=need)
    for stages in range(smallest.num_stages - 1, 0, -1):
        shrunk = triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps,
                               num_stages=stages)
        if need(shrunk) <= limit:
            return [shrunk]
    return [smallest]  # nothing smaller exists: the launch will say it is out of resources


def target(x: torch.Tensor | None) -> int | None:
    """The kernel-report target of a tensor's device (80, 89, 90, 100, 120, 75, 70; sm_86
    devices are reported as sm_89: :attr:`DeviceClass.report_target`); None off CUDA. Keys the
    configurations pruned because they spill or do not fit there (the kernel report)."""
    cls = devices.device_class(x) if x is not None else None
    return None if cls is None else cls.report_target


def smem_limit(x: torch.Tensor | None, cc: int | None) -> int | None:
    """The shared memory per block (opt-in, bytes) a launch on ``x``'s device may use: the
    device's own, else the table figure of its target ``cc`` (a device that cannot be asked:
    fake or meta tensors); None off CUDA (``cc`` None)."""
    cls = devices.device_class(x) if x is not None else None
    if cls is not None:
        return cls.smem_per_block
    return None if cc is None else devices.for_target(cc).smem_per_block


def smem_reason(need: int, limit: int | None, cc: int | None) -> str | None:
    """Why a configuration needing ``need`` bytes of shared memory cannot launch under ``limit``
    (None: the table figure of target ``cc``; no limit off CUDA); None where it fits."""
    if limit is None and cc is not None:
        limit = devices.for_target(cc).smem_per_block
    if limit is None or need <= limit:
        return None
    return (f"needs about {-(-need // 1024)} KB of shared memory, more than the "
            f"{limit // 1024} KB per block of this sm_{cc} device")


class _TorchAllocator:
    """Global scratch for kernels that need it (a TMA descriptor built on the device), from
    PyTorch's caching allocator on the launch's current device."""

    def __call__(self, size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for on-device tensor descriptors (``tl.make_tensor_descriptor``
    in a TMA tile) if the caller has not set one: Triton's default raises at launch. The setting
    is a context variable (per thread), so each launching thread calls this."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_TorchAllocator())


class Tuned:
    """A ``@triton.jit`` kernel with autotuning configurations; launch as ``kernel[grid](...)``.

    ``fn`` is the jit function (what the compile check compiles), ``configs`` every
    configuration a GPU may run, ``prune`` an optional early pruning function with the signature
    ``triton.autotune`` expects.
    """

    def __init__(self, fn: Any, configs: Sequence[triton.Config], key: list[str],
                 prune: Prune | None = None) -> None:
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)  # the launch arguments a tuned choice is kept per (with dtypes)
        self.prune = prune
        self._last = threading.local()  # per thread: read right after a launch (conv.py)
        self._forced: triton.Config | None = None
        self._tuner = None
        self._chosen: dict[tuple, triton.Config] = {}  # launch signature -> configuration
        _ALL.append(self)
        if AUTOTUNE and len(self.configs) > 1:
            by = {"early_config_prune": prune} if prune is not None else None
            self._tuner = triton.autotune(
                configs=self.configs, key=self.key, prune_configs_by=by, **_CACHE_KW
            )(fn)

    @property
    def last_config(self) -> triton.Config | None:
        """The configuration this thread's last launch ran (another thread's launches, e.g.
        ``nn.DataParallel``'s replicas, do not change it)."""
        return getattr(self._last, "config", None)

    @last_config.setter
    def last_config(self, config: triton.Config | None) -> None:
        self._last.config = config

    @property
    def tuning(self) -> bool:
        """Whether launches time the configurations (False: the first that fits runs)."""
        return self._tuner is not None

    def candidates(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[triton.Config]:
        """The configurations left for these launch arguments after pruning."""
        if self.prune is None:
            return list(self.configs)
        named = dict(zip(self.fn.arg_names, args))
        return self.prune(self.configs, named, **kwargs) or list(self.configs)

    @contextlib.contextmanager
    def forced(self, config: triton.Config) -> Iterator[None]:
        """Launch with ``config`` (one of :attr:`configs`) inside the block, without tuning."""
        self._forced = config
        try:
            yield
        finally:
            self._forced = None

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            if _sink is not None:  # recording(): the first fitting configuration, not launched
                candidates = self.candidates(args, kwargs)
                self.last_config = self._forced or candidates[0]
                _sink(self.fn, args, {**kwargs, **self.last_config.all_kwargs()}, self,
                      candidates)
                return
            config = self._forced
            if config is None:
                key = _signature(args, kwargs)
                try:
                    config = self._chosen.get(key)
                except TypeError:  # an unhashable argument: nothing kept
                    key = None
                if config is None and self._tuner is not None:
                    # the autotuner times the configurations (or finds its choice) and launches
                    self._tuner[grid](*args, **kwargs)
                    self.last_config = self._tuner.best_config
                    if key is not None:
                        self._chosen[key] = self.last_config
                    return
                if config is None:
                    config = self.candidates(args, kwargs)[0]
                    if key is not None:
                        self._chosen[key] = config
            self.fn[grid](*args, **kwargs, **config.all_kwargs())
            self.last_config = config

        return launch


def _signature(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What a launch's configuration can depend on: every argument's value, a tensor's dtype and
    device in its place, and the keyword arguments.

    The choice, tuned or first-fitting, is kept per signature (:attr:`Tuned._chosen`) and later
    launches go straight to the kernel: Triton's autotuner rebuilds its key from dicts of every
    argument on each launch (~10 µs of host time), and pruning reads the device's capability.
    The signature holds everything either looks at (the autotuner's key: integer arguments and
    the tensors' dtypes; pruning: integers, dtype, target), so a kept choice is the one they
    would make again. Tensors passed by keyword count by dtype and device too: by identity they
    would make every launch a new signature, and the kept dict would hold them alive.
    """
    return (
        tuple([(a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args]),
        tuple([(k, (v.dtype, v.device) if isinstance(v, torch.Tensor) else v)
               for k, v in kwargs.items()]),
    )


def autotune(configs: Sequence[triton.Config], key: list[str],
             prune: Prune | None = None) -> Callable[[Any], Tuned]:
    """Decorator over ``@triton.jit``: a :class:`Tuned` kernel (see the module docstring)."""
    return lambda fn: Tuned(fn, configs, key, prune)
