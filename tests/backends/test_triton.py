"""The Triton backend: its BN kernels one by one, then the whole fused op against float64.

On a machine without a GPU everything runs under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); tests marked ``gpu`` run the compiled kernels on CUDA.
Every comparison follows tests/numerics.py: error vs float64 at most 2x plain PyTorch's error in
the same dtype (plus a few ulps), NaN never passes; kernel outputs are NaN-poisoned before use.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

import fastres
from fastres.backends import BackendUnavailableError, CallInfo, ConvParams, select
from fastres.backends.reference import bn_relu_backward
from fastres.backends.triton import bn, conv
from tests.numerics import assert_close_ratio, merge_partials
from tests.ops.cases import CASES, MODES, SILU_CASES, Case, run_case
from tests.ops.nonfinite import check_nonfinite

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _nhwc(n: int, k: int, h: int, w: int, *, offset: float = 0.0, scale: float = 1.0):
    """float64 NHWC activation with per-channel offsets and spreads (non-trivial statistics)."""
    mu = torch.randn(k, dtype=torch.float64) + offset
    sd = (torch.rand(k, dtype=torch.float64) + 0.25) * scale
    t = torch.randn(n, k, h, w, dtype=torch.float64) * sd.view(1, -1, 1, 1) + mu.view(1, -1, 1, 1)
    return t.contiguous(memory_format=CL)


def _tile_partials(y: torch.Tensor, tile: int):
    """Per-tile (count, mean, M2) partials of an NHWC tensor, as the conv epilogue writes them:
    computed exactly (float64) and rounded once to fp32."""
    k = y.shape[1]
    rows = y.permute(0, 2, 3, 1).reshape(-1, k)
    counts, means, m2s = [], [], []
    for r0 in range(0, rows.shape[0], tile):
        block = rows[r0 : r0 + tile]
        mu = block.mean(0)
        counts.append(block.shape[0])
        means.append(mu)
        m2s.append(((block - mu) ** 2).sum(0))
    f32 = torch.float32
    return (
        torch.tensor(counts, dtype=f32),
        torch.stack(means).to(f32),
        torch.stack(m2s).to(f32),
    )


# ---------------------------------------------------------------------------------------------
# Kernels, directly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, tile, group, offset",
    [
        (7, 16, None, 0.0),  # single level, odd K, last tile partial
        (40, 8, None, 0.0),  # two channel blocks, > BLOCK_T tiles
        (40, 8, 5, 0.0),  # forced two-level merge, last group partial
        (9, 16, 3, 1000.0),  # mean ≫ std, two levels
        (9, 4, None, 1000.0),  # mean ≫ std, many tiles
    ],
)
def test_finalize_vs_float64(k: int, tile: int, group: int | None, offset: float) -> None:
    """The merge itself: float64 truth and the plain-PyTorch fp32 baseline both start from the
    same fp32 partials (the information the conv epilogue hands over)."""
    y64 = _nhwc(3, k, 10, 9, offset=offset)
    count, pmean, pm2 = _tile_partials(y64, tile)
    assert pmean.shape[0] > 1
    gamma = torch.rand(k) + 0.5
    beta = torch.randn(k)
    eps = 1e-5
    dev = DEVICE
    mean, var, scale, shift = bn.finalize(
        count.to(dev), pmean.to(dev), pm2.to(dev), gamma.to(dev), beta.to(dev), eps, group=group,
    )
    mean_ref, var_ref = merge_partials(count.double(), pmean.double(), pm2.double())
    scale_ref = gamma.double() / torch.sqrt(var_ref + eps)
    shift_ref = beta.double() - mean_ref * scale_ref
    mean_base, var_base = merge_partials(count.to(dev), pmean.to(dev), pm2.to(dev))
    scale_base = gamma.to(dev) * torch.rsqrt(var_base + eps)
    shift_base = beta.to(dev) - mean_base * scale_base
    assert mean.dtype == var.dtype == scale.dtype == shift.dtype == torch.float32
    assert_close_ratio("mean", mean, mean_ref, mean_base)
    assert_close_ratio("var", var, var_ref, var_base)
    assert_close_ratio("scale", scale, scale_ref, scale_base)
    assert_close_ratio("shift", shift, shift_ref, shift_base)
    # and the merged statistics are those of the data (up to the fp32 rounding of the partials)
    var_data, mean_data = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.cpu().double(), mean_data, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.cpu().double(), var_data, rtol=1e-4, atol=0)


def test_finalize_without_affine_and_gamma() -> None:
    y64 = _nhwc(2, 5, 7, 7)
    count, pmean, pm2 = _tile_partials(y64, 16)
    dev = DEVICE
    mean, var, scale, shift = bn.finalize(
        count.to(dev), pmean.to(dev), pm2.to(dev), None, None, 1e-5, affine=False
    )
    assert scale is None and shift is None
    mean_ref, var_ref = merge_partials(count.double(), pmean.double(), pm2.double())
    mean_base, var_base = merge_partials(count.to(dev), pmean.to(dev), pm2.to(dev))
    assert_close_ratio("mean", mean, mean_ref, mean_base)
    assert_close_ratio("var", var, var_ref, var_base)
    # affine with gamma = beta = None: scale = invstd, shift = -mean·invstd
    _, _, scale, shift = bn.finalize(
        count.to(dev), pmean.to(dev), pm2.to(dev), None, None, 1e-5
    )
    inv_ref = 1 / torch.sqrt(var_ref + 1e-5)
    inv_base = torch.rsqrt(var_base + 1e-5)
    assert_close_ratio("scale", scale, inv_ref, inv_base)
    assert_close_ratio("shift", shift, -mean_ref * inv_ref, -mean_base * inv_base)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float16])
def test_running_affine_vs_float64(affine: bool, stat_dtype: torch.dtype) -> None:
    k, eps = 37, 1e-3
    rm = (torch.randn(k, dtype=torch.float64) * 3).to(stat_dtype)
    rv = (torch.rand(k, dtype=torch.float64) * 2 + 0.1).to(stat_dtype)
    gamma = (torch.rand(k) + 0.5) if affine else None
    beta = torch.randn(k) if affine else None
    dev = DEVICE
    to = lambda t: None if t is None else t.to(dev)
    mean, var, scale, shift = bn.running_affine(to(rm), to(rv), to(gamma), to(beta), eps)
    g = 1.0 if gamma is None else gamma.double()
    b = 0.0 if beta is None else beta.double()
    scale_ref = g / torch.sqrt(rv.double() + eps)
    shift_ref = b - rm.double() * scale_ref
    scale_base = (1.0 if gamma is None else to(gamma)) * torch.rsqrt(to(rv).float() + eps)
    shift_base = (0.0 if beta is None else to(beta)) - to(rm).float() * scale_base
    assert mean.dtype == var.dtype == torch.float32
    assert torch.equal(mean.cpu(), rm.float()) and torch.equal(var.cpu(), rv.float())
    assert_close_ratio("scale", scale, scale_ref, scale_base)
    assert_close_ratio("shift", shift, shift_ref, shift_base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "residual, relu, k", [(True, True, 130), (False, True, 7), (True, False, 24)]
)
def test_apply_vs_float64(dtype: torch.dtype, residual: bool, relu: bool, k: int) -> None:
    dev = DEVICE
    y64 = _nhwc(2, k, 5, 7, offset=0.5)
    res64 = _nhwc(2, k, 5, 7) if residual else None
    scale = (torch.rand(k) + 0.5).to(dev)
    shift = torch.randn(k).to(dev)
    y = y64.to(dev, dtype)
    res = res64.to(dev, dtype) if residual else None
    z = bn.apply(y, scale, shift, res, relu)
    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)

    def compute(y, s, b, r):
        out = y * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        if r is not None:
            out = out + r
        return out.relu() if relu else out

    ref = compute(y.double().cpu(), scale.double().cpu(), shift.double().cpu(),
                  None if res is None else res.double().cpu())
    base = compute(y, scale, shift, res).to(dtype)  # PyTorch promotes to fp32, rounds once
    assert_close_ratio("z", z, ref, base)


def test_apply_propagates_nan_through_relu() -> None:
    y = _nhwc(1, 4, 3, 3).float().to(DEVICE)
    y[0, 1, 1, 1] = float("nan")
    z = bn.apply(y, torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE), None, True)
    assert torch.isnan(z[0, 1, 1, 1]) and torch.isnan(z).sum() == 1


def _bn_grads(y, g, gamma, beta, eps):
    """Plain-PyTorch autograd of training-mode F.batch_norm: (dy, dgamma, dbeta) for grad g."""
    y = y.detach().requires_grad_(True)
    out = F.batch_norm(y, None, None, gamma, beta, True, 0.0, eps)
    return torch.autograd.grad(out, (y, gamma, beta), g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch_stats, relu, affine, k, rows_per_prog, offset",
    [
        (True, True, True, 7, None, 0.0),
        (True, False, False, 40, 16, 0.0),  # many partial rows: > BLOCK_T in the second pass
        (False, True, True, 130, 32, 0.0),  # running statistics, two channel blocks
        (True, True, True, 9, 24, 1000.0),  # mean ≫ std
        (False, False, True, 9, None, 1000.0),  # running statistics, mean ≫ std
    ],
)
def test_backward_vs_float64(
    dtype: torch.dtype, batch_stats: bool, relu: bool, affine: bool, k: int,
    rows_per_prog: int | None, offset: float,
) -> None:
    """dReLU + dBN on a stored y. With batch statistics, truth and baseline are autograd through
    F.batch_norm of that y (float64 / the test dtype): the kernels get the batch statistics only
    as fp32, as from the forward pass. With running statistics, the formula of the reference
    backend (fp64 / fp32) on the same fp32 statistics."""
    dev, eps = DEVICE, 1e-5
    y = _nhwc(3, k, 9, 7, offset=offset).to(dev, dtype)
    # a forward output with a real ReLU mask (about half the elements clipped)
    z = torch.randn(y.shape, dtype=torch.float64).to(dev, dtype).contiguous(memory_format=CL)
    if relu:
        z = z.relu()
    dz = torch.randn(y.shape, dtype=torch.float64).to(dev, dtype).contiguous(memory_format=CL)
    g = dz * (z > 0) if relu else dz  # exact in any dtype
    gamma = (torch.rand(k) + 0.5).to(dev) if affine else None
    if batch_stats:
        var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    else:
        mean64 = torch.randn(k, dtype=torch.float64) * 0.3 + offset
        var64 = torch.rand(k, dtype=torch.float64) + 0.5
    mean, var = mean64.float().to(dev), var64.float().to(dev)

    dy, dgamma, dbeta, dres = bn.backward(
        dz, y, z, mean, var, gamma, batch_stats=batch_stats, eps=eps, relu=relu,
        need_dy=True, need_stats_grad=True, need_dres=True, rows_per_prog=rows_per_prog,
    )
    assert dy.dtype == dres.dtype == dtype and dgamma.dtype == dbeta.dtype == torch.float32
    assert dy.is_contiguous(memory_format=CL) and dres.is_contiguous(memory_format=CL)

    gam = gamma if gamma is not None else torch.ones(k, device=dev)
    if batch_stats:
        p64 = [gam.double().cpu().requires_grad_(True), torch.zeros(k, dtype=torch.float64,
                                                                    requires_grad=True)]
        dy64, dgamma64, dbeta64 = _bn_grads(y.double().cpu(), g.double().cpu(), *p64, eps)
        pb = [gam.clone().requires_grad_(True), torch.zeros(k, device=dev, requires_grad=True)]
        dy_b, dgamma_b, dbeta_b = _bn_grads(y, g, *pb, eps)
    else:
        kw = dict(batch_stats=False, eps=eps, relu=relu, need_gamma=True)
        _, dy64, dgamma64, dbeta64 = bn_relu_backward(
            dz.double().cpu(), y.double().cpu(), z.double().cpu(), mean.double().cpu(),
            var.double().cpu(), gam.double().cpu(), **kw,
        )
        _, dy_b, dgamma_b, dbeta_b = bn_relu_backward(dz, y, z, mean, var, gam, **kw)
    assert_close_ratio("dy", dy, dy64, dy_b.to(dtype))
    assert_close_ratio("dresidual", dres, g.double().cpu(), g)
    assert_close_ratio("dgamma", dgamma, dgamma64, dgamma_b)
    assert_close_ratio("dbeta", dbeta, dbeta64, dbeta_b)


def test_backward_centres_on_the_stored_y() -> None:
    """Statistics taken before y's fp16 rounding (mean 1000, std 1: rounding 0.25) must not
    leave Σdy — the conv bias gradient, 0 in theory — at (Σ rounding)·Σgŷ/M."""
    dev, eps, k = DEVICE, 1e-5, 6
    y64 = _nhwc(4, k, 8, 8, offset=1000.0)
    y = y64.to(dev, torch.float16)
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)  # of the unrounded y
    dz = torch.randn(y.shape, dtype=torch.float64).to(dev, torch.float16)
    dz = dz.contiguous(memory_format=CL)
    gamma = (torch.rand(k) + 0.5).to(dev)
    dy, _, _, _ = bn.backward(
        dz, y, dz, mean64.float().to(dev), var64.float().to(dev), gamma,
        batch_stats=True, eps=eps, relu=False, need_dy=True, need_stats_grad=False,
    )
    p64 = [gamma.double().cpu().requires_grad_(True),
           torch.zeros(k, dtype=torch.float64, requires_grad=True)]
    dy64, _, _ = _bn_grads(y.double().cpu(), dz.double().cpu(), *p64, eps)
    pb = [gamma.clone().requires_grad_(True), torch.zeros(k, device=dev, requires_grad=True)]
    dy_b, _, _ = _bn_grads(y, dz, *pb, eps)
    dims = (0, 2, 3)
    # (dgamma is not compared: with these statistics its variance differs from the stored y's
    # by the rounding noise, on purpose; only the centring is under test)
    assert_close_ratio(
        "Σdy", dy.double().sum(dims), dy64.sum(dims), dy_b.double().sum(dims)
    )


def test_backward_only_what_is_asked() -> None:
    dev = DEVICE
    y = _nhwc(2, 6, 4, 4).float().to(dev)
    z, dz = torch.randn_like(y).relu(), torch.randn_like(y)
    mean, var = torch.zeros(6, device=dev), torch.ones(6, device=dev)
    dy, dgamma, dbeta, dres = bn.backward(
        dz, y, z, mean, var, None, batch_stats=False, eps=1e-5, relu=True,
        need_dy=False, need_stats_grad=False, need_dres=True,
    )
    assert dy is None and dgamma is None and dbeta is None
    torch.testing.assert_close(dres, dz * (z > 0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The backend through the public op
# ---------------------------------------------------------------------------------------------


def test_float64_is_refused_naming_the_dtype() -> None:
    call = CallInfo(
        device=torch.device(DEVICE), dtype=torch.float64, x_shape=(2, 16, 9, 9),
        weight_shape=(16, 16, 3, 3), conv=ConvParams((1, 1), (1, 1), (1, 1), 1),
        batch_stats=True, has_residual=False, act="relu",
    )
    with pytest.raises(BackendUnavailableError, match="float64"):
        select(call, "triton")
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, device=DEVICE)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="float64"):
        fastres.ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1,
                                 backend="triton")


HALF = [torch.float16, torch.bfloat16]


def run_triton_case(
    case: Case, dtype: torch.dtype, training: bool, grad: bool, device: str = "cpu"
) -> None:
    """run_case on the triton backend; inference with running statistics must be the one conv
    kernel with BN, residual and ReLU in its epilogue (no separate apply pass)."""
    with pytest.MonkeyPatch.context() as mp:
        if not (training or grad) and case.running:

            def no_apply(*args, **kwargs):
                raise AssertionError("inference ran a separate BN apply pass")

            mp.setattr(bn, "apply", no_apply)
        run_case(case, dtype, training, "triton", device=device, grad=grad)


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grid_interpreter_fp32(case: Case, training: bool, grad: bool) -> None:
    run_triton_case(case, torch.float32, training, grad)


# fp16/bf16 by default on a representative subset (the interpreter is slow); all cases: slow
_HALF_SUBSET = {
    Case().id,
    Case(r=1, padding=0, stride=2, c=32, k=64).id,
    Case(n=1, h=5, w=7, residual=True).id,
    Case(groups=8, c=32, k=32, stride=2).id,
    Case(layout="sliced", c=8, k=24, h=7, w=6).id,
    Case(mean_offset=True, padding=0, residual=True).id,
}


def _half_params():
    for case in CASES:
        marks = () if case.id in _HALF_SUBSET else (pytest.mark.slow,)
        yield pytest.param(case, marks=marks, id=case.id)


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(_half_params()))
def test_grid_interpreter_half(case: Case, dtype: torch.dtype, training: bool, grad: bool) -> None:
    run_triton_case(case, dtype, training, grad)


def test_running_stats_after_three_steps() -> None:
    run_case(Case(residual=True, bias=True), torch.float32, True, "triton", steps=3)


# SiLU: every case in fp32, two in fp16/bf16 by default (the interpreter is slow); all: slow
_SILU_HALF_SUBSET = {SILU_CASES[1].id, SILU_CASES[3].id}


def _silu_params(dtypes):
    for dtype in dtypes:
        for case in SILU_CASES:
            fast = dtype == torch.float32 or case.id in _SILU_HALF_SUBSET
            yield pytest.param(case, dtype, marks=() if fast else (pytest.mark.slow,),
                               id=f"{case.id}-{dtype}")


def test_silu_reduction_never_offers_a_tile_that_spills() -> None:
    """SiLU's backward reduction (y, residual, dz and the sigmoid per element) spills at 32
    elements per thread (compile check): those tiles are not offered, and the specs say so."""
    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in bn._REDUCE_BLOCKS]
    for block_k, silu, dropped in ((128, True, [(32, 4), (64, 8)]), (64, True, []),
                                   (128, False, [])):
        kept = bn._prune_bwd_reduce(configs, {}, BLOCK_K=block_k, SECOND=False, SILU=silu)
        assert [(c.kwargs["BLOCK_M"], c.num_warps) for c in configs if c not in kept] == dropped
    specs = [s for s in bn.compile_specs() if s.name.startswith("bn_bwd_reduce[")
             and "SILU=1" in s.name]
    assert {s.name for s in specs if s.pruned} == {
        s.name for s in specs if "BLOCK_K=128" in s.name
        and ("BLOCK_M=32" in s.name or "BLOCK_M=64" in s.name)}


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("case, dtype", list(_silu_params(DTYPES)))
def test_grid_interpreter_silu(case: Case, dtype: torch.dtype, training: bool,
                               grad: bool) -> None:
    run_triton_case(case, dtype, training, grad)


@pytest.fixture
def larger_block_m():
    """Under the interpreter every kernel has one 16-row configuration, the size the partial
    statistics buffers are allocated for; on a GPU the autotuner may pick larger tiles, and the
    partials must then be cut to the tiles that ran. Force a 32-row tile to see that here."""
    assert conv._MIN_BLOCK_M < 32
    gemm, direct = (triton.Config({**t.configs[0].kwargs, "BLOCK_M": 32}, num_warps=4)
                    for t in (conv._gemm, conv._direct))
    with conv._gemm.forced(gemm), conv._direct.forced(direct):
        yield


@pytest.mark.parametrize("case", [Case(), Case(groups=8, c=32, k=32, stride=2)], ids=str)
def test_partials_cut_to_the_configuration_that_ran(larger_block_m, case: Case) -> None:
    x = torch.randn(case.n, case.c, case.h, case.w).contiguous(memory_format=CL)
    w = torch.randn(case.k, case.c // case.groups, *case.kernel)
    _, part = conv.conv2d_fused(x, w, None, case.conv, stats=True)
    m = case.n * case.out_hw[0] * case.out_hw[1]
    assert part.count.shape[0] == -(-m // 32) and part.count.sum().item() == m
    assert (part.count[:-1] == 32).all()
    run_case(case, torch.float32, True, "triton")


# the GEMM kernel and the direct kernel (few channels per group) share the epilogue
_NONFINITE_CASES = [Case(residual=True), Case(residual=True, groups=8, c=32, k=32),
                    Case(residual=True, act="silu")]


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("case", _NONFINITE_CASES, ids=lambda c: c.id)
def test_nan_and_inf_as_eager(case: Case, training: bool, grad: bool) -> None:
    """Under the interpreter; tl.maximum would pass here (numpy's maximum propagates NaN), so
    tests/backends/test_relu_source.py and the gpu variant below guard the compiled form."""
    check_nonfinite(case, torch.float32, training, grad, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", _NONFINITE_CASES, ids=lambda c: c.id)
def test_nan_and_inf_as_eager_cuda(
    case: Case, dtype: torch.dtype, training: bool, grad: bool
) -> None:
    check_nonfinite(case, dtype, training, grad, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grid_cuda(case: Case, dtype: torch.dtype, training: bool, grad: bool) -> None:
    run_triton_case(case, dtype, training, grad, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SILU_CASES, ids=lambda c: c.id)
def test_grid_cuda_silu(case: Case, dtype: torch.dtype, training: bool, grad: bool) -> None:
    run_triton_case(case, dtype, training, grad, device="cuda")


@pytest.mark.gpu
def test_running_stats_after_three_steps_cuda() -> None:
    run_case(Case(residual=True, bias=True), torch.float32, True, "triton", device="cuda", steps=3)
