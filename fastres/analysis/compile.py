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
from collections.abc import Mapping
from typing import Any

# Modules with a compile_specs() function: a new kernel module registers here.
MODULES = (
    "fastres.backends.triton.conv",
    "fastres.backends.triton.bn",
    "fastres.backends.triton.conv_bwd",
)

TARGETS = (80, 90)  # compute capabilities: A100, H100/H200

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
