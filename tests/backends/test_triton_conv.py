"""The Triton convolution kernels (``fastres.backends.triton.conv``) against float64.

Every output is compared with the same computation in float64 using the error-ratio rule of
``tests.numerics`` (the base is plain PyTorch in the test dtype: conv, then the eval-BN style
epilogue in fp32 rounded to the dtype, residual add and ReLU in the dtype). BN partials are
merged here in float64 (Chan's parallel formula) and compared with the float64 batch statistics.
Outputs are NaN-poisoned by ``tests/conftest.py``. On CPU the kernels run in the Triton
interpreter with one small tile configuration; the ``gpu`` tests run the autotuned kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastres.backends.triton import conv as tconv
from tests.numerics import assert_close_ratio, merge_partials, to_tf32
from tests.ops.cases import MEAN_OFFSET, Case

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


SHAPES = [
    Case(),
    Case(r=1, padding=0),  # 1x1
    Case(c=32, k=48, r=1, padding=0, stride=2, h=10, w=11),  # projection shortcut, K % 16 != 0
    Case(c=3, k=16, r=7, stride=2, padding=3, h=17, w=15),  # stem: flattened-reduction GEMM
    Case(c=40, k=24, h=7, w=6),  # channels not a multiple of the reduction slab
    Case(n=1, h=5, w=7),
    Case(dilation=2, padding=2, h=11, w=10),
    Case(stride=2, padding=0, h=10, w=10),  # no padding, stride 2
    Case(c=32, k=32, groups=2),  # 16 channels per group: tensor-core kernel, group axis
    Case(c=32, k=48, groups=2, stride=2, h=10, w=9),  # 16 in / 24 out per group
    Case(c=32, k=32, groups=8, stride=2),  # 4 per group (ResNeXt 32x4d): direct kernel
    Case(c=24, k=48, groups=3, h=7, w=8),  # 8 in / 16 out per group: direct kernel
    Case(c=16, k=16, groups=16),  # depthwise
    Case(c=8, k=16, groups=8, r=5, padding=2, dilation=2, h=12, w=11),  # depthwise multiplier 2
    Case(n=3, c=5, k=7, h=6, w=5, groups=1),  # odd everything, few channels: flattened GEMM
    Case(n=3, c=6, k=9, h=6, w=5, groups=3),  # odd everything, 2 in / 3 out per group
]

# Epilogue variants: the two real uses (training raw output + stats, fused eval) and pieces.
EPILOGUES = {
    "raw": dict(bias=False, affine=False, residual=False, relu=False),
    "raw_bias": dict(bias=True, affine=False, residual=False, relu=False),
    "eval": dict(bias=False, affine=True, residual=False, relu=True),
    "eval_res": dict(bias=True, affine=True, residual=True, relu=True),
    "res_norelu": dict(bias=False, affine=True, residual=True, relu=False),
    "relu_only": dict(bias=True, affine=False, residual=False, relu=True),
}


def _inputs(shape: Case, epi: dict, mean_offset: float = 0.0, x_offset: float = 0.0) -> dict:
    """Fresh random float64 inputs (never zeros); outputs O(1) unless ``mean_offset`` (added to
    the bias) or ``x_offset`` (added to the input)."""
    f64 = torch.float64
    cg = shape.c // shape.groups
    oh, ow = shape.conv.out_hw(shape.h, shape.w, shape.r, shape.r)
    return {
        "x": torch.randn(shape.n, shape.c, shape.h, shape.w, dtype=f64) + 0.5 + x_offset,
        "weight": torch.randn(shape.k, cg, shape.r, shape.r, dtype=f64) / (cg * shape.r**2) ** 0.5,
        "bias": torch.randn(shape.k, dtype=f64) + mean_offset if epi["bias"] else None,
        "scale": torch.rand(shape.k, dtype=f64) + 0.5 if epi["affine"] else None,
        "shift": torch.randn(shape.k, dtype=f64) if epi["affine"] else None,
        "residual": torch.randn(shape.n, shape.k, oh, ow, dtype=f64) if epi["residual"] else None,
    }


def _cast(t: torch.Tensor | None, dtype: torch.dtype, device: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.to(device=device, dtype=dtype)
    return t.contiguous(memory_format=CL) if t.dim() == 4 else t


def _eager(inp: dict, shape: Case, dtype: torch.dtype, device: str, relu: bool):
    """Plain PyTorch in ``dtype``: returns (raw conv output, epilogue output)."""
    x, w, b = (_cast(inp[n], dtype, device) for n in ("x", "weight", "bias"))
    s, p, d = shape.stride, shape.padding, shape.dilation
    y = F.conv2d(x, w, b, s, p, d, shape.groups)
    z = y
    if inp["scale"] is not None:  # eval BN: computed in fp32 (fp64 for the truth), rounded
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        sc = inp["scale"].to(device, acc).view(1, -1, 1, 1)
        sh = inp["shift"].to(device, acc).view(1, -1, 1, 1)
        z = (y.to(acc) * sc + sh).to(dtype)
    if inp["residual"] is not None:
        z = z + _cast(inp["residual"], dtype, device)
    if relu:
        z = F.relu(z)
    return y, z


def _fused(inp: dict, shape: Case, dtype: torch.dtype, device: str, relu: bool, stats: bool,
           **kwargs):
    f32 = torch.float32
    return tconv.conv2d_fused(
        _cast(inp["x"], dtype, device),
        _cast(inp["weight"], dtype, device),
        _cast(inp["bias"], dtype, device),
        shape.conv,
        scale=_cast(inp["scale"], f32, device),
        shift=_cast(inp["shift"], f32, device),
        residual=_cast(inp["residual"], dtype, device),
        relu=relu,
        stats=stats,
        **kwargs,
    )


def _check(shape: Case, dtype: torch.dtype, epi_name: str, device: str, mean_offset=0.0,
           x_offset=0.0):
    epi = EPILOGUES[epi_name]
    inp = _inputs(shape, epi, mean_offset, x_offset)
    stats = not epi["affine"] or epi["residual"]  # stats with and without the full epilogue
    y_ref, z_ref = _eager(inp, shape, torch.float64, "cpu", epi["relu"])
    y_base, z_base = _eager(inp, shape, dtype, device, epi["relu"])
    z, part = _fused(inp, shape, dtype, device, epi["relu"], stats)

    assert z.dtype == dtype and z.is_contiguous(memory_format=CL)
    assert_close_ratio(f"{shape.id} {dtype} {epi_name}: out", z, z_ref, z_base)
    if not stats:
        assert part is None
        return
    m = shape.n * y_ref.shape[2] * y_ref.shape[3]
    assert part.count.dtype == part.mean.dtype == part.m2.dtype == torch.float32
    assert part.mean.shape == part.m2.shape == (part.count.shape[0], shape.k)
    assert part.count.sum().item() == m, "tile counts do not add up to N*OH*OW"
    assert part.count.min().item() >= 1
    _check_batch_stats(f"{shape.id} {dtype}", part, y_ref, y_base)


def _check_batch_stats(name: str, part: tconv.Partials, y_ref: torch.Tensor, y_base: torch.Tensor):
    """Partials merged in float64 vs the float64 batch statistics of the conv output.

    The base is PyTorch's batch statistics of its own conv output in the test dtype (in fp32, as
    the reference backend computes them). The variance may in addition carry the one error the
    Partials format cannot avoid: each tile mean is stored in fp32, off by up to half an ulp of
    |mean|, and Chan's merge turns that into sum_i 2 n_i |mean_i - mean| * ulp/2 / N of variance
    error (it matters only when |mean| >> std; a naive E[y^2] - E[y]^2 in fp32 would be off by
    ~|mean|^2 * 1e-7, orders of magnitude more).
    """
    mean, var = merge_partials(*(t.double().cpu() for t in (part.count, part.mean, part.m2)))
    var_ref, mean_ref = torch.var_mean(y_ref, dim=(0, 2, 3), correction=0)
    var_base, mean_base = torch.var_mean(y_base.float(), dim=(0, 2, 3), correction=0)
    assert_close_ratio(f"{name}: batch mean", mean.float(), mean_ref, mean_base)

    k = y_ref.shape[1]
    rows = y_ref.cpu().permute(0, 2, 3, 1).reshape(-1, k)  # NHWC rows, as the kernel tiles them
    counts = [int(c) for c in part.count.tolist()]
    tile_means = torch.stack([t.mean(0) for t in rows.split(counts)])  # (T, K) float64
    cnt = torch.tensor(counts, dtype=torch.float64)[:, None]
    _, exp = torch.frexp(mean_ref.abs())
    ulp = torch.ldexp(torch.ones_like(mean_ref), exp - 24)  # fp32 ulp of |mean|
    repr_err = (cnt * (tile_means - mean_ref).abs()).sum(0) * ulp / cnt.sum()

    assert not torch.isnan(var).any(), f"{name}: batch var has NaN"
    err = (var - var_ref).abs()
    base_err = (var_base.double().cpu() - var_ref).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * var_ref.abs().max().item()
    allowed = 2 * base_err + repr_err + floor
    bad = err > allowed
    assert not bad.any(), (
        f"{name}: batch var error {err[bad].max().item():.3e} over the allowed "
        f"{allowed[bad].min().item():.3e} (PyTorch's error {base_err:.3e})"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_conv_matches_float64(shape: Case, dtype: torch.dtype):
    # Two epilogue variants per shape and dtype, rotating through all of them over the grid.
    names = list(EPILOGUES)
    i = SHAPES.index(shape) + DTYPES.index(dtype)
    for name in (names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]):
        _check(shape, dtype, name, "cpu")


@pytest.mark.parametrize("epi", list(EPILOGUES))
def test_every_epilogue_dense_and_direct(epi: str):
    for shape in (Case(c=32, k=24, groups=2, h=7, w=6), Case(c=16, k=24, groups=4, h=7, w=6)):
        _check(shape, torch.float16, epi, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [Case(padding=0), Case(c=32, k=32, groups=8, padding=0), Case(c=3, r=7, padding=0, h=11)],
    ids=lambda s: s.id,
)
def test_partials_when_mean_far_exceeds_std(shape: Case, dtype: torch.dtype):
    # |mean| ~ MEAN_OFFSET x std from an offset input (no padding, which would spread the mean),
    # as after a ReLU: the fp32 epilogue's statistics see it (a large bias would only shift
    # them afterwards); E[y^2] - E[y]^2 in fp32 would lose the variance.
    _check(shape, dtype, "raw_bias", "cpu", x_offset=MEAN_OFFSET[dtype])


@pytest.mark.parametrize(
    "shape",
    [  # one per kernel: GEMM, flattened-reduction GEMM, direct
        Case(h=7, w=5, k=20),
        Case(c=3, k=20, r=7, padding=3, h=7, w=5),
        Case(c=8, k=20, groups=4, h=7, w=5),
    ],
    ids=lambda s: s.id,
)
def test_no_writes_outside_output(shape: Case):
    # M = 70 and K = 20 are not multiples of any tile: the ragged tiles must stay inside ``out``.
    dtype = torch.float16
    inp = _inputs(shape, EPILOGUES["eval_res"])
    oh, ow = shape.conv.out_hw(shape.h, shape.w, shape.r, shape.r)
    size, pad = shape.n * oh * ow * shape.k, 64
    sentinel = 12345.0
    guard = torch.full((size + 2 * pad,), sentinel, dtype=dtype)
    guard[pad : pad + size] = float("nan")
    out = guard[pad : pad + size].view(shape.n, oh, ow, shape.k).permute(0, 3, 1, 2)
    z, part = _fused(inp, shape, dtype, "cpu", True, True, out=out)
    assert z.data_ptr() == out.data_ptr()
    assert not torch.isnan(z).any(), "some output element was not written"
    assert (guard[:pad] == sentinel).all() and (guard[pad + size :] == sentinel).all(), (
        "kernel wrote outside the output tensor"
    )
    assert not torch.isnan(part.mean).any() and not torch.isnan(part.m2).any()
    _, z_ref = _eager(inp, shape, torch.float64, "cpu", True)
    _, z_base = _eager(inp, shape, dtype, "cpu", True)
    assert_close_ratio("guarded out", z, z_ref, z_base)


def test_kernel_choice():
    assert tconv.kernel_for(16, 1) == "gemm"
    assert tconv.kernel_for(64, 32) == "gemm"
    assert tconv.kernel_for(3, 1) == "gemm_flat"
    assert tconv.kernel_for(4, 32) == "direct"
    assert tconv.kernel_for(1, 64) == "direct"


def test_autotune_pruning_keeps_fitting_tiles():
    gemm, direct = tconv.GPU_GEMM_CONFIGS, tconv.GPU_DIRECT_CONFIGS
    # ResNeXt stage 3: 16 channels per group, nothing wider than 32 output channels survives
    kept = tconv._prune_gemm(gemm, {"Kg": 16, "Cg": 16})
    assert kept and all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 32 for c in kept)
    # wide layers: all tiles (but the sm_90 TMA ones: no CUDA tensor, test_triton_tma.py)
    assert tconv._prune_gemm(gemm, {"Kg": 512, "Cg": 512}) == [
        c for c in gemm if not c.kwargs.get("TMA")]
    kept = tconv._prune_direct(direct, {"K": 16})
    assert kept and all(c.kwargs["BLOCK_N"] <= 16 for c in kept)


def test_rejects_bad_inputs():
    conv = Case().conv
    x = torch.randn(1, 16, 5, 5)
    w = torch.randn(16, 16, 3, 3)
    with pytest.raises(AssertionError, match="channels_last"):
        tconv.conv2d_fused(x, w, None, conv)  # NCHW contiguous, not channels_last
    xc = x.contiguous(memory_format=CL)
    with pytest.raises(AssertionError, match="weight is"):
        tconv.conv2d_fused(xc, w.half(), None, conv)
    with pytest.raises(AssertionError, match="scale and shift"):
        tconv.conv2d_fused(xc, w, None, conv, scale=torch.ones(16))
    with pytest.raises(AssertionError, match="scale must be torch.float32"):
        tconv.conv2d_fused(xc, w, None, conv, scale=torch.ones(16).half(), shift=torch.ones(16))
    res = torch.randn(1, 16, 4, 4).to(memory_format=CL)  # output is 5x5
    with pytest.raises(AssertionError, match="residual"):
        tconv.conv2d_fused(xc, w, None, conv, residual=res)
    with pytest.raises(AssertionError, match="mismatch"):
        tconv.conv2d_fused(xc, torch.randn(16, 8, 3, 3), None, conv)


def test_compile_specs_cover_every_kernel_config_dtype():
    specs = tconv.compile_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate spec names"
    # every configuration of every kernel (gemm, flattened gemm, direct) in each of its shape
    # classes, every dtype; the real epilogues and one unspecialised compile per kernel
    plain = [c for c in tconv.GPU_GEMM_CONFIGS if not c.kwargs.get("TMA")]
    for dtype in ("float32", "float16", "bfloat16"):
        for kname, cfgs, classes in (  # (the TMA tiles: test_triton_tma.py)
            ("conv_gemm", plain, ("3x3s2", "1x1")),
            ("conv_gemm_flat", plain, ("stem",)),
            ("conv_direct", tconv.GPU_DIRECT_CONFIGS, ("grouped",)),
        ):
            for cfg in cfgs:
                for cls in classes:
                    assert f"{kname}-{dtype}-all-{tconv._cfg_name(cfg)}-{cls}" in names
            for epi in ("train", "eval"):
                assert any(n.startswith(f"{kname}-{dtype}-{epi}-") for n in names)
            assert sum(n.startswith(f"{kname}-{dtype}-") and n.endswith("-unspecialised")
                       for n in names) == 1
    for s in specs:
        args = s.kernel.arg_names
        assert set(s.signature) | set(s.constexprs) == set(args), s.name
        assert not set(s.signature) & set(s.constexprs), s.name


# ---------------------------------------------------------------------------------------------
# GPU: the autotuned kernels (several configurations, partials sliced to the chosen BLOCK_M)
# ---------------------------------------------------------------------------------------------


GPU_SHAPES = [
    Case(n=4, c=64, k=64, h=15, w=15),
    Case(n=3, c=64, k=256, r=1, padding=0, h=14, w=13),
    Case(n=2, c=3, k=64, r=7, stride=2, padding=3, h=33, w=31),
    Case(n=4, c=128, k=128, groups=32, h=14, w=14),  # ResNeXt 32x4d
    Case(n=4, c=64, k=64, groups=64, stride=2, h=15, w=15),  # depthwise
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.id)
def test_conv_gpu(shape: Case, dtype: torch.dtype):
    _check_tuned(shape, dtype, "cuda")


def _check_tuned(shape: Case, dtype: torch.dtype, device: str,
                 epilogues: tuple[str, ...] = ("raw_bias", "eval_res")) -> None:
    for name in epilogues:
        epi = EPILOGUES[name]
        inp = _inputs(shape, epi, mean_offset=10.0)
        stats = name == "raw_bias"
        uses_tf32 = dtype == torch.float32 and tconv.kernel_for(
            shape.c // shape.groups, shape.groups
        ) != "direct"
        if uses_tf32:  # the fair fp32 baseline for a TF32 tensor-core kernel
            inp_base = dict(inp, x=to_tf32(inp["x"]), weight=to_tf32(inp["weight"]))
        else:
            inp_base = inp
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            y_base, z_base = _eager(inp_base, shape, dtype, device, epi["relu"])
        finally:
            torch.backends.cudnn.allow_tf32 = prev
        y_ref, z_ref = _eager(inp, shape, torch.float64, "cpu", epi["relu"])
        z, part = _fused(inp, shape, dtype, device, epi["relu"], stats)
        assert_close_ratio(f"{shape.id} {dtype} {name}: out", z, z_ref, z_base)
        if stats:
            m = shape.n * y_ref.shape[2] * y_ref.shape[3]
            assert part.count.sum().item() == m
            # every tile but the last is full, with a BLOCK_M of one of the configurations
            block_ms = {c.kwargs["BLOCK_M"] for c in (*tconv._GEMM_CONFIGS, *tconv._DIRECT_CONFIGS)}
            assert int(part.count[0]) in block_ms or part.count.numel() == 1
            assert (part.count[:-1] == part.count[0]).all()
            _check_batch_stats(f"gpu {shape.id} {dtype}", part, y_ref, y_base)


@triton.jit
def _tf32_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tconv._tf32_rounded(v), mask=mask)


def test_fp32_tensor_core_operands_round_to_tf32_as_the_tests_baseline():
    """The GEMM kernels round fp32 operands to TF32 before tl.dot on a GPU (the tensor cores
    would truncate); that rounding is the one the GPU tests' TF32 baseline assumes."""
    x = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)),
                   torch.tensor([1 + 2**-11, -(1 + 3 * 2**-11), 0.0, -0.0, 1e-40,
                                 float("inf"), -float("inf"), 3.4e38])])
    out = torch.full_like(x, float("nan"))
    _tf32_probe[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out.view(torch.int32), to_tf32(x).view(torch.int32))
    nan = torch.full((4,), float("nan"))
    _tf32_probe[(1,)](nan, out, 4, BLOCK=4)
    assert out[:4].isnan().all()
