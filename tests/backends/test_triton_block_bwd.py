"""The join kernels a fused residual block's training step is built from, against float64.

* ``conv_bwd.dgrad(..., add=, act=)``: the dgrad epilogue that joins a shortcut's gradient and,
  for a conv whose input a = relu(y·scale + shift) was never stored, applies the layer before's
  dReLU and takes its BN backward sums (g and (Σg, Σg·ŷ, δ));
* ``bn.apply(..., res_scale=, res_shift=)``: the block output with the projection BN folded in;
* ``bn.reductions(..., second=)``: the sums of two BNs fed by one g, in one pass;
* ``bn.backward(..., add=)``: a pre-activation block's dBN joined with the shortcut gradient;
* ``bn.batch_stats``: per-tile (count, mean, M2) of a stored tensor, finalised by bn.finalize.
* a channel gate: ``bn.sample_sums``, ``bn.activation_sums`` (of a conv input's never-stored
  activation), the (N, K) branch scale in ``bn.apply``, and ``bn.reductions`` with the gate
  (``branch_scale``, ``branch_add``, and ``act_mask`` for a gate on a conv's input).

Truth is float64 on the CPU, the base plain PyTorch in the test dtype, compared with the
error-ratio rule of ``tests.numerics``; outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from fastres.backends.reference import bn_relu_backward
from fastres.backends.triton import bn, conv_bwd
from tests.backends.test_triton_conv_bwd import SHAPES, SLOW_SHAPES, Shape, _conv_backward, _problem
from tests.numerics import assert_close_ratio, merge_partials

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIMS = (0, 2, 3)
EPS = 1e-5


def _v(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _nhwc(n: int, k: int, h: int, w: int, *, offset: float = 0.0) -> torch.Tensor:
    """float64 NHWC activation with per-channel offsets and spreads (non-trivial statistics)."""
    mu = torch.randn(k, dtype=torch.float64) + offset
    sd = torch.rand(k, dtype=torch.float64) + 0.25
    t = torch.randn(n, k, h, w, dtype=torch.float64) * _v(sd) + _v(mu)
    return t.contiguous(memory_format=CL)


# ---------------------------------------------------------------------------------------------
# dgrad epilogue: add and act
# ---------------------------------------------------------------------------------------------


def _act_input(x_shape, dtype: torch.dtype, batch_stats: bool) -> conv_bwd.ActInput:
    """The layer before's raw output y (stored in dtype) and its BN: with batch statistics
    those of y before its rounding (as the conv epilogue's fp32 accumulator gives them in fp32),
    so δ is not trivially 0 in fp16/bf16; about half the pre-activations are negative."""
    n, c, h, w = x_shape
    y64 = _nhwc(n, c, h, w, offset=0.5)
    y = y64.to(DEVICE, dtype).contiguous(memory_format=CL)
    if batch_stats:
        var, mean = (t.float().to(DEVICE) for t in torch.var_mean(y64, dim=DIMS, correction=0))
    else:
        mean = (torch.randn(c) * 0.3 + 0.5).to(DEVICE)
        var = (torch.rand(c) + 0.5).to(DEVICE)
    gamma = (torch.rand(c) + 0.5).to(DEVICE)
    beta = (torch.randn(c) * 0.5).to(DEVICE)
    scale = gamma * torch.rsqrt(var + EPS)
    shift = beta - mean * scale
    return conv_bwd.ActInput(y, scale, shift, mean, var, EPS, batch_stats)


def _act_mask(act: conv_bwd.ActInput) -> torch.Tensor:
    """[y·scale + shift > 0] in fp32: the definition the kernel implements (not an estimate)."""
    return (act.y.float() * _v(act.scale) + _v(act.shift)) > 0


def _sums(g: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
          batch_stats: bool):
    """(Σg, Σg·ŷ, δ) of a BN with these statistics, in g's precision; ŷ centred on the stored
    y (δ = mean of y − mean) with batch statistics, as bn.reductions defines them."""
    d = y - _v(mean)
    invstd = torch.rsqrt(var + EPS)
    sum_g = g.sum(DIMS)
    if batch_stats:
        delta = d.mean(DIMS)
        return sum_g, ((g * d).sum(DIMS) - delta * sum_g) * invstd, delta
    return sum_g, (g * d).sum(DIMS) * invstd, None


def _same(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Bitwise equal under the interpreter, where every autotuner runs one configuration; on a
    GPU two launches with different flags may be tuned to different tiles (another summation
    order), so there within ``tol``."""
    if DEVICE == "cpu":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def _assert_sum_close(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor,
                      abs_terms: torch.Tensor) -> None:
    """The error-ratio rule for an fp32 reduction, whose floor is its own rounding: a few fp32
    ulps of the sum of the terms' magnitudes (``abs_terms``, per channel). PyTorch's CPU sums
    of fp32 accumulate more precisely than any GPU reduction, so the ratio alone would hold a
    sum whose terms cancel (δ is nearly 0 by construction) to a tighter bound than fp32 has."""
    assert not torch.isnan(out).any(), f"{name}: result has NaN (unwritten or invalid output)"
    out64, ref64, base64 = (t.detach().double().cpu() for t in (out, ref, base))
    err = (out64 - ref64).abs()
    bound = 2 * (base64 - ref64).abs().max() + 4 * torch.finfo(torch.float32).eps * abs_terms
    assert (err <= bound).all(), (
        f"{name}: error {err.max():.3e} > 2 x PyTorch's {(base64 - ref64).abs().max():.3e} "
        f"+ fp32 rounding of the sum"
    )


def _check_dgrad_join(shape: Shape, dtype: torch.dtype, variant: str, *, add: bool, act: bool,
                      batch_stats: bool = True) -> None:
    pb = _problem(shape, dtype, variant)
    x_shape = pb.x.shape
    add_t = None
    if add:
        add_t = torch.randn(x_shape, dtype=torch.float64).to(DEVICE, dtype)
        add_t = add_t.contiguous(memory_format=CL)
    act_in = _act_input(x_shape, dtype, batch_stats) if act else None
    out = conv_bwd.dgrad(pb.op, pb.weight, shape.conv, x_shape, add=add_t, act=act_in)

    mask = [True, False, False]
    dx_ref = _conv_backward(pb.dy_ref, pb.x64, pb.weight64, shape, mask)[0]
    dx_base = _conv_backward(pb.dy_base, pb.x, pb.weight, shape, mask)[0]
    if add:
        dx_ref = dx_ref + add_t.double().cpu()
        dx_base = dx_base + add_t  # PyTorch's sum in the dtype: fp32 math, one rounding
    if not act:
        assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
        assert_close_ratio("dx + add", out, dx_ref, dx_base)
        return

    g, (sum_g, sum_gyhat, delta) = out
    assert g.dtype == dtype and g.is_contiguous(memory_format=CL)
    positive = _act_mask(act_in)
    g_ref = dx_ref * positive.cpu()
    g_base = dx_base * positive
    assert_close_ratio("g", g, g_ref, g_base)
    # The sums are of g as stored (what dy is then formed from; its own error is checked
    # above), so truth and base sum that stored g: float64 / fp32.
    y = act_in.y
    c64 = lambda t: t.double().cpu()
    ref = _sums(c64(g), c64(y), c64(act_in.mean), c64(act_in.var), batch_stats)
    base = _sums(g.float(), y.float(), act_in.mean, act_in.var, batch_stats)
    d = (c64(y) - _v(c64(act_in.mean))).abs()
    invstd = torch.rsqrt(c64(act_in.var) + EPS)
    m = y.numel() // y.shape[1]
    terms = (c64(g).abs().sum(DIMS), (c64(g).abs() * d).sum(DIMS) * invstd, d.sum(DIMS) / m)
    for name, ours, r, b, t in zip(("Σg", "Σg·ŷ", "δ"), (sum_g, sum_gyhat, delta), ref, base,
                                   terms):
        if r is None:
            assert ours is None
        else:
            _assert_sum_close(name, ours, r, b, t)

    # what bn.reductions returns for that layer from dx + add and the stored activation a:
    # the same g (bitwise where both dgrad launches run one configuration: masking and rounding
    # commute) and the same sums up to summation order
    dx_plain = conv_bwd.dgrad(pb.op, pb.weight, shape.conv, x_shape, add=add_t)
    a = F.relu(y.float() * _v(act_in.scale) + _v(act_in.shift)).to(dtype)
    a = a.contiguous(memory_format=CL)
    dres = torch.empty_like(dx_plain)
    sums = bn.reductions(dx_plain, y, a, act_in.mean, act_in.var, batch_stats=batch_stats,
                         eps=EPS, relu=True, dres=dres)
    _same(g, dres, tol=torch.finfo(dtype).eps * dres.abs().max().item())
    for name, ours, theirs in zip(("Σg", "Σg·ŷ", "δ"), (sum_g, sum_gyhat, delta), sums):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)


# (shape, what it covers): stride 1 and 2, dense, a group axis, the direct kernel (4 / 8
# channels per group), odd sizes and N=1
JOIN_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[5], SHAPES[6], SHAPES[9]]


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("shape", JOIN_SHAPES, ids=lambda s: s.id)
def test_dgrad_act_fp32(shape: Shape, batch_stats: bool) -> None:
    _check_dgrad_join(shape, torch.float32, "train", add=True, act=True, batch_stats=batch_stats)


@pytest.mark.parametrize(
    "shape, dtype",
    [(SHAPES[0], torch.float16), (SHAPES[1], torch.bfloat16), (SHAPES[5], torch.bfloat16),
     (SHAPES[6], torch.float16)],
    ids=lambda v: v.id if isinstance(v, Shape) else str(v),
)
def test_dgrad_act_half(shape: Shape, dtype: torch.dtype) -> None:
    _check_dgrad_join(shape, dtype, "train", add=True, act=True)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5]], ids=lambda s: s.id)
def test_dgrad_act_without_add_running_dy(shape: Shape) -> None:
    _check_dgrad_join(shape, torch.float16, "running", add=False, act=True, batch_stats=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5]], ids=lambda s: s.id)
def test_dgrad_add(shape: Shape, dtype: torch.dtype) -> None:
    """Stride 2 with a 1x1 filter: the input pixels no tap reaches get exactly ``add``."""
    _check_dgrad_join(shape, dtype, "train", add=True, act=False)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=lambda s: s.id)
def test_dgrad_act_deterministic(shape: Shape) -> None:
    pb = _problem(shape, torch.float16, "train")
    act_in = _act_input(pb.x.shape, torch.float16, True)
    runs = [conv_bwd.dgrad(pb.op, pb.weight, shape.conv, pb.x.shape, act=act_in)
            for _ in range(2)]
    (g0, s0), (g1, s1) = runs
    assert torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))


@pytest.mark.slow
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("variant", ["train", "running"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + SLOW_SHAPES, ids=lambda s: s.id)
def test_dgrad_act_grid(shape: Shape, dtype: torch.dtype, variant: str,
                        batch_stats: bool) -> None:
    _check_dgrad_join(shape, dtype, variant, add=True, act=True, batch_stats=batch_stats)


# ---------------------------------------------------------------------------------------------
# bn.py joins
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu, k", [(True, 7), (True, 130), (False, 24)])
def test_apply_dual_scale_bias(dtype: torch.dtype, relu: bool, k: int) -> None:
    y = _nhwc(2, k, 5, 7, offset=0.5).to(DEVICE, dtype)
    res = _nhwc(2, k, 5, 7, offset=-0.5).to(DEVICE, dtype)
    scale, shift, res_scale, res_shift = (
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
    )
    z = bn.apply(y, scale, shift, res, relu, res_scale=res_scale, res_shift=res_shift)
    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)

    def compute(y, s, b, r, rs, rb):
        out = y * _v(s) + _v(b) + (r * _v(rs) + _v(rb))
        return out.relu() if relu else out

    c64 = lambda t: t.double().cpu()
    ref = compute(*(c64(t) for t in (y, scale, shift, res, res_scale, res_shift)))
    base = compute(y, scale, shift, res, res_scale, res_shift).to(dtype)
    assert_close_ratio("z", z, ref, base)


def _keep(n: int) -> torch.Tensor:
    """A drop-path draw: some samples 0, the rest 1/keep (fp32, as the block op takes it)."""
    keep = torch.full((n,), 1 / 0.7)
    keep[::2] = 0.0
    return keep.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_affine, k", [(True, 7), (False, 130)])
def test_apply_with_branch_scale(dtype: torch.dtype, res_affine: bool, k: int) -> None:
    """Stochastic depth in the join pass: relu((y·scale + shift)·keep[n] + shortcut), the
    shortcut raw with its BN folded in or added as is; rows of several samples per tile."""
    y = _nhwc(3, k, 5, 7, offset=0.5).to(DEVICE, dtype)
    res = _nhwc(3, k, 5, 7, offset=-0.5).to(DEVICE, dtype)
    scale, shift, res_scale, res_shift = (
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
    )
    keep = _keep(3)
    aff = dict(res_scale=res_scale, res_shift=res_shift) if res_affine else {}
    z = bn.apply(y, scale, shift, res, True, branch_scale=keep, **aff)
    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)

    _check_scaled_apply(z, y, scale, shift, res, res_scale, res_shift, keep, res_affine)


def _check_scaled_apply(z, y, scale, shift, res, res_scale, res_shift, branch,
                        res_affine: bool) -> None:
    """``z`` is relu((y·scale + shift)·branch + shortcut), ``branch`` (N,) per sample or
    (N, K) per sample and channel, the shortcut normalised by its own BN with ``res_affine``,
    against float64."""
    def compute(y, s, b, r, rs, rb, br):
        short = r * _v(rs) + _v(rb) if res_affine else r
        return ((y * _v(s) + _v(b)) * br.view(br.shape[0], -1, 1, 1) + short).relu()

    c64 = lambda t: t.double().cpu()
    ref = compute(*(c64(t) for t in (y, scale, shift, res, res_scale, res_shift, branch)))
    base = compute(y, scale, shift, res, res_scale, res_shift, branch).to(z.dtype)
    assert_close_ratio("z", z, ref, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_stats, k, rows_per_prog", [(True, 7, None), (True, 40, 16),
                                                           (False, 130, 32)])
def test_reductions_with_branch_scale(dtype: torch.dtype, batch_stats: bool, k: int,
                                      rows_per_prog: int | None) -> None:
    """The last BN of a drop-path block sees g·keep[n]: its sums are of that g as the pass stores
    it (g_branch, in the dtype) for its dy operand, while dres keeps the shortcut's unscaled g;
    programs
    whose rows straddle samples (rows_per_prog 16 over 7·9-pixel images)."""
    n = 3
    y64 = _nhwc(n, k, 9, 7, offset=0.5)
    y = y64.to(DEVICE, dtype)
    z = torch.randn(y.shape, dtype=torch.float64).relu().to(DEVICE, dtype)
    z = z.contiguous(memory_format=CL)
    dz = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype).contiguous(memory_format=CL)
    if batch_stats:
        var, mean = (s.float().to(DEVICE) for s in torch.var_mean(y64, dim=DIMS, correction=0))
    else:
        var, mean = (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE)
    keep = _keep(n)
    g_branch, dres = torch.empty_like(dz).fill_(float("nan")), torch.empty_like(dz).fill_(
        float("nan"))
    sums = bn.reductions(dz, y, z, mean, var, batch_stats=batch_stats, eps=EPS, relu=True,
                         rows_per_prog=rows_per_prog, dres=dres, branch_scale=keep,
                         g_branch=g_branch)
    g = dz.float() * (z > 0)
    torch.testing.assert_close(dres, g.to(dtype), rtol=0, atol=0)
    gb = g * keep.view(-1, 1, 1, 1)
    torch.testing.assert_close(g_branch, gb.to(dtype), rtol=0, atol=0)
    # the sums are of the g dgrad reads, rounded to the dtype (as eager's BN backward sums the
    # gradient the drop path's backward stored)
    _check_sums_of_stored_g(sums, g_branch, y, mean, var, batch_stats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch_stats, k, rows_per_prog, offset",
    [(True, 7, None, 0.0), (True, 40, 16, 1000.0), (False, 130, 32, 0.0)],
)
def test_reductions_with_second_bn(dtype: torch.dtype, batch_stats: bool, k: int,
                                   rows_per_prog: int | None, offset: float) -> None:
    """The projection shortcut's BN (y2) sees the block output's g like the last conv's BN (y):
    both sets of sums from one pass, each as bn.reductions alone gives it."""
    y64, y2_64 = _nhwc(3, k, 9, 7, offset=offset), _nhwc(3, k, 9, 7, offset=-offset)
    y, y2 = y64.to(DEVICE, dtype), y2_64.to(DEVICE, dtype)
    z = torch.randn(y.shape, dtype=torch.float64).relu().to(DEVICE, dtype)
    z = z.contiguous(memory_format=CL)
    dz = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype).contiguous(memory_format=CL)

    def stats(t64):
        if batch_stats:  # of the unrounded tensor: δ is not trivially 0 in fp16/bf16
            return (s.float().to(DEVICE) for s in torch.var_mean(t64, dim=DIMS, correction=0))
        return (torch.rand(k) + 0.5).to(DEVICE), (torch.randn(k) + offset).to(DEVICE)

    (var, mean), (var2, mean2) = stats(y64), stats(y2_64)
    kw = dict(batch_stats=batch_stats, eps=EPS, relu=True, rows_per_prog=rows_per_prog)
    sums, sums2 = bn.reductions(dz, y, z, mean, var, second=(y2, mean2, var2), **kw)
    alone = bn.reductions(dz, y, z, mean, var, **kw)
    alone2 = bn.reductions(dz, y2, z, mean2, var2, **kw)
    for ours, theirs in ((sums, alone), (sums2, alone2)):
        for a, b in zip(ours, theirs):
            assert (a is None) == (b is None)
            if a is not None:  # the same kernel code and order (the same tile: bitwise)
                _same(a, b, tol=1e-5 * b.abs().max().item())
    g = dz * (z > 0)
    c64 = lambda t: t.double().cpu()
    ref2 = _sums(c64(g), c64(y2), c64(mean2), c64(var2), batch_stats)
    base2 = _sums(g.float(), y2.float(), mean2, var2, batch_stats)
    d2 = (c64(y2) - _v(c64(mean2))).abs()
    terms = (c64(g).abs().sum(DIMS), (c64(g).abs() * d2).sum(DIMS) * torch.rsqrt(c64(var2) + EPS),
             d2.mean(DIMS))
    for name, a, r, b, t in zip(("Σg", "Σg·ŷ2", "δ2"), sums2, ref2, base2, terms):
        if r is not None:
            _assert_sum_close(name, a, r, b, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_stats, k, offset", [(True, 7, 0.0), (True, 40, 1000.0),
                                                    (False, 130, 0.0)])
def test_backward_with_add(dtype: torch.dtype, batch_stats: bool, k: int, offset: float) -> None:
    """Pre-activation join: dx = dBN(g) + add, g already masked (relu=False)."""
    y = _nhwc(3, k, 9, 7, offset=offset).to(DEVICE, dtype)
    g = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype).contiguous(memory_format=CL)
    add = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype)
    add = add.contiguous(memory_format=CL)
    gamma = (torch.rand(k) + 0.5).to(DEVICE)
    if batch_stats:
        var64, mean64 = torch.var_mean(y.double(), dim=DIMS, correction=0)
    else:
        mean64 = torch.randn(k, dtype=torch.float64) * 0.3 + offset
        var64 = torch.rand(k, dtype=torch.float64) + 0.5
    mean, var = mean64.float().to(DEVICE), var64.float().to(DEVICE)
    dx, _, _, _ = bn.backward(g, y, g, mean, var, gamma, batch_stats=batch_stats,
                              eps=EPS, relu=False, add=add)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    dy_plain, _, _, _ = bn.backward(g, y, g, mean, var, gamma, batch_stats=batch_stats, eps=EPS,
                                    relu=False)
    kw = dict(batch_stats=batch_stats, eps=EPS, relu=False, need_gamma=False)
    c64 = lambda t: t.double().cpu()
    if batch_stats:  # autograd of F.batch_norm on the stored y, as in test_triton.py
        def dbn(y, g, gam):
            y = y.detach().requires_grad_(True)
            out = F.batch_norm(y, None, None, gam, None, True, 0.0, EPS)
            return torch.autograd.grad(out, y, g)[0]

        dy64 = dbn(c64(y), c64(g), c64(gamma))
        dy_b = dbn(y, g, gamma)
    else:
        dy64 = bn_relu_backward(c64(g), c64(y), None, c64(mean), c64(var), c64(gamma), **kw)[1]
        dy_b = bn_relu_backward(g, y, None, mean, var, gamma, **kw)[1]
    assert_close_ratio("dBN(g) + add", dx, dy64 + c64(add), (dy_b.to(dtype) + add))
    # the add is the only difference from the plain pass (fp32 sum before the one rounding)
    torch.testing.assert_close(dx.float(), (dy_plain.float() + add.float()).to(dtype).float(),
                               rtol=0, atol=2 * (dx.float().abs().max() *
                                                 torch.finfo(dtype).eps).item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "k, rows_per_prog, offset",
    [(7, None, 0.0), (40, 16, 0.0), (9, 24, 1000.0), (130, 50, 3.0)],
)
def test_batch_stats_finalize_vs_var_mean(dtype: torch.dtype, k: int,
                                          rows_per_prog: int | None, offset: float) -> None:
    """The tile partials against the exact ones of the stored tensor (base: those rounded once
    to fp32, all the format can hold), then bn.finalize of them against torch.var_mean in
    float64 (base: plain PyTorch's merge of the fp32-rounded exact partials; the CPU's own
    fp32 var_mean accumulates in double and is not what a GPU runs)."""
    x = _nhwc(3, k, 9, 7, offset=offset).to(DEVICE, dtype)
    count, mean_t, m2 = bn.batch_stats(x, rows_per_prog=rows_per_prog)
    m = x.numel() // k
    rows = rows_per_prog or bn._rows_per_prog(m)
    assert count.shape == (-(-m // rows),) and mean_t.shape == m2.shape == (count.shape[0], k)
    assert count.sum().item() == m
    x64 = x.double().cpu()
    flat = x64.permute(0, 2, 3, 1).reshape(-1, k)
    tiles = [flat[r0:r0 + rows] for r0 in range(0, m, rows)]
    mean_ex = torch.stack([t.mean(0) for t in tiles])
    m2_ex = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    assert torch.equal(count.cpu(), torch.tensor([float(t.shape[0]) for t in tiles]))
    assert_close_ratio("tile means", mean_t, mean_ex, mean_ex.float())
    assert_close_ratio("tile M2", m2, m2_ex, m2_ex.float())

    mean, var, _, _ = bn.finalize(count, mean_t, m2, None, None, EPS, affine=False)
    var64, mean64 = torch.var_mean(x64, dim=DIMS, correction=0)
    mean_b, var_b = merge_partials(count.cpu(), mean_ex.float(), m2_ex.float())
    assert_close_ratio("mean", mean, mean64, mean_b)
    assert_close_ratio("var", var, var64, var_b)


def test_batch_stats_deterministic() -> None:
    x = _nhwc(2, 24, 11, 9, offset=10.0).to(DEVICE, torch.float16)
    a = bn.batch_stats(x, rows_per_prog=40)
    b = bn.batch_stats(x, rows_per_prog=40)
    assert all(torch.equal(s, t) for s, t in zip(a, b))



def test_second_bn_sums_never_offer_a_tile_that_spills() -> None:
    """With SECOND (five fp32 accumulators) tiles of 32 elements per thread spill on sm_80 and
    sm_90 (compile check): not offered, and the compile specs say so."""
    assert bn._bn_bwd_reduce_kernel.prune is bn._prune_bwd_reduce
    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in bn._REDUCE_BLOCKS]
    for block_k, second, dropped in ((128, True, [(32, 4), (64, 8)]), (64, True, []),
                                     (128, False, [])):
        kept = bn._prune_bwd_reduce(configs, {}, BLOCK_K=block_k, SECOND=second)
        assert [(c.kwargs["BLOCK_M"], c.num_warps) for c in configs if c not in kept] == dropped
    specs = [s for s in bn.compile_specs() if s.name.startswith("bn_bwd_reduce[fp32,")
             and "SECOND=1" in s.name and s.shape_class == "resnet"]
    pruned = {s.name for s in specs if s.pruned}
    assert pruned == {s.name for s in specs if "BLOCK_K=128" in s.name
                      and ("BLOCK_M=32" in s.name or "BLOCK_M=64" in s.name)}


@pytest.mark.parametrize("batch_stats", [True, False])
def test_many_partial_rows_are_summed_in_two_levels(batch_stats: bool) -> None:
    """Above 512 partial rows (a dgrad epilogue writes one per pixel tile and stride phase) the
    sums go through a first level of 64-row groups: the same Σg, Σg·ŷ, δ as one level, against
    float64."""
    k = 20
    y64 = _nhwc(2, k, 17, 17, offset=3.0)  # 578 rows: one partial row each below
    y = y64.to(DEVICE, torch.float32)
    z = torch.randn(y.shape, dtype=torch.float64).relu().to(DEVICE, torch.float32)
    z = z.contiguous(memory_format=CL)
    dz = torch.randn(y.shape).to(DEVICE).contiguous(memory_format=CL)
    var, mean = (s.float() for s in torch.var_mean(y64, dim=DIMS, correction=0))
    kw = dict(batch_stats=batch_stats, eps=EPS, relu=True)
    two_level = bn.reductions(dz, y, z, mean, var, rows_per_prog=1, **kw)
    one_level = bn.reductions(dz, y, z, mean, var, **kw)
    g = (dz * (z > 0)).double().cpu()
    ref = _sums(g, y64, mean.double(), var.double(), batch_stats)
    for name, a, b, r in zip(("Σg", "Σg·ŷ", "δ"), two_level, one_level, ref):
        assert (a is None) == (r is None), name
        if r is not None:
            scale = r.abs().max().item() + 1.0
            assert (a.double().cpu() - r).abs().max() < 1e-4 * scale, name
            assert (b.double().cpu() - r).abs().max() < 1e-4 * scale, name


# ---------------------------------------------------------------------------------------------
# Channel gate (SE/ECA): per-(sample, channel) branch scale, its additive gradient, and the
# per-sample sums
# ---------------------------------------------------------------------------------------------


def _gate_scale(n: int, k: int, transposed: bool) -> torch.Tensor:
    """An (N, K) fp32 gate·keep: some samples dropped, the rest a gate in (0, 2); with
    ``transposed`` a non-contiguous view (strides (1, N)), which the kernels index by strides."""
    s = (torch.rand(n, k) * 2) * (_keep(n).cpu().view(-1, 1) > 0)
    if transposed:
        s = s.t().contiguous().t()
    return s.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_affine, k, transposed", [(True, 7, False), (False, 130, True)])
def test_apply_with_gate_scale(dtype: torch.dtype, res_affine: bool, k: int, transposed: bool,
                               n: int = 3, h: int = 5, w: int = 7) -> None:
    """relu((y·scale + shift)·s[n, k] + shortcut) with an (N, K) scale of any strides."""
    y = _nhwc(n, k, h, w, offset=0.5).to(DEVICE, dtype)
    res = _nhwc(n, k, h, w, offset=-0.5).to(DEVICE, dtype)
    scale, shift, res_scale, res_shift = (
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
        (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE),
    )
    s = _gate_scale(n, k, transposed)
    aff = dict(res_scale=res_scale, res_shift=res_shift) if res_affine else {}
    z = bn.apply(y, scale, shift, res, True, branch_scale=s, **aff)
    _check_scaled_apply(z, y, scale, shift, res, res_scale, res_shift, s, res_affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_stats, k, rows_per_prog", [(True, 7, None), (True, 40, 16),
                                                           (False, 130, 32)])
def test_reductions_with_gate_scale_and_add(dtype: torch.dtype, batch_stats: bool, k: int,
                                            rows_per_prog: int | None, n: int = 3, h: int = 9,
                                            w: int = 7) -> None:
    """The last BN of a gated block sees g·s[n, k] + t[n, k] (t = dpooled/HW): stored in the
    dtype (g_branch) and its sums taken of that stored g; dres stays the output's g; programs
    whose rows straddle samples."""
    y64 = _nhwc(n, k, h, w, offset=0.5)
    y = y64.to(DEVICE, dtype)
    z = torch.randn(y.shape, dtype=torch.float64).relu().to(DEVICE, dtype)
    z = z.contiguous(memory_format=CL)
    dz = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype).contiguous(memory_format=CL)
    if batch_stats:
        var, mean = (s.float().to(DEVICE) for s in torch.var_mean(y64, dim=DIMS, correction=0))
    else:
        var, mean = (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE)
    s = _gate_scale(n, k, transposed=k == 40)
    # dpooled/HW, constant over a sample's pixels; 0 for a dropped sample (its dgate is 0)
    t = (torch.randn(n, k) * 0.1).to(DEVICE) * (s != 0)
    g_branch, dres = (torch.empty_like(dz).fill_(float("nan")) for _ in range(2))
    sums = bn.reductions(dz, y, z, mean, var, batch_stats=batch_stats, eps=EPS, relu=True,
                         rows_per_prog=rows_per_prog, dres=dres, branch_scale=s,
                         g_branch=g_branch, branch_add=t)
    g = dz.float() * (z > 0)
    torch.testing.assert_close(dres, g.to(dtype), rtol=0, atol=0)
    gb = g * s[:, :, None, None] + t[:, :, None, None]
    torch.testing.assert_close(g_branch.float(), gb.to(dtype).float(),
                               rtol=_rounding_slack(dtype), atol=1e-6)
    _check_sums_of_stored_g(sums, g_branch, y, mean, var, batch_stats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, h, w", [(3, 7, 5, 7), (2, 130, 9, 8), (1, 16, 1, 1)])
def test_sample_sums(dtype: torch.dtype, n: int, k: int, h: int, w: int) -> None:
    """Per-(sample, channel) Σ_hw (y − mean) and, with the output's gradient, Σ_hw g·(y − mean)
    and Σ_hw g (g = dz·[z > 0]), against float64 sums of the stored values."""
    y = _nhwc(n, k, h, w, offset=3.0).to(DEVICE, dtype)
    mean = y.float().mean(DIMS).to(DEVICE)
    z = torch.randn(y.shape).relu().to(DEVICE, dtype).contiguous(memory_format=CL)
    dz = torch.randn(y.shape).to(DEVICE, dtype).contiguous(memory_format=CL)
    sum_d, none = bn.sample_sums(y, mean)
    sum_gd, sum_g = bn.sample_sums(y, mean, dz, z)
    assert none is None and sum_d.shape == sum_gd.shape == sum_g.shape == (n, k)
    c64 = lambda t: t.double().cpu()
    d64 = c64(y) - _v(c64(mean))
    g64 = c64(dz) * (c64(z) > 0)
    d32 = y.float() - _v(mean)
    g32 = dz.float() * (z > 0)
    for name, out, ref, base, terms in (
            ("Σ(y − mean)", sum_d, d64.sum((2, 3)), d32.sum((2, 3)), d64.abs().sum((2, 3))),
            ("Σg·(y − mean)", sum_gd, (g64 * d64).sum((2, 3)), (g32 * d32).sum((2, 3)),
             (g64 * d64).abs().sum((2, 3))),
            ("Σg", sum_g, g64.sum((2, 3)), g32.sum((2, 3)), g64.abs().sum((2, 3)))):
        _assert_sum_close(name, out, ref, base, terms)


# A gate on a conv's input (RegNetY's SE between conv b and conv c): the conv reads a·gate[n, k],
# a = relu(y·scale + shift) never stored. The gate's input sums of a, its gradient sums of dz·a,
# and the BN of y sees (dz·gate + dpooled/HW)·[y·scale + shift > 0].


def _signed_map(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN's (scale, shift), fp32: some scales negative (γ < 0), shifts of both signs."""
    sign = torch.where(torch.rand(k) < 0.3, -1.0, 1.0)
    return ((torch.rand(k) + 0.5) * sign).to(DEVICE), (torch.randn(k) * 0.5).to(DEVICE)


def _assert_mask_matters(pre: torch.Tensor) -> None:
    """The inputs exercise the ReLU: a good share of the pre-activations on either side of 0."""
    positive = (pre > 0).double().mean().item()
    assert 0.2 < positive < 0.8, positive


def _check_sums_of_stored_g(sums, g_branch, y, mean, var, batch_stats: bool) -> None:
    """The reductions' (Σg, Σg·ŷ, δ) are the sums of the g they stored (``g_branch``, what
    dgrad reads), against float64."""
    c64 = lambda v: v.double().cpu()
    gb64 = c64(g_branch)
    ref = _sums(gb64, c64(y), c64(mean), c64(var), batch_stats)
    base = _sums(g_branch.float(), y.float(), mean, var, batch_stats)
    d = (c64(y) - _v(c64(mean))).abs()
    terms = (gb64.abs().sum(DIMS), (gb64.abs() * d).sum(DIMS) * torch.rsqrt(c64(var) + EPS),
             d.mean(DIMS))
    for name, a, r, b, tm in zip(("Σg", "Σg·ŷ", "δ"), sums, ref, base, terms):
        assert (a is None) == (r is None), name
        if r is not None:
            _assert_sum_close(name, a, r, b, tm)


def _rounding_slack(dtype: torch.dtype, interpreted: float = 2e-6) -> float:
    """Relative tolerance of a kernel's ``x·s + t`` rounded once to ``dtype`` against PyTorch
    computing it in fp32: compiled, Triton contracts it into an FMA (``enable_fp_fusion``, its
    default), one fp32 rounding fewer than eager's, which near a ``dtype`` rounding boundary
    moves the stored value by one ulp of ``dtype``; the interpreter does not contract
    (``interpreted``: fp32 summation-order slack only)."""
    return max(torch.finfo(dtype).eps, interpreted) if DEVICE == "cuda" else interpreted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, k, h, w", [(3, 7, 5, 7), (2, 130, 3, 4)])
def test_activation_sums(dtype: torch.dtype, n: int, k: int, h: int, w: int) -> None:
    """Per-(sample, channel) Σ_hw a and Σ_hw dz·a of a = relu(y·scale + shift) (never stored),
    against float64; plain PyTorch stores a in the dtype (eager BN + ReLU) and sums in fp32."""
    y = _nhwc(n, k, h, w, offset=0.5).to(DEVICE, dtype)
    scale, shift = _signed_map(k)
    dz = torch.randn(y.shape).to(DEVICE, dtype).contiguous(memory_format=CL)
    sum_a = bn.activation_sums(y, scale, shift)
    sum_ga = bn.activation_sums(y, scale, shift, dz)
    assert sum_a.shape == sum_ga.shape == (n, k) and sum_a.dtype == sum_ga.dtype == torch.float32
    c64 = lambda t: t.double().cpu()
    pre64 = c64(y) * _v(c64(scale)) + _v(c64(shift))
    _assert_mask_matters(pre64)
    a64 = pre64.relu()
    a32 = (y.float() * _v(scale) + _v(shift)).relu().to(dtype).float()
    ga64 = c64(dz) * a64
    for name, out, ref, base, terms in (
            ("Σa", sum_a, a64.sum((2, 3)), a32.sum((2, 3)), a64.sum((2, 3))),
            ("Σdz·a", sum_ga, ga64.sum((2, 3)), (dz.float() * a32).sum((2, 3)),
             ga64.abs().sum((2, 3)))):
        _assert_sum_close(name, out, ref, base, terms)
        # of a as the conv reads it, rounded to the dtype (eager pools the stored a): only the
        # fp32 summation order differs, far below a bf16 rounding of the terms
        err = (out.double().cpu() - base.double().cpu()).abs()
        slack = 4 * torch.finfo(torch.float32).eps + _rounding_slack(dtype, 0.0)
        assert (err <= slack * terms).all(), (name, err.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch_stats, k, rows_per_prog", [(True, 7, None), (True, 40, 16),
                                                           (False, 130, 32)])
def test_reductions_with_act_mask(dtype: torch.dtype, batch_stats: bool, k: int,
                                  rows_per_prog: int | None, n: int = 3, h: int = 9,
                                  w: int = 7) -> None:
    """The BN before a gated conv input sees g = (dz·s[n, k] + t[n, k])·[y·scale + shift > 0]
    (dz: the conv's input gradient, s the gate, t = dpooled/HW): stored in the dtype (g_branch),
    against float64, masked exactly, and its sums taken of that stored g; programs whose rows
    straddle samples."""
    act = _act_input((n, k, h, w), dtype, batch_stats)
    y, mean, var = act.y, act.mean, act.var
    dz = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype).contiguous(memory_format=CL)
    s = _gate_scale(n, k, transposed=k == 40)
    t = (torch.randn(n, k) * 0.5).to(DEVICE) * (s != 0)  # a dropped sample's dgate is 0
    g_branch = torch.empty_like(dz).fill_(float("nan"))
    sums = bn.reductions(dz, y, None, mean, var, batch_stats=batch_stats, eps=EPS, relu=False,
                         rows_per_prog=rows_per_prog, branch_scale=s, g_branch=g_branch,
                         branch_add=t, act_mask=(act.scale, act.shift))
    c64 = lambda v: v.double().cpu()
    pre64 = c64(y) * _v(c64(act.scale)) + _v(c64(act.shift))
    _assert_mask_matters(pre64)
    g64 = (c64(dz) * c64(s)[:, :, None, None] + c64(t)[:, :, None, None]) * (pre64 > 0)
    mask = _act_mask(act)
    base_g = ((dz.float() * s[:, :, None, None] + t[:, :, None, None]) * mask).to(dtype)
    assert_close_ratio("g", g_branch, g64, base_g)
    torch.testing.assert_close(g_branch.float(), base_g.float(), rtol=_rounding_slack(dtype),
                               atol=1e-6)
    assert (g_branch[~mask] == 0).all(), "g where the activation's ReLU is off"
    _check_sums_of_stored_g(sums, g_branch, y, mean, var, batch_stats)


def test_gate_on_conv_input_rejects_bad_arguments() -> None:
    """activation_sums and reductions(act_mask=) name what is wrong."""
    n, k = 2, 8
    y = _nhwc(n, k, 3, 3).to(DEVICE, torch.float32)
    scale, shift = _signed_map(k)
    with pytest.raises(AssertionError, match=r"scale must be a \(8,\) fp32"):
        bn.activation_sums(y, scale[:4], shift)
    with pytest.raises(AssertionError, match=r"shift must be a \(8,\) fp32"):
        bn.activation_sums(y, scale, shift.half())
    with pytest.raises(AssertionError, match="dz must be like y"):
        bn.activation_sums(y, scale, shift, y.bfloat16())
    with pytest.raises(AssertionError, match="channels_last"):
        bn.activation_sums(y.contiguous(), scale, shift)
    dz = torch.randn_like(y)
    mean, var = torch.zeros(k, device=DEVICE), torch.ones(k, device=DEVICE)
    gate = torch.rand(n, k, device=DEVICE)
    kw = dict(batch_stats=True, eps=EPS, act_mask=(scale, shift))
    gated = dict(branch_scale=gate, g_branch=torch.empty_like(dz))
    with pytest.raises(AssertionError, match="pass branch_scale"):
        bn.reductions(dz, y, None, mean, var, relu=False, **kw)
    with pytest.raises(AssertionError, match="relu False"):
        bn.reductions(dz, y, dz.relu(), mean, var, relu=True, **kw, **gated)
    with pytest.raises(AssertionError, match="no second BN"):
        bn.reductions(dz, y, None, mean, var, relu=False, second=(y, mean, var), **kw,
                      branch_scale=gate[:, 0].contiguous(), g_branch=torch.empty_like(dz))
    with pytest.raises(AssertionError, match=r"act_mask shift must be \(8,\) fp32"):
        bn.reductions(dz, y, None, mean, var, relu=False, batch_stats=True, eps=EPS,
                      act_mask=(scale, shift[:7]), **gated)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k, h, transposed", [(256, 56, False), (1024, 14, True)])
def test_gate_kernels_cuda(dtype: torch.dtype, k: int, h: int, transposed: bool) -> None:
    """The gate's kernels compiled, at ImageNet sizes (n=4: tiles of rows cross images): the
    per-sample sums, the (N, K) branch scale in the join pass, and in the last BN's
    reductions with the pooled gradient added (one- and two-level); for a gate on a conv's
    input, the activation's sums and the masked reductions."""
    test_sample_sums(dtype, 4, k, h, h)
    test_apply_with_gate_scale(dtype, True, k, transposed, n=4, h=h, w=h)
    for rows_per_prog in (None, 64):
        test_reductions_with_gate_scale_and_add(dtype, True, k, rows_per_prog, n=4, h=h, w=h)
    test_reductions_with_gate_scale_and_add(dtype, False, k, None, n=4, h=h, w=h)
    # a gate on a conv's input: its sums of the activation, the masked g of the BN before it
    test_activation_sums(dtype, 4, k, h, h)
    test_reductions_with_act_mask(dtype, True, k, None, n=4, h=h, w=h)
    test_reductions_with_act_mask(dtype, False, k, 64, n=4, h=h, w=h)


def test_a_scale_constant_over_channels_is_loaded_per_row() -> None:
    """A drop path's (N,) scale, or an (N, K) one expanded over channels (k-stride 0), compiles
    to one load per row (PER_CHANNEL_SCALE off), a gate's to per element; the results agree
    exactly with the same values given per element."""
    n, k = 3, 40
    y = _nhwc(n, k, 5, 7, offset=0.5).to(DEVICE, torch.float32)
    res = _nhwc(n, k, 5, 7).to(DEVICE, torch.float32)
    scale, shift = (torch.rand(k) + 0.5).to(DEVICE), torch.randn(k).to(DEVICE)
    keep = _keep(n)
    per_row = [keep, keep[:, None].expand(n, k)]
    per_element = _gate_scale(n, k, transposed=False)
    flags = [bn._branch_args(s, y, scale)["PER_CHANNEL_SCALE"] for s in (*per_row, per_element)]
    assert flags == [False, False, True]
    want = bn.apply(y, scale, shift, res, True, branch_scale=keep[:, None].repeat(1, k))
    for s in per_row:
        torch.testing.assert_close(bn.apply(y, scale, shift, res, True, branch_scale=s), want,
                                   rtol=0, atol=0)
