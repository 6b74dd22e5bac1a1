"""What compiled GPU code does, read from its machine code (SASS) without a GPU.

Uses the ``cuobjdump`` that the triton wheel ships (``triton/backends/nvidia/bin``) on a cubin
(a compiled Triton kernel's ``asm["cubin"]``) or on a fat binary (the extension ``fastres._C``):
``--dump-resource-usage`` for registers, static shared memory and the local-memory frame,
``--dump-sass`` for the instructions that matter for speed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA programming guide, compute capabilities
    table). The most shared memory one block may use is the device class's
    (:func:`fastres.backends.devices.for_target`), read there, not repeated here."""

    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM
    regs: int  # 32-bit registers per SM
    smem_sm: int  # shared memory per SM usable by blocks, bytes


# By compile target (sm_80: A100; sm_86/89: RTX 30/40, L4; sm_90: H100; sm_100: B200; sm_120:
# RTX 50). Each block also holds 1 KiB of shared memory for the system.
ARCHS = {
    70: Arch(max_warps=64, max_blocks=32, regs=65536, smem_sm=98304),
    75: Arch(max_warps=32, max_blocks=16, regs=65536, smem_sm=65536),
    80: Arch(max_warps=64, max_blocks=32, regs=65536, smem_sm=167936),
    86: Arch(max_warps=48, max_blocks=16, regs=65536, smem_sm=102400),
    89: Arch(max_warps=48, max_blocks=24, regs=65536, smem_sm=102400),
    90: Arch(max_warps=64, max_blocks=32, regs=65536, smem_sm=233472),
    100: Arch(max_warps=64, max_blocks=32, regs=65536, smem_sm=233472),
    120: Arch(max_warps=48, max_blocks=32, regs=65536, smem_sm=102400),
}
_SMEM_RESERVED = 1024  # per block
_SMEM_GRANULE = 128
_REG_GRANULE = 256  # registers are allocated per warp in units of this many


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """Resource use and instruction mix of one compiled kernel for one target."""

    regs: int  # registers per thread
    shared_static: int  # statically declared shared memory, bytes per block
    local_bytes: int  # local-memory frame (stack + local arrays), bytes per thread
    spill_store_bytes: int  # bytes stored by the local-store (STL) instructions in the code
    mma: str  # "UTCHMMA" (sm_100 tcgen05), "HGMMA" (sm_90 wgmma), "HMMA" (mma.sync) or "none"
    g2s: str  # global -> shared: "UTMALDG" (TMA), "LDGSTS" (cp.async) or "plain"


def tool(name: str) -> str:
    """Path of a CUDA binary utility shipped with triton (``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found where the triton wheel ships it: {path}")
    return path


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run(
        [tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True
    ).stdout


# "Function <name>:" then "REG:n STACK:n SHARED:n LOCAL:n ..." per kernel; "arch = sm_XX" heads
# each embedded cubin of a fat binary.
_ARCH = re.compile(r"^arch = (sm_\w+)", re.M)
_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
# "/*0a50*/  @!P0 LDGSTS.E.BYPASS.128 [R1], ..." -> the opcode with its modifiers
_OPCODE = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w*\s+)?([A-Z][A-Z0-9_.]*)")
_WIDTH = re.compile(r"[US]?\d+")


def _by_arch(text: str) -> list[tuple[str, str]]:
    """``(arch, section)`` pairs of a cuobjdump listing; arch "" for a lone cubin."""
    heads = list(_ARCH.finditer(text))
    if not heads:
        return [("", text)]
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return [(h.group(1), text[h.start():end]) for h, end in zip(heads, ends)]


def _sass_by_function(text: str) -> dict[str, Counter]:
    """Opcode counts per function of one arch's SASS listing (STL counted in bytes)."""
    heads = list(_SASS_FUNCTION.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    out = {}
    for head, end in zip(heads, ends):
        counts: Counter = Counter()
        for op in _OPCODE.findall(text[head.end():end]):
            base, *mods = op.split(".")
            counts[base] += 1
            if base == "STL":
                # STL.64 / STL.128 / STL.U8 ...; a plain STL stores 32 bits
                width = next((int(m.lstrip("US")) for m in mods if _WIDTH.fullmatch(m)), 32)
                counts["STL_BYTES"] += width // 8
        out[head.group(1)] = counts
    return out


# Tensor-core instructions, newest generation first: tcgen05 (sm_100: UTCHMMA for fp16/bf16/tf32
# operands, issued with UTCBAR barriers), warpgroup wgmma (sm_90), warp-level mma.sync (sm_80+)
_MMA_KINDS = ("UTCHMMA", "HGMMA", "HMMA")


def _stats(usage: tuple[str, ...], ops: Counter) -> KernelStats:
    _, reg, stack, shared, local = usage
    mma = next((kind for kind in _MMA_KINDS if ops[kind]), "none")
    g2s = "UTMALDG" if ops["UTMALDG"] else "LDGSTS" if ops["LDGSTS"] else "plain"
    return KernelStats(
        regs=int(reg), shared_static=int(shared), local_bytes=int(stack) + int(local),
        spill_store_bytes=ops["STL_BYTES"], mma=mma, g2s=g2s,
    )


def inspect_binary(path: str) -> list[tuple[str, str, KernelStats]]:
    """``(arch, function, stats)`` for every kernel in a cubin or fat binary at ``path``."""
    usage_text = _cuobjdump("--dump-resource-usage", path)
    sass = {arch: _sass_by_function(sec) for arch, sec in _by_arch(_cuobjdump("--dump-sass", path))}
    rows = []
    for arch, section in _by_arch(usage_text):
        for usage in _USAGE.findall(section):
            ops = sass.get(arch, {}).get(usage[0], Counter())
            rows.append((arch, usage[0], _stats(usage, ops)))
    return rows


_NV_INFO = re.compile(r"^\.nv\.info\.(\S+)", re.M)
_MAX_THREADS = re.compile(r"EIATTR_MAX_THREADS\s*\n\s*Format:.*\n\s*Value:\s*(\w+) (\w+) (\w+)")


def launch_bounds(path: str) -> dict[tuple[str, str], int]:
    """Threads per block declared with ``__launch_bounds__``, by (arch, function), for the
    kernels of a fat binary that declare it (the others' block size is set at launch)."""
    out = {}
    for arch, section in _by_arch(_cuobjdump("-elf", path)):
        heads = list(_NV_INFO.finditer(section))
        ends = [h.start() for h in heads[1:]] + [len(section)]
        for head, end in zip(heads, ends):
            found = _MAX_THREADS.search(section, head.end(), end)
            if found:
                out[(arch, head.group(1))] = math.prod(int(v, 16) for v in found.groups())
    return out


def inspect_cubin(cubin: bytes) -> KernelStats:
    """Stats of the one kernel in a cubin (a compiled Triton kernel's ``asm["cubin"]``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        rows = inspect_binary(path)
    if len(rows) != 1:
        raise ValueError(f"expected one kernel in the cubin, found {len(rows)}")
    return rows[0][2]


def short_names(mangled: list[str]) -> dict[str, str]:
    """Readable kernel names (``bn_apply_kernel<float>``) by mangled name, via ``c++filt`` where
    it is installed (the mangled name otherwise)."""
    filt = shutil.which("c++filt")
    if filt is None or not mangled:
        return {m: m for m in mangled}
    out = subprocess.run(
        [filt], input="\n".join(mangled), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # "void fastres::(anonymous namespace)::bn_apply_kernel<float>(float const*, ...)"
    short = [re.sub(r"^void |\(anonymous namespace\)::|\w+::", "", d) for d in out]
    short = [d.split("(", 1)[0] for d in short]
    return dict(zip(mangled, short))


def smem_limit(cc: int) -> int:
    """The most shared memory one block may use on target ``cc``, bytes (its device class's
    opt-in limit)."""
    from ..backends import devices

    return devices.for_target(cc).smem_per_block


def occupancy(cc: int, regs: int, shared: int, threads: int) -> float:
    """Theoretical occupancy (resident warps / most warps per SM) of a kernel using ``regs``
    registers per thread and ``shared`` bytes of shared memory per block of ``threads`` threads;
    0.0 when one block does not fit on an SM (the launch would fail)."""
    arch = ARCHS[cc]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(regs * 32 / _REG_GRANULE) * _REG_GRANULE
    by_regs = (arch.regs // regs_per_warp) // warps if regs_per_warp else arch.max_blocks
    smem = math.ceil((shared + _SMEM_RESERVED) / _SMEM_GRANULE) * _SMEM_GRANULE
    by_smem = arch.smem_sm // smem if shared <= smem_limit(cc) else 0
    blocks = min(arch.max_blocks, arch.max_warps // warps, by_regs, by_smem)
    return blocks * warps / arch.max_warps
