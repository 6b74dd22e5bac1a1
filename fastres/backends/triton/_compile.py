"""What the real-target compile check needs to know about each Triton kernel configuration."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile ahead of time for sm_80 and sm_90 (no GPU needed).

    ``signature`` maps every non-constexpr argument name to a Triton type string ("*fp16", "i32",
    "fp32", ...); ``constexprs`` gives the value of every ``tl.constexpr`` argument.
    """

    name: str
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
