"""The activation prologue of block-fused training against float64.

In a fused residual block a convolution's input is the previous conv's raw output y read
through that conv's BN and ReLU, ``a = relu(y·scale + shift)``, with zero padding applied after
the activation. ``conv.conv2d_fused(..., in_scale=, in_shift=)`` (forward, every kernel path)
and ``conv_bwd.wgrad(..., x_scale=, x_shift=)`` (the weight gradient's x operand) form it while
loading; with a channel gate between the convs (``in_gate=`` / ``x_gate=``, (N, C) fp32) the
input is ``relu(y·scale + shift)·gate[n, c]``, gate values of both signs. The truth is the
float64 convolution of the float64 activation of the stored y; the base (``tests.numerics``
error-ratio rule) is plain PyTorch in the test dtype: the activation computed in fp32 and stored
in the dtype (as eager BN + ReLU store it), then the convolution.
Shifts take both signs and are large enough that relu(shift) is far from 0, so padding applied
before the activation would show at every border (and a dedicated test checks that it does).
Outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastres.backends import _alloc
from fastres.backends.triton import conv as tconv
from fastres.backends.triton import conv_bwd
from tests.backends.test_triton_conv import _check_batch_stats
from tests.backends.test_triton_conv_bwd import Shape, _conv_backward, _problem
from tests.numerics import assert_close_ratio
from tests.ops.cases import Case

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# One per kernel path and group layout (odd spatial sizes throughout).
SHAPES = {
    "3x3": Case(h=9, w=7),  # tensor-core GEMM, per-tap slabs
    "1x1s2": Case(c=32, k=24, r=1, padding=0, stride=2, h=9, w=8),  # GEMM, no padding
    "3x3s2": Case(c=16, k=20, stride=2, h=9, w=7),  # GEMM, stride 2 with padding
    "stem": Case(c=3, k=16, r=7, stride=2, padding=3, h=11, w=9),  # flat-K GEMM
    "g2x16": Case(c=32, k=32, groups=2, h=7, w=5),  # GEMM group axis: channel offset g·Cg
    "g8x4s2": Case(c=32, k=32, groups=8, stride=2, h=7, w=9),  # direct, 4 per group
    "g2x8": Case(c=16, k=24, groups=2, h=7, w=5),  # direct, 8 in / 12 out per group
}
# (shape, dtype) run by default: every kernel path, every dtype on the GEMM and direct paths.
DEFAULT = [
    ("3x3", torch.float32), ("3x3", torch.bfloat16), ("1x1s2", torch.float16),
    ("stem", torch.bfloat16), ("g2x16", torch.float16), ("g8x4s2", torch.float32),
    ("g2x8", torch.bfloat16),
]
SLOW = [(s, d) for s in SHAPES for d in DTYPES if (s, d) not in DEFAULT]
_ids = lambda v: v if isinstance(v, str) else str(v).removeprefix("torch.")


def _affine(c: int, positive_shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fp32 (scale, shift) of a previous BN: scales of both signs (γ may be
    negative), |shift| in [0.5, 1.5) with alternating signs (or all positive), so that
    relu(shift) is far from 0 on many channels."""
    sign = torch.tensor([1.0, -1.0]).repeat(c)[:c]
    scale = (torch.rand(c) + 0.5) * torch.where(torch.rand(c) < 0.8, 1.0, -1.0)
    shift = (torch.rand(c) + 0.5) * (1.0 if positive_shift else sign)
    return scale, shift


def _gate(n: int, c: int) -> torch.Tensor:
    """A fresh (N, C) fp32 channel gate: sigmoid outputs (a squeeze-excitation gate), a quarter
    of them negated so that both signs occur (a gate applied before the ReLU would show)."""
    g = torch.sigmoid(torch.randn(n, c) * 2)
    return torch.where(torch.rand(n, c) < 0.25, -g, g)


def _activation(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                gate: torch.Tensor | None = None) -> torch.Tensor:
    """relu(y·scale + shift) (times gate[n, c]) per channel of NCHW ``y``, in y's dtype: exact
    in float64; for the test dtypes computed in fp32 and stored in the dtype (rounded once), as
    eager BN + ReLU (and the gate's multiply in fp32) would store it."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    a = F.relu(y.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1))
    if gate is not None:
        a = a * gate.to(acc).view(*gate.shape, 1, 1)
    return a.to(y.dtype)


def _conv(a: torch.Tensor, w: torch.Tensor, shape: Case) -> torch.Tensor:
    return F.conv2d(a, w, None, shape.stride, shape.padding, shape.dilation, shape.groups)


def _forward_problem(shape: Case, dtype: torch.dtype, positive_shift: bool = False):
    """Fresh (y, weight) in ``dtype`` (y: a previous conv's raw output, offset and varied) and
    fp32 (scale, shift)."""
    cg = shape.c // shape.groups
    y = torch.randn(shape.n, shape.c, shape.h, shape.w, dtype=torch.float64) * 1.5 + 0.3
    w = torch.randn(shape.k, cg, shape.r, shape.r, dtype=torch.float64) / (cg * shape.r**2) ** 0.5
    scale, shift = _affine(shape.c, positive_shift)
    return y.to(dtype).contiguous(memory_format=CL), w.to(dtype), scale, shift


def _check_forward(shape: Case, dtype: torch.dtype, epilogue: str, gated: bool = False) -> None:
    """``epilogue``: "train" (raw output and BN partials), "eval" (the whole eval epilogue) or
    "raw" (raw output alone: a gated block run on running statistics)."""
    assert _alloc.poison_enabled(), "outputs must be NaN-poisoned (tests/conftest.py)"
    y, w, scale, shift = _forward_problem(shape, dtype)
    gate = _gate(shape.n, shape.c) if gated else None
    prologue = dict(in_scale=scale, in_shift=shift, in_gate=gate)
    raw_ref = _conv(_activation(y.double(), scale, shift, gate), w.double(), shape)
    raw_base = _conv(_activation(y, scale, shift, gate), w, shape)
    if epilogue == "raw":
        out, part = tconv.conv2d_fused(y, w, None, shape.conv, **prologue)
        assert part is None and out.dtype == dtype and out.is_contiguous(memory_format=CL)
        assert_close_ratio(f"{shape.id} {dtype}: raw out", out, raw_ref, raw_base)
    elif epilogue == "train":  # the block's inner convs: raw output + BN partials
        out, part = tconv.conv2d_fused(y, w, None, shape.conv, stats=True, **prologue)
        assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
        assert_close_ratio(f"{shape.id} {dtype}: raw out", out, raw_ref, raw_base)
        assert part.count.sum().item() == raw_ref.numel() // shape.k
        _check_batch_stats(f"{shape.id} {dtype}", part, raw_ref, raw_base)
    else:  # with the whole eval epilogue: scale/shift, residual, ReLU
        e_scale, e_shift = torch.rand(shape.k) + 0.5, torch.randn(shape.k)
        res64 = torch.randn(raw_ref.shape, dtype=torch.float64)
        res = res64.to(dtype).contiguous(memory_format=CL)

        def epi(raw, r):
            acc = torch.float64 if raw.dtype == torch.float64 else torch.float32
            z = (raw.to(acc) * e_scale.to(acc).view(1, -1, 1, 1)
                 + e_shift.to(acc).view(1, -1, 1, 1)).to(raw.dtype)
            return F.relu(z + r)

        out, part = tconv.conv2d_fused(y, w, None, shape.conv, scale=e_scale, shift=e_shift,
                                       residual=res, relu=True, **prologue)
        assert part is None
        assert_close_ratio(f"{shape.id} {dtype}: eval out", out, epi(raw_ref, res.double()),
                           epi(raw_base, res))


@pytest.mark.parametrize("name, dtype", DEFAULT, ids=_ids)
def test_forward_prologue_matches_float64(name: str, dtype: torch.dtype) -> None:
    _check_forward(SHAPES[name], dtype, "train")


@pytest.mark.parametrize("name", ["3x3s2", "stem", "g8x4s2"])
def test_forward_prologue_with_eval_epilogue(name: str) -> None:
    _check_forward(SHAPES[name], torch.float16, "eval")


@pytest.mark.slow
@pytest.mark.parametrize("epilogue", ["train", "eval"])
@pytest.mark.parametrize("name, dtype", DEFAULT + SLOW, ids=_ids)
def test_forward_prologue_grid(name: str, dtype: torch.dtype, epilogue: str) -> None:
    _check_forward(SHAPES[name], dtype, epilogue)


@pytest.mark.parametrize("name", ["3x3", "stem", "g2x8"])
def test_padding_is_applied_after_the_activation(name: str) -> None:
    """With shift > 0, relu(shift) > 0: padding the raw y with zeros and then activating (the
    wrong order) would put relu(shift) at every border. The kernel must match the right order
    and visibly differ from the wrong one."""
    shape, dtype = SHAPES[name], torch.float16
    y, w, scale, shift = _forward_problem(shape, dtype, positive_shift=True)
    p = shape.padding
    right = _conv(_activation(y.double(), scale, shift), w.double(), shape)
    y_padded = F.pad(y.double(), (p, p, p, p))  # zero padding of the raw y, then activation
    wrong = F.conv2d(_activation(y_padded, scale, shift), w.double(), None, shape.stride, 0,
                     shape.dilation, shape.groups)
    base = _conv(_activation(y, scale, shift), w, shape)
    out, _ = tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift)
    gap = (wrong - right).abs().max().item()
    assert gap > 0.1, "test too weak: the two orders barely differ"
    assert (out.double() - wrong).abs().max().item() > 0.5 * gap, "padding applied before ReLU"
    assert_close_ratio(f"{shape.id}: out", out, right, base)


# Gated prologue (a squeeze-excitation gate between two convs): tiny images so that the
# interpreter's 16-row tiles (and wgrad's 32-pixel steps) span several samples, each row needing
# its own sample's gate.
GATED_SHAPES = {
    "1x1": Case(n=3, c=32, k=24, r=1, padding=0, h=3, w=5),  # GEMM: the conv after an SE gate
    "3x3": Case(n=3, h=3, w=5),  # GEMM per-tap slabs, padded
    "stem": Case(n=3, c=3, h=3, w=5),  # flat-K GEMM (3 input channels)
    "g8x4": Case(n=3, c=32, k=32, groups=8, h=3, w=5),  # direct, 4 per group
}
GATED = [("1x1", torch.float16), ("3x3", torch.float32), ("3x3", torch.bfloat16),
         ("stem", torch.bfloat16), ("g8x4", torch.float32), ("g8x4", torch.bfloat16)]


@pytest.mark.parametrize("name, dtype", GATED, ids=_ids)
def test_forward_gated_prologue_matches_float64(name: str, dtype: torch.dtype) -> None:
    _check_forward(GATED_SHAPES[name], dtype, "train", gated=True)


@pytest.mark.parametrize("name, dtype", [("1x1", torch.bfloat16), ("g8x4", torch.float16)],
                         ids=_ids)
def test_forward_gated_prologue_without_statistics(name: str, dtype: torch.dtype) -> None:
    _check_forward(GATED_SHAPES[name], dtype, "raw", gated=True)


def test_forward_gated_prologue_with_eval_epilogue() -> None:
    _check_forward(GATED_SHAPES["3x3"], torch.float16, "eval", gated=True)


def test_forward_gate_is_per_sample() -> None:
    """Each output row reads its own sample's gate: the gated conv of a batch equals, sample by
    sample, the conv of that sample alone with its gate row (bitwise: same kernel, same tile
    shapes, a sample's rows then start at tile 0)."""
    shape, dtype = GATED_SHAPES["3x3"], torch.float32
    y, w, scale, shift = _forward_problem(shape, dtype)
    gate = _gate(shape.n, shape.c)
    batch, _ = tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift,
                                  in_gate=gate)
    for i in range(shape.n):
        alone, _ = tconv.conv2d_fused(y[i:i + 1].contiguous(memory_format=CL), w, None,
                                      shape.conv, in_scale=scale, in_shift=shift,
                                      in_gate=gate[i:i + 1])
        assert torch.equal(batch[i:i + 1], alone), f"sample {i}"


def test_forward_gate_rejects_bad_input() -> None:
    shape = GATED_SHAPES["3x3"]
    y, w, scale, shift = _forward_problem(shape, torch.float32)
    gate = _gate(shape.n, shape.c)
    with pytest.raises(AssertionError, match="in_gate needs the prologue"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_gate=gate)
    with pytest.raises(AssertionError, match=r"in_gate must have shape \(3, 16\)"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift,
                           in_gate=gate[:, :-1])
    with pytest.raises(AssertionError, match=r"in_gate must have shape \(3, 16\)"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift,
                           in_gate=gate[0])
    with pytest.raises(AssertionError, match="in_gate must be torch.float32"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift,
                           in_gate=gate.half())


def test_forward_prologue_rejects_bad_vectors() -> None:
    shape = SHAPES["3x3"]
    y, w, scale, shift = _forward_problem(shape, torch.float32)
    with pytest.raises(AssertionError, match="in_scale and in_shift"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale)
    with pytest.raises(AssertionError, match="in_shift must have shape"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift[:-1])
    with pytest.raises(AssertionError, match="in_scale must be torch.float32"):
        tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale.half(), in_shift=shift)


# ---------------------------------------------------------------------------------------------
# wgrad: the x operand read through the same activation
# ---------------------------------------------------------------------------------------------

WGRAD_SHAPES = {
    "3x3": Shape(h=9, w=7),  # per-tap GEMM tiles
    "1x1s2": Shape(c=32, k=24, r=1, s=1, padding=(0, 0), stride=(2, 2), h=9, w=8),
    "3x3s2": Shape(c=16, k=20, stride=(2, 2), h=9, w=7),
    "stem": Shape(c=3, k=16, r=7, s=7, stride=(2, 2), padding=(3, 3), h=11, w=9),  # flat wgrad
    "g2x16": Shape(c=32, k=32, groups=2, h=7, w=5),  # GEMM group axis
    "g8x4s2": Shape(c=32, k=32, groups=8, stride=(2, 2), h=7, w=9),  # direct, 4 per group
    "g2x8": Shape(c=16, k=24, groups=2, h=7, w=5),  # direct, 8 in / 12 out per group
}
WGRAD_SLOW = [(s, d) for s in WGRAD_SHAPES for d in DTYPES if (s, d) not in DEFAULT]


def _check_wgrad(shape: Shape, dtype: torch.dtype, positive_shift: bool = False,
                 gated: bool = False) -> None:
    """dW of the convolution whose input is relu(x·scale + shift) (times a channel gate): x is
    the stored raw y of a previous conv. dy is any stored dy operand (wgrad is linear in it):
    _problem's."""
    assert _alloc.poison_enabled(), "outputs must be NaN-poisoned (tests/conftest.py)"
    pb = _problem(shape, dtype, "train")
    scale, shift = _affine(shape.c, positive_shift)
    gate = _gate(shape.n, shape.c) if gated else None
    dw = conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, rows_per_chunk=64,
                        x_scale=scale, x_shift=shift, x_gate=gate)
    assert dw.dtype == dtype and dw.shape == pb.weight.shape and dw.is_contiguous()
    a64 = _activation(pb.x.double(), scale, shift, gate)
    a = _activation(pb.x, scale, shift, gate).contiguous(memory_format=CL)
    mask = [False, True, False]
    _, dw_ref, _ = _conv_backward(pb.dy_ref, a64, pb.weight64, shape, mask)
    _, dw_base, _ = _conv_backward(pb.dy_base, a, pb.weight, shape, mask)
    assert_close_ratio(f"{shape.id} {dtype}: dW", dw, dw_ref, dw_base)
    if positive_shift and max(shape.padding) > 0:  # padding before the activation would show
        pad_h, pad_w = shape.padding
        x_padded = F.pad(pb.x.double(), (pad_w, pad_w, pad_h, pad_h))
        unpadded = Shape(**{**shape.__dict__, "padding": (0, 0),
                            "h": shape.h + 2 * pad_h, "w": shape.w + 2 * pad_w})
        _, dw_wrong, _ = _conv_backward(pb.dy_ref, _activation(x_padded, scale, shift),
                                        pb.weight64, unpadded, mask)
        gap = (dw_wrong - dw_ref).abs().max().item()
        assert gap > 0.1 * dw_ref.abs().max().item(), "test too weak: the orders barely differ"
        assert (dw.double() - dw_wrong).abs().max().item() > 0.5 * gap, (
            "wgrad: padding applied before the activation"
        )


@pytest.mark.parametrize("name, dtype", DEFAULT, ids=_ids)
def test_wgrad_prologue_matches_float64(name: str, dtype: torch.dtype) -> None:
    _check_wgrad(WGRAD_SHAPES[name], dtype)


@pytest.mark.parametrize("name", ["3x3", "stem", "g2x8"])
def test_wgrad_padding_is_applied_after_the_activation(name: str) -> None:
    _check_wgrad(WGRAD_SHAPES[name], torch.float16, positive_shift=True)


GATED_WGRAD_SHAPES = {  # GATED_SHAPES' convolutions
    "1x1": Shape(n=3, c=32, k=24, r=1, s=1, padding=(0, 0), h=3, w=5),
    "3x3": Shape(n=3, h=3, w=5),
    "stem": Shape(n=3, c=3, h=3, w=5),  # flat wgrad
    "g8x4": Shape(n=3, c=32, k=32, groups=8, h=3, w=5),  # direct wgrad
}


@pytest.mark.parametrize("name, dtype", GATED, ids=_ids)
def test_wgrad_gated_prologue_matches_float64(name: str, dtype: torch.dtype) -> None:
    _check_wgrad(GATED_WGRAD_SHAPES[name], dtype, gated=True)


def test_wgrad_gate_rejects_bad_input() -> None:
    shape = GATED_WGRAD_SHAPES["3x3"]
    pb = _problem(shape, torch.float32, "train")
    scale, shift = _affine(shape.c)
    gate = _gate(shape.n, shape.c)
    with pytest.raises(AssertionError, match="x_gate needs the prologue"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_gate=gate)
    with pytest.raises(AssertionError, match=r"x_gate must have shape \(3, 16\)"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_scale=scale, x_shift=shift,
                       x_gate=gate.t())
    with pytest.raises(AssertionError, match="x_gate must be fp32"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_scale=scale, x_shift=shift,
                       x_gate=gate.bfloat16())


def test_wgrad_prologue_rejects_bad_vectors() -> None:
    shape = WGRAD_SHAPES["3x3"]
    pb = _problem(shape, torch.float32, "train")
    scale, shift = _affine(shape.c)
    with pytest.raises(AssertionError, match="x_scale and x_shift"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_scale=scale)
    with pytest.raises(AssertionError, match="x_shift must be"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_scale=scale, x_shift=shift[:-1])
    with pytest.raises(AssertionError, match="x_scale must be"):
        conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, x_scale=scale.double(),
                       x_shift=shift)


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", WGRAD_SLOW, ids=_ids)
def test_wgrad_prologue_grid(name: str, dtype: torch.dtype) -> None:
    _check_wgrad(WGRAD_SHAPES[name], dtype)


def test_compile_specs_have_prologue_variants() -> None:
    """Each forward kernel and each wgrad kernel is compiled with the prologue on, per dtype:
    the forward's with its largest tile, the wgrad kernels' (which block-fused training runs on
    every block) with every configuration on a ResNet shape class and once unspecialised (the
    stem's flat wgrad, whose input is no block's activation, only unspecialised)."""
    names = [s.name for s in (*tconv.compile_specs(), *conv_bwd.compile_specs())]
    wgrad, direct = len(conv_bwd.GPU_WGRAD_GEMM_CONFIGS), len(conv_bwd.GPU_DIRECT_CONFIGS)
    for dname in ("float32", "float16", "bfloat16"):
        for kname, want in (("conv_gemm", 1), ("conv_gemm_flat", 1), ("conv_direct", 1),
                            ("wgrad_gemm", wgrad + 1), ("wgrad_gemm_flat", 1),
                            ("wgrad_direct", direct + 1)):
            # the sm_90 TMA tiles have prologue variants of their own
            got = sum(n.startswith(f"{kname}-{dname}-prologue-") and "_tma_" not in n
                      for n in names)
            assert got == want, kname
    for s in (*tconv.compile_specs(), *conv_bwd.compile_specs()):
        if "IN_AFFINE" in s.constexprs:
            gated = "-gate-" in s.name or "-gatenostats-" in s.name
            assert s.constexprs["IN_AFFINE"] == ("-prologue-" in s.name or gated), s.name
            assert s.constexprs["IN_GATE"] == gated, s.name


def test_compile_specs_have_gated_variants() -> None:
    """The gated prologue is compiled on the kernels a gated conv (the 1x1 after a squeeze-
    excitation gate) may run on, per dtype: the forward's GEMM (and its sm_90 TMA tiles) and
    direct kernel with their largest tile, with and without the statistics; the GEMM wgrad with
    every configuration. Not the flat-K kernels (the stem) nor the direct wgrad."""
    names = [s.name for s in (*tconv.compile_specs(), *conv_bwd.compile_specs())]
    wgrad = len(conv_bwd.GPU_WGRAD_GEMM_CONFIGS)
    for dname in ("float32", "float16", "bfloat16"):
        tma = int(dname != "float32")
        for kname, variant, want in (
                ("conv_gemm", "gate", 1 + tma), ("conv_gemm", "gatenostats", 1 + tma),
                ("conv_direct", "gate", 1), ("conv_direct", "gatenostats", 1),
                ("conv_gemm_flat", "gate", 0), ("conv_gemm_flat", "gatenostats", 0),
                ("wgrad_gemm", "gate", wgrad), ("wgrad_gemm_flat", "gate", 0),
                ("wgrad_direct", "gate", 0)):
            got = sum(n.startswith(f"{kname}-{dname}-{variant}-") for n in names)
            assert got == want, (kname, dname, variant)


@pytest.mark.skipif(not tconv._INTERPRET, reason="bitwise: no FMA contraction")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_prologue_reads_exactly_the_activation_eager_stores(dtype: torch.dtype) -> None:
    """The prologue is the stored activation, not just close to it: conv (and wgrad) of y
    through the prologue equal bitwise, in every kernel path, the same kernels run on the
    activation computed in fp32 and rounded to the dtype by PyTorch (the float64 truth above
    cannot see this rounding: it is of the activation itself)."""
    for name in ("3x3s2", "stem", "g2x8"):
        shape = SHAPES[name]
        y, w, scale, shift = _forward_problem(shape, dtype)
        a = _activation(y, scale, shift).contiguous(memory_format=CL)
        fused, _ = tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift)
        stored, _ = tconv.conv2d_fused(a, w, None, shape.conv)
        assert torch.equal(fused, stored), f"{name} {dtype}: forward"

        wshape = WGRAD_SHAPES[name]
        pb = _problem(wshape, dtype, "train")
        scale, shift = _affine(wshape.c)
        a = _activation(pb.x, scale, shift).contiguous(memory_format=CL)
        fused = conv_bwd.wgrad(pb.op, pb.x, pb.weight, wshape.conv, x_scale=scale, x_shift=shift)
        stored = conv_bwd.wgrad(pb.op, a, pb.weight, wshape.conv)
        assert torch.equal(fused, stored), f"{name} {dtype}: wgrad"


@pytest.mark.skipif(not tconv._INTERPRET, reason="bitwise: no FMA contraction")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_gated_prologue_rounds_once(dtype: torch.dtype) -> None:
    """The gated prologue is relu(y·scale + shift)·gate computed in fp32 and rounded once to the
    dtype: conv and wgrad through it equal bitwise, in every kernel path, the same kernels run
    on that activation computed by PyTorch (a rounding after the ReLU and again after the gate
    would differ)."""
    for name in ("3x3", "stem", "g8x4"):
        shape = GATED_SHAPES[name]
        y, w, scale, shift = _forward_problem(shape, dtype)
        gate = _gate(shape.n, shape.c)
        a = _activation(y, scale, shift, gate).contiguous(memory_format=CL)
        fused, _ = tconv.conv2d_fused(y, w, None, shape.conv, in_scale=scale, in_shift=shift,
                                      in_gate=gate)
        stored, _ = tconv.conv2d_fused(a, w, None, shape.conv)
        assert torch.equal(fused, stored), f"{name} {dtype}: forward"

        wshape = GATED_WGRAD_SHAPES[name]
        pb = _problem(wshape, dtype, "train")
        scale, shift = _affine(wshape.c)
        a = _activation(pb.x, scale, shift, gate).contiguous(memory_format=CL)
        fused = conv_bwd.wgrad(pb.op, pb.x, pb.weight, wshape.conv, x_scale=scale,
                               x_shift=shift, x_gate=gate)
        stored = conv_bwd.wgrad(pb.op, a, pb.weight, wshape.conv)
        assert torch.equal(fused, stored), f"{name} {dtype}: wgrad"


def test_prologue_pruning_drops_the_tiles_that_spill_only_with_it(monkeypatch) -> None:
    """The autotuner reads IN_AFFINE: tiles found spilling with the prologue on (and only then)
    are offered without it and not with it."""
    from fastres.backends.triton import _tuning

    monkeypatch.setattr(_tuning, "target", lambda x: 80)
    nargs = {"K": 256, "x_ptr": torch.empty(1, dtype=torch.float16)}
    plain = tconv._prune_direct(tconv.GPU_DIRECT_CONFIGS, nargs)
    with_prologue = tconv._prune_direct(tconv.GPU_DIRECT_CONFIGS, nargs, IN_AFFINE=True)
    assert plain == tconv.GPU_DIRECT_CONFIGS
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in plain
            if c not in with_prologue} == {(128, 32), (64, 64), (128, 64)}
    nargs = {"Kg": 256, "Cg": 256, "x_ptr": torch.empty(1, dtype=torch.float32)}
    plain = tconv._prune_gemm(tconv.GPU_GEMM_CONFIGS, nargs)
    with_prologue = tconv._prune_gemm(tconv.GPU_GEMM_CONFIGS, nargs, IN_AFFINE=True)
    # (128x128x64 spills on sm_80 with every epilogue since the statistics follow the store)
    assert {tuple(c.kwargs.values()) for c in plain if c not in with_prologue} == {(64, 64, 64)}
    # a gated launch has the prologue on too: the same tiles are dropped
    assert tconv._prune_gemm(tconv.GPU_GEMM_CONFIGS, nargs, IN_AFFINE=True,
                             IN_GATE=True) == with_prologue
    # the direct kernel's fp32 tiles of 4096 elements spill with the gate alone
    nargs = {"K": 256, "x_ptr": torch.empty(1, dtype=torch.float32)}
    with_prologue = tconv._prune_direct(tconv.GPU_DIRECT_CONFIGS, nargs, IN_AFFINE=True)
    gated = tconv._prune_direct(tconv.GPU_DIRECT_CONFIGS, nargs, IN_AFFINE=True, IN_GATE=True)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in with_prologue
            if c not in gated} == {(128, 32), (64, 64), (256, 16)}


def test_gated_wgrad_counts_the_staged_gate_tile(monkeypatch) -> None:
    """The gated wgrad stages an fp32 gate tile per pipeline buffer besides x's (kernel
    report: 192 KB for fp32 128x128x32 on sm_80, over its 163 KB): the estimate counts it, so
    the pruner drops those tiles for a gated launch on sm_80 and keeps them without the gate."""
    from fastres.backends.triton import _tuning

    monkeypatch.setattr(_tuning, "target", lambda x: 80)
    nargs = {"Kg": 256, "Cg": 256, "dz_ptr": torch.empty(1, dtype=torch.float32)}
    cfgs = conv_bwd.GPU_WGRAD_GEMM_CONFIGS
    big = next(c for c in cfgs if tuple(c.kwargs.values()) == (128, 128, 32))
    assert big in conv_bwd._prune_wgrad(cfgs, nargs, IN_AFFINE=True)
    assert big not in conv_bwd._prune_wgrad(cfgs, nargs, IN_AFFINE=True, IN_GATE=True)
    assert conv_bwd.smem_bytes("wgrad_gemm", big, torch.float32, 80, gated=True) >= 196608
