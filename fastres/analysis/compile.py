"""Ahead-of-time compilation of Triton kernel configurations, specialised as a real launch is.

Each kernel module listed in ``MODULES`` has a ``compile_specs()`` returning :class:`CompileSpec`
entries; ``python -m fastres.analysis.kernel_report`` compiles every one for every target in
``TARGETS`` with the real compiler (no GPU needed) and reads the machine code.

A launch does not compile the plain kernel. Triton's JIT (``runtime/jit.py``,
``specialize_impl``, the same in triton 3.6 and 3.8) looks at each non-constexpr argument:
an integer equal to 1 becomes a compile-time constant, an integer divisible by 16 and a pointer
aligned to 16 bytes get the ``tt.divisibility`` 16 attribute (which lets the compiler vectorise
loads and use cp.async / TMA); floats and bools are not specialised. :func:`launch_source` does
the same from a spec's representative argument values (``ints``), so that the code compiled
here is the code a launch on that shape class runs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

# Modules with a compile_specs() function: a new kernel module registers here.
MODULES = (
    "fastres.backends.triton.conv",
    "fastres.backends.triton.bn",
    "fastres.backends.triton.conv_bwd",
)

# Compute capabilities the report compiles for: A100; RTX 40 / L4 / L40S (and RTX 30, A6000:
# sm_86 runs the same code); H100/H200; B200/GB200 (tcgen05); RTX 50. Triton names the last
# three sm_90a, sm_100a and sm_120a (architecture-specific features on) and assembles sm_100a and
# sm_120a with the ptxas-blackwell it ships.
TARGETS = (80, 89, 90, 100, 120)

# The shape-class label of specs compiled without any launch-time specialisation.
UNSPECIALISED = "unspecialised"


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile ahead of time for each of ``TARGETS``.

    ``signature`` maps every non-constexpr argument name to a Triton type string ("*fp16", "i32",
    "fp32", ...); ``constexprs`` gives the value of every ``tl.constexpr`` argument.

    ``ints`` holds representative values of the integer arguments for the shape class
    ``shape_class`` (for example a ResNet 3x3 stride-2 convolution: channel counts divisible by
    16, spatial sizes not); with it the spec compiles as a launch with those values and 16-byte
    aligned pointers does (:func:`launch_source`). ``ints=None`` compiles without any
    specialisation: what a launch with odd sizes and unaligned pointers gets.

    ``tensor_cores``: the kernel must use MMA instructions and asynchronous global-to-shared
    copies when specialised (the report's check). ``pruned`` maps a compute capability to the
    reason the autotuner never offers this configuration there (it is compiled and reported, but
    not held to the checks).
    """

    name: str
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    ints: Mapping[str, int] | None = None
    shape_class: str = UNSPECIALISED
    tensor_cores: bool = False
    pruned: Mapping[int, str] = dataclasses.field(default_factory=dict)


def launch_source(spec: CompileSpec) -> tuple[dict[str, str], dict[str, Any], dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` as a launch derives
    them (see the module docstring); the spec's own signature and constexprs if ``ints`` is None.
    """
    signature = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    if spec.ints is None:
        return signature, constexprs, attrs
    for name, ty in spec.signature.items():
        if ty.startswith("*"):
            divisible = True  # torch allocations are 16-byte aligned
        elif ty in ("i32", "i64"):
            if name not in spec.ints:
                raise ValueError(f"compile spec {spec.name}: no value for integer argument {name}")
            value = spec.ints[name]
            if value == 1:
                del signature[name]
                constexprs[name] = 1
                continue
            divisible = value % 16 == 0
        else:  # floats and bools: never specialised
            continue
        if divisible:
            attrs[(spec.kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# A spec's tile ("-128_128_32_w8s3"), or its bracketed tile parameters
# (",BLOCK_M=16,BLOCK_K=64,warps=4]"), are what its family name leaves out with its shape class.
_BRACKET_TILE = re.compile(r",BLOCK_M=[^\]]*\]")


def family(spec: CompileSpec) -> str:
    """The kernel, dtype and flag set of a spec, without its tile and shape class:
    ``conv_gemm-bfloat16-train``, ``dgrad_gemm-float32-join``, ``bn_apply[fp16,HAS_RES=0,...]``.
    """
    name = spec.name.removesuffix(f"-{spec.shape_class}")
    if name.count("-") >= 3:  # kernel-dtype-flags-tile
        return name.rsplit("-", 1)[0]
    return _BRACKET_TILE.sub("]", name)


def representative(specs: list[CompileSpec], target: int) -> list[int]:
    """Indices of one spec per :func:`family`: the first specialised one the autotuner offers on
    ``target`` (configurations are listed in the order a launch without autotuning tries them),
    else the family's first. The default test suite compiles these for the targets it does not
    compile in full."""
    chosen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        key = family(spec)
        first = chosen.get(key)
        if first is None or (not _offered(specs[first], target) and _offered(spec, target)):
            chosen[key] = i
    return sorted(chosen.values())


def _offered(spec: CompileSpec, target: int) -> bool:
    return spec.ints is not None and target not in spec.pruned
