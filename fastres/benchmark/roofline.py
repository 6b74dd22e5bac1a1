"""Work and traffic of one fused conv + BN + ReLU (+ add), and the roofline bound it implies.

FLOPs count a multiply-add as two operations: a forward conv does ``2·N·OH·OW·K·(C/g)·R·S``.
Training adds the backward pass: the weight gradient costs the same as the forward conv, and the
input gradient too (except for a layer whose input needs no gradient, such as the stem conv).
The BN / ReLU / add arithmetic is a few operations per output element and is left out: next to
the conv's reduction over ``(C/g)·R·S`` it is noise.

Minimum bytes are what a perfectly fused implementation must move through device memory, each
tensor once:

* inference: read ``x`` and ``w`` (and ``residual``), write ``z``;
* training forward: the same, with ``z`` also being the tensor kept for backward;
* training backward: read ``dz``, ``z`` (the ReLU mask and the normalised output), ``x`` (weight
  gradient) and ``w`` (input gradient); write ``dx`` (if wanted), ``dw`` (and ``dresidual``).

BN parameters and statistics are per channel and negligible; they are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

DTYPE_BYTES = {
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.float64: 8,
}


@dataclass(frozen=True)
class ConvShape:
    """A conv layer's geometry at a given batch size (``n``) and input size (``h`` × ``w``)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        oh = (self.h + 2 * self.padding[0] - self.dilation[0] * (self.r - 1) - 1) // self.stride[0]
        ow = (self.w + 2 * self.padding[1] - self.dilation[1] * (self.s - 1) - 1) // self.stride[1]
        return oh + 1, ow + 1

    @property
    def x_elems(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def w_elems(self) -> int:
        return self.k * (self.c // self.groups) * self.r * self.s

    @property
    def z_elems(self) -> int:
        oh, ow = self.out_hw
        return self.n * self.k * oh * ow

    def key(self) -> tuple:
        """The shape without the batch size: two layers with equal keys are the same problem."""
        return (self.c, self.h, self.w, self.k, self.r, self.s, self.stride, self.padding,
                self.dilation, self.groups)

    def label(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        st = f" s{self.stride[0]}" if self.stride != (1, 1) else ""
        return f"{self.c}->{self.k} {self.r}x{self.s}{st}{g} @{self.h}x{self.w}"

    def with_batch(self, n: int) -> ConvShape:
        d = asdict(self)
        d["n"] = n
        return ConvShape(**d)


@dataclass(frozen=True)
class Epilogue:
    """What follows the conv in the fused op."""

    residual: bool = False
    relu: bool = True

    def label(self) -> str:
        parts = ["bn"]
        if self.residual:
            parts.append("add")
        if self.relu:
            parts.append("relu")
        return "+".join(parts)


def conv_flops(shape: ConvShape, *, training: bool = False, input_grad: bool = True) -> int:
    """Floating-point operations (multiply-add = 2) of one conv, forward or a training step."""
    forward = 2 * shape.z_elems * (shape.c // shape.groups) * shape.r * shape.s
    if not training:
        return forward
    # weight gradient: same reduction; input gradient: same again, unless no one needs dx
    return forward * (3 if input_grad else 2)


def conv_min_bytes(
    shape: ConvShape,
    epilogue: Epilogue,
    dtype_bytes: int,
    *,
    training: bool = False,
    input_grad: bool = True,
) -> int:
    """Fewest bytes a fused implementation must move (see the module docstring)."""
    x, w, z = shape.x_elems, shape.w_elems, shape.z_elems
    res = z if epilogue.residual else 0
    forward = x + w + res + z
    if not training:
        return forward * dtype_bytes
    backward = z + z + x + w + w  # read dz, z, x, w; write dw
    if input_grad:
        backward += x  # write dx
    if epilogue.residual:
        backward += z  # write dresidual
    return (forward + backward) * dtype_bytes


@dataclass
class Ceilings:
    """The card's measured limits: what a roofline fraction is a fraction of."""

    tflops: float  # dense matrix product in the run's dtype, TFLOP/s
    tbps: float  # device-to-device copy, bytes read + written, TB/s
    device: str = ""
    dtype: str = ""
    details: dict = field(default_factory=dict)

    def bound_seconds(self, flops: float, nbytes: float) -> float:
        """Roofline time: the larger of arithmetic time and memory time."""
        return max(flops / (self.tflops * 1e12), nbytes / (self.tbps * 1e12))

    def to_dict(self) -> dict:
        return asdict(self)


def achieved(flops: float, nbytes: float, seconds: float, ceilings: Ceilings | None) -> dict:
    """Achieved rates of one measurement, and how far they are from the ceilings."""
    out = {
        "tflops": flops / seconds / 1e12,
        "tbps": nbytes / seconds / 1e12,
    }
    if ceilings is not None:
        bound = ceilings.bound_seconds(flops, nbytes)
        out.update(
            frac_peak_tflops=out["tflops"] / ceilings.tflops,
            frac_peak_tbps=out["tbps"] / ceilings.tbps,
            bound_s=bound,
            frac_roofline=bound / seconds,
            bound_by="compute" if flops / ceilings.tflops > nbytes / ceilings.tbps else "memory",
        )
    return out
