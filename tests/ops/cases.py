"""The equivalence grid of DESIGN.md section 4, and the runner every backend's test uses."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastres
from fastres.backends import ConvParams, ServedCall
from fastres.backends.triton.conv import kernel_for
from fastres.ops.conv_bn_relu import activation
from tests.numerics import assert_close_ratio, eager_conv_bn_relu

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


@dataclasses.dataclass(frozen=True)
class Case:
    n: int = 2
    c: int = 16
    h: int = 9
    w: int = 9
    k: int = 16
    r: Pair = 3  # kernel size: int or (height, width)
    stride: Pair = 1
    padding: Pair = 1
    dilation: Pair = 1
    groups: int = 1
    bias: bool = False
    affine: bool = True
    running: bool = True
    residual: bool = False
    relu: bool = True
    act: str | None = None  # an activation name, overriding relu ("silu", ...)
    layout: str = "channels_last"  # or "contiguous" or "sliced"
    # conv outputs centred far from zero (|mean| ≫ std) by an offset input, as in a ResNet after
    # a ReLU; the offset is per dtype (MEAN_OFFSET) so that y stays representable
    mean_offset: bool = False

    @property
    def activation(self) -> str | None:
        return activation(self.relu, self.act)

    @property
    def kernel(self) -> tuple[int, int]:
        return _pair(self.r)

    @property
    def conv(self) -> ConvParams:
        return ConvParams(
            _pair(self.stride), _pair(self.padding), _pair(self.dilation), self.groups
        )

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.conv.out_hw(self.h, self.w, *self.kernel)

    @property
    def id(self) -> str:
        d = dataclasses.asdict(self)
        default = dataclasses.asdict(Case())
        return "-".join(
            f"{k}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in d.items() if v != default[k]
        ) or "default"


# |mean| / std of the conv output in the mean_offset cases: large, yet with y's rounding in the
# dtype (spacing |mean|·2^-mantissa) well below its std, so that the float64 truth is meaningful
MEAN_OFFSET = {torch.float32: 1000.0, torch.float64: 1000.0, torch.float16: 40.0,
               torch.bfloat16: 6.0}

CASES = [
    Case(),
    Case(r=1, padding=0),
    Case(r=1, padding=0, stride=2, c=32, k=64),  # projection shortcut
    Case(stride=2, h=11, w=10),
    Case(r=7, stride=2, padding=3, c=3, h=17, w=15, k=16),  # stem
    Case(n=1, h=5, w=7, residual=True),
    Case(residual=True, relu=False),
    Case(relu=False, bias=True),
    Case(affine=False, running=False),
    Case(groups=2, c=32, k=32),
    Case(groups=8, c=32, k=32, stride=2),  # 4 channels per group (ResNeXt 32x4d)
    Case(groups=16, c=16, k=16),  # depthwise
    Case(dilation=2, padding=2),
    Case(layout="contiguous", residual=True),
    Case(layout="sliced", c=8, k=24, h=7, w=6),
    Case(n=3, c=5, h=6, w=5, k=7, bias=True),  # odd sizes everywhere
    Case(mean_offset=True, padding=0, residual=True),  # padding would spread the mean
    # rectangular kernels, height and width stride / padding / dilation apart
    Case(r=(1, 3), padding=(0, 1), residual=True, h=7, w=8),
    Case(r=(3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2), h=11, w=9, groups=2, c=32),
]

# SiLU in place of ReLU (timm's '*ts' ByobNet models, RegNetZ, CSP variants): the paths whose
# activation code differs (training's apply pass and g, eval's apply pass, inference's conv
# epilogue), with and without the residual, through the GEMM, flat-K (stem) and direct kernels
SILU_CASES = [
    Case(act="silu"),
    Case(act="silu", n=1, h=5, w=7, residual=True),
    Case(act="silu", r=1, padding=0, stride=2, c=32, k=64, bias=True),
    Case(act="silu", groups=8, c=32, k=32, stride=2, residual=True),
    Case(act="silu", affine=False, running=False, residual=True),
    Case(act="silu", r=7, stride=2, padding=3, c=3, h=17, w=15, k=16),  # stem
    Case(act="silu", mean_offset=True, padding=0, residual=True),
    Case(act="silu", layout="sliced", c=8, k=24, h=7, w=6),
]

# (training, grad): the three paths of every backend: training, eval with autograd (raw y kept
# for backward), eval without autograd (inference: BN, residual and ReLU in the conv epilogue)
MODES = [
    pytest.param(True, True, id="train"),
    pytest.param(False, True, id="eval"),
    pytest.param(False, False, id="infer"),
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous view: every other column of a wider tensor
        wide = torch.repeat_interleave(t, 2, dim=-1)
        return wide[..., ::2]
    return t.contiguous()


# cast to the test dtype; the BN vectors stay fp32, as nn.BatchNorm2d's
ACT_ARGS = ("x", "weight", "bias", "residual")


def make_inputs(case: Case, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor | None]:
    """Fresh random inputs in float64 on the CPU (non-trivial BN statistics), already rounded to
    the dtypes the op will see, so that the float64 truth is that of the very same inputs and
    every error measured is the computation's."""
    f64 = torch.float64
    k, cg = case.k, case.c // case.groups
    r, s = case.kernel
    oh, ow = case.out_hw
    offset = MEAN_OFFSET[dtype] if case.mean_offset else 0.0
    t = {
        "x": torch.randn(case.n, case.c, case.h, case.w, dtype=f64) + 0.5 + offset,
        "weight": torch.randn(k, cg, r, s, dtype=f64) / (cg * r * s) ** 0.5,
        "bias": torch.randn(k, dtype=f64) if case.bias else None,
        "bn_weight": torch.rand(k, dtype=f64) + 0.5 if case.affine else None,
        "bn_bias": torch.randn(k, dtype=f64) if case.affine else None,
        "running_mean": torch.randn(k, dtype=f64) * 0.5 if case.running else None,
        "running_var": torch.rand(k, dtype=f64) * 2 + 0.5 if case.running else None,
        "residual": torch.randn(case.n, k, oh, ow, dtype=f64) if case.residual else None,
    }
    if case.mean_offset and case.running:  # running statistics near the offset output's
        c = case.conv
        y = torch.nn.functional.conv2d(
            t["x"], t["weight"], None, c.stride, c.padding, c.dilation, c.groups
        )
        var, mean = torch.var_mean(y, dim=(0, 2, 3))
        t["running_mean"] = t["running_mean"] + mean
        t["running_var"] = t["running_var"] * var
    for name, v in t.items():
        if v is not None and dtype != f64:
            t[name] = v.to(dtype if name in ACT_ARGS else torch.float32).to(f64)
    return t




def _prepare(inputs, case, dtype, device, grad=True):
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        dt = dtype if (name in ACT_ARGS or dtype == torch.float64) else torch.float32
        t = t.to(device=device, dtype=dt)
        if name in ("x", "residual"):
            t = _layout(t, case.layout)
        if grad and name not in ("running_mean", "running_var"):
            t = t.detach().requires_grad_(True)
        out[name] = t
    return out


def _ambiguous_relu_band(inputs, case, dtype, device, call, eager) -> tuple[torch.Tensor, float]:
    """Float64 pre-activation and the band around 0 where the ReLU's decision is ambiguous.

    In fp16/bf16 an output whose float64 pre-activation lies within rounding error of 0 may land
    on either side of the ReLU, in PyTorch as in the fused op (equally often, on different
    elements). Each such element moves the gradients by about |dz|, so whichever side happens to
    differ decides the max-error ratio. The band is the error the rule allows the fused output
    (twice PyTorch's own forward error plus the floor); elements inside it get no upstream
    gradient. The forward output is still compared everywhere.
    """
    inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}  # stats untouched
    with torch.no_grad():
        pre_ref = call(eager_conv_bn_relu, _prepare(inputs, case, torch.float64, "cpu"), "none")
        pre_base = call(eager, _prepare(inputs, case, dtype, device), "none")
    band = 2 * (pre_base.double().cpu() - pre_ref).abs().max().item()
    band += 4 * torch.finfo(dtype).eps * pre_ref.abs().max().item()
    return pre_ref, band


def run_case(
    case: Case, dtype: torch.dtype, training: bool, backend: str, device: str = "cpu",
    steps: int = 1, grad: bool = True,
) -> None:
    """Forward, every gradient and the running statistics of ``backend`` vs float64 and eager,
    and that ``backend`` served every pass. ``grad=False``: the forward without autograd (in
    eval the one-kernel inference path) and the running statistics."""
    inputs = make_inputs(case, dtype, device)
    c = case.conv
    kwargs = dict(
        training=training, stride=c.stride, padding=c.padding, dilation=c.dilation,
        groups=c.groups,
    )

    def call(fn, args, act=case.activation or "none"):
        a = dict(args)
        return fn(
            a.pop("x"), a.pop("weight"), a.pop("bn_weight"), a.pop("bn_bias"),
            a.pop("running_mean"), a.pop("running_var"), **a, **kwargs, act=act,
        )

    # fp32 on tensor cores (the Triton GEMM kernels on a GPU) is TF32: hold it to a TF32 baseline
    tf32 = (device != "cpu" and dtype == torch.float32 and backend == "triton"
            and kernel_for(case.c // case.groups, case.groups) != "direct")
    eager = functools.partial(eager_conv_bn_relu, tf32=tf32)
    relu = case.activation == "relu"
    if relu and grad:
        pre_ref, band = _ambiguous_relu_band(inputs, case, dtype, device, call, eager)
        decided = (pre_ref.abs() > band).double().mean().item()
        assert decided >= 0.5, (
            f"only {decided:.0%} of the outputs are clear of the ReLU's rounding band: the "
            "gradients would compare mostly zeros"
        )
    ref = _prepare(inputs, case, torch.float64, "cpu", grad)
    base = _prepare(inputs, case, dtype, device, grad)
    fused = _prepare(inputs, case, dtype, device, grad)
    with fastres.backends.record_calls() as served, torch.set_grad_enabled(grad):
        for _ in range(steps):
            for args in (ref, base, fused):
                for t in args.values():
                    if t is not None and t.grad is not None:
                        t.grad = None
            z_ref = call(eager_conv_bn_relu, ref)
            z_base = call(eager, base)
            with fastres.use_backend(backend):
                z = call(fastres.ops.conv_bn_relu, fused)
            assert z.dtype == dtype
            assert z.is_contiguous(memory_format=torch.channels_last)
            assert_close_ratio("output", z, z_ref, z_base)
            if not grad:
                continue
            dz = torch.randn_like(z_ref)
            if relu:
                dz[pre_ref.abs() <= band] = 0.0
            z_ref.backward(dz)
            z_base.backward(dz.to(device=device, dtype=dtype))
            z.backward(dz.to(device=device, dtype=dtype))
    batch_stats = training or not case.running
    expected = [ServedCall("forward", backend, batch_stats, inference=not grad)] * steps
    if grad:
        expected += [ServedCall("backward", backend, batch_stats, inference=False)] * steps
    assert sorted(served, key=repr) == sorted(expected, key=repr), served
    for name, t in fused.items():
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, f"no gradient for {name}"
            assert_close_ratio(f"grad {name}", t.grad, ref[name].grad, base[name].grad)
        elif name in ("running_mean", "running_var"):
            assert_close_ratio(name, t, ref[name], base[name])
