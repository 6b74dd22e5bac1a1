"""Device classes: what a GPU offers the kernels, derived from the device in one place.

Dispatch (``auto``'s choice, each backend's availability), the Triton pruners (which tiles fit
and do not spill), the kernel report and ``fastres kernels`` all read a device's
:class:`DeviceClass` through :func:`device_class`, and nothing else asks the driver. Tests
simulate a card by patching that one seam (:func:`simulate`), so every class is checked on a
machine without it.

A class is named by the compile target whose code it runs (``sm_80``: A100; ``sm_86`` / ``sm_89``:
RTX 30 / RTX 40, L4, L40S, A6000; ``sm_90``: H100 / H200; ``sm_100``: B200 / GB200; ``sm_120``:
RTX 50; ``sm_75`` / ``sm_70``: T4 / V100, no tensor-core path in Triton). Its shared-memory
limit is the device's own opt-in limit per block where a device is present (the table's figure
where one is simulated without a limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence

import torch

KB = 1024


@dataclasses.dataclass(frozen=True)
class DeviceClass:
    """What the kernels may use on one class of GPU.

    ``target``: the compute capability the code is compiled for (80, 86, 89, 90, 100, 120, 75,
    70); ``capability``: the device's own; ``smem_per_block``: opt-in shared memory per block in
    bytes; ``mma``: the tensor-core instruction Triton's ``tl.dot`` becomes there (``"HMMA"``
    mma.sync, ``"HGMMA"`` wgmma, ``"UTCHMMA"`` tcgen05; None: none, ``tl.dot`` is FFMA);
    ``cp_async`` / ``tma``: asynchronous global-to-shared copies (LDGSTS / UTMALDG);
    ``bf16``: native bfloat16 arithmetic.
    """

    target: int
    capability: tuple[int, int]
    smem_per_block: int
    mma: str | None
    cp_async: bool
    tma: bool
    bf16: bool

    @property
    def name(self) -> str:
        return f"sm_{self.target}"

    @property
    def report_target(self) -> int:
        """The kernel report's target whose pruning tables (tiles that spill) apply here: the
        class's own, except sm_86, which shares sm_89's register file, 99 KB and mma.sync and
        is compiled as sm_89 in the report."""
        return _REPORTED_AS.get(self.target, self.target)

    @property
    def tensor_cores(self) -> bool:
        """Whether the Triton kernels get tensor cores here (sm_80 and later)."""
        return self.mma is not None

    def describe(self) -> str:
        feats = [self.mma or "no tensor cores", *(["cp.async"] if self.cp_async else []),
                 *(["TMA"] if self.tma else []), *([] if self.bf16 else ["no bf16"])]
        return (f"{self.name} (capability {self.capability[0]}.{self.capability[1]}, "
                f"{self.smem_per_block // KB} KB shared memory per block, {', '.join(feats)})")


# target -> (smem per block opt-in, mma, cp.async, TMA, bf16): the classes of DESIGN.md §3
_TABLE: dict[int, tuple[int, str | None, bool, bool, bool]] = {
    70: (96 * KB, None, False, False, False),  # V100
    75: (64 * KB, None, False, False, False),  # T4, RTX 20
    80: (163 * KB, "HMMA", True, False, True),  # A100, A30
    86: (99 * KB, "HMMA", True, False, True),  # RTX 30, A6000, A10
    89: (99 * KB, "HMMA", True, False, True),  # RTX 40, L4, L40S
    90: (227 * KB, "HGMMA", True, True, True),  # H100, H200
    100: (227 * KB, "UTCHMMA", True, True, True),  # B200, GB200, B300
    120: (99 * KB, "HMMA", True, True, True),  # RTX 50, RTX PRO 6000 Blackwell
}

TARGETS = tuple(sorted(_TABLE))
_REPORTED_AS = {86: 89}  # see DeviceClass.report_target


def target_of(capability: tuple[int, int]) -> int | None:
    """The compile target whose code a device of ``capability`` runs; None below sm_70."""
    major, minor = capability
    if major >= 12:
        return 120
    if major >= 10:  # 10.x B200/B300, 11.0 Thor: tcgen05
        return 100
    if major == 9:
        return 90
    if major == 8:
        return {0: 80, 9: 89}.get(minor, 86 if minor in (6, 7) else 80)
    if major == 7:
        return 75 if minor >= 5 else 70
    return None


def make_class(capability: tuple[int, int], smem_per_block: int | None = None
               ) -> DeviceClass | None:
    """The class of a device of ``capability`` with opt-in shared memory ``smem_per_block``
    (bytes; None: the class's table figure). None for devices older than sm_70."""
    target = target_of(capability)
    if target is None:
        return None
    smem, mma, cp_async, tma, bf16 = _TABLE[target]
    return DeviceClass(target, tuple(capability), smem_per_block or smem, mma, cp_async, tma,
                       bf16)


def for_target(target: int) -> DeviceClass:
    """The class of compile target ``target`` with its table figures (the kernel report)."""
    if target not in _TABLE:
        raise ValueError(f"unknown target sm_{target}; known: {', '.join(map(str, TARGETS))}")
    return make_class((target // 10, target % 10))


def _probe(index: int) -> tuple[tuple[int, int], int | None]:
    """The seam: ``(capability, opt-in shared memory per block)`` of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), getattr(props, "shared_memory_per_block_optin", None)


# device index -> (capability, class); the innermost simulate()'s (capability, class)
_cache: dict[int, tuple[tuple[int, int], DeviceClass | None]] = {}
_simulated: list[tuple[tuple[int, int], DeviceClass | None]] = []


def _lookup(device: torch.device | torch.Tensor | str | None
            ) -> tuple[tuple[int, int], DeviceClass | None] | None:
    """(capability, class) of a CUDA device; None off CUDA or where no device can be asked.
    Dispatch asks on every call: a known device costs a dict lookup."""
    if isinstance(device, torch.Tensor):
        device = device.device
    elif device is None:
        return None
    elif not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    if _simulated:
        return _simulated[-1]
    found = _cache.get(device.index)
    if found is not None:
        return found
    if not torch.cuda.is_available():  # fake CUDA tensors traced without a GPU
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cache:
        capability, smem = _probe(index)
        _cache[index] = (capability, make_class(capability, smem))
    return _cache[index]


def device_class(device: torch.device | torch.Tensor | str | None) -> DeviceClass | None:
    """The class of a CUDA device (or a tensor's device); None off CUDA, below sm_70, or where
    the device cannot be asked (:func:`capability` tells these apart)."""
    found = _lookup(device)
    return None if found is None else found[1]


def capability(device: torch.device | torch.Tensor | str | None) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (simulated inside :func:`simulate`); None off
    CUDA or where no device can be asked (fake CUDA tensors on a machine without a GPU)."""
    found = _lookup(device)
    return None if found is None else found[0]


# Answers of device_reason per (device, dtype, kernels): dispatch asks on every call. Cleared
# whenever simulate() enters or leaves (the device it answered for changed).
_reasons: dict[tuple, str | None] = {}


def device_reason(device: torch.device | torch.Tensor | str | None, dtype: torch.dtype | None,
                  kernels: str, tensor_cores: bool = False) -> str | None:
    """Why ``kernels`` (e.g. "the Triton kernels") cannot run in ``dtype`` on a CUDA device at
    all: older than sm_70, or bfloat16 where the device has no native bfloat16 (it would be
    emulated in software, which is not what a fused kernel is for); with ``tensor_cores``, also
    a device where Triton's ``tl.dot`` has no tensor-core path (below sm_80). None off CUDA, on
    a device that cannot be asked, and where they can run. Memoised: dispatch asks per call."""
    if isinstance(device, torch.Tensor):
        device = device.device
    key = (device, dtype, kernels, tensor_cores)
    try:
        return _reasons[key]
    except KeyError:
        pass
    found = _lookup(device)
    why = None
    if found is not None:
        (major, minor), cls = found
        if cls is None:
            why = (f"{kernels} need compute capability 7.0 or newer; this device has "
                   f"{major}.{minor}")
        elif dtype == torch.bfloat16 and not cls.bf16:
            why = (f"{cls.name} has no native bfloat16, so {kernels} would emulate it in "
                   "software; use float16 or float32, or the reference backend")
        elif tensor_cores and not cls.tensor_cores:
            why = (f"{cls.name} has no tensor-core path for the Triton kernels (tl.dot becomes "
                   "FFMA there), so cuDNN is faster; backend='triton' still runs them when "
                   "asked")
    _reasons[key] = why
    return why


_CODE = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")


def code_reason(codes: Sequence[str], capability: tuple[int, int]) -> str | None:
    """Why a CUDA library holding ``codes`` (``sm_80``, ``sm_90a``: machine code; ``compute_80``:
    PTX) cannot run on a device of ``capability``; None where it can.

    Machine code runs on the same major version at an equal or higher minor (``sm_86`` on 8.6
    and 8.9); an architecture-specific ``a`` target only on exactly its own (``sm_90a`` on 9.0,
    not 10.0), a family ``f`` target across its major. PTX is compiled by the driver for any
    device at or above its version (``compute_80`` on 8.0 and newer), ``a`` PTX only for its
    own."""
    major, minor = capability
    for code in codes:
        m = _CODE.fullmatch(code)
        if m is None:
            continue
        kind, c_major, c_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix == "a":
            runs = (c_major, c_minor) == (major, minor)
        elif kind == "sm" or suffix == "f":
            runs = c_major == major and c_minor <= minor
        else:
            runs = (c_major, c_minor) <= (major, minor)
        if runs:
            return None
    return (f"it holds {', '.join(codes) or 'no code'}: no machine code for sm_{major}{minor} "
            f"and no PTX the driver can compile for it (rebuild with TORCH_CUDA_ARCH_LIST "
            f"naming {major}.{minor})")


@contextlib.contextmanager
def simulate(capability: tuple[int, int] | int,
             smem_per_block: int | None = None) -> Iterator[DeviceClass | None]:
    """Inside the block every CUDA device is of ``capability`` (e.g. ``(10, 0)`` or a target such
    as ``100``) with ``smem_per_block`` bytes (default: the class's): tests and ``fastres
    kernels`` answer for a card that is not here. Meta and fake CUDA tensors need no device."""
    if isinstance(capability, int):
        capability = (capability // 10, capability % 10)
    cls = make_class(capability, smem_per_block)
    _simulated.append((tuple(capability), cls))
    _reasons.clear()
    try:
        yield cls
    finally:
        _simulated.pop()
        _reasons.clear()


__all__ = ["TARGETS", "DeviceClass", "capability", "code_reason", "device_class", "device_reason",
           "for_target", "make_class", "simulate", "target_of"]
