"""The sm_90 TMA tiles of the dense conv (``TMA`` in ``conv.GPU_GEMM_CONFIGS``): equivalence
against float64 and where the autotuner offers them.

The interpreter runs tensor descriptors (``tl.make_tensor_descriptor``: zero fill out of bounds,
negative coordinates included), so the TMA path is checked here on CPU with a small TMA
configuration forced (``Tuned.forced``: no pruning); tests/backends/test_triton_configs.py forces
every GPU TMA configuration on an sm_90 GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton

from fastres.analysis.compile import TARGETS
from fastres.backends.triton import _tuning
from fastres.backends.triton import conv as tconv
from tests.backends.test_triton_conv import _check
from tests.backends.test_triton_prologue import _check_forward
from tests.ops.cases import Case

TMA16 = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "TMA": True}, num_warps=4)

# Stride-1 convolutions whose output is the input's size: what the TMA tiles serve.
SHAPES = {
    "1x1": Case(c=32, k=24, r=1, padding=0, h=9, w=7),  # the [N·H·W, C] GEMM
    "3x3": Case(c=24, k=16, h=9, w=7),  # shifted rows per tap; a half channel slab (24 = 16+8)
    "3x3n1": Case(n=1, c=16, k=32, h=5, w=11),  # rows shifted past the matrix at both ends
    "dil2": Case(c=16, k=16, dilation=2, padding=2, h=11, w=10),
    "g2x16": Case(c=32, k=32, groups=2, h=7, w=5),  # the group's [M, Cg] view at channel g·Cg
    "5x5": Case(c=16, k=16, r=5, padding=2, h=8, w=9),
}
HALF = [torch.float16, torch.bfloat16]
_ids = lambda v: v if isinstance(v, str) else str(v).removeprefix("torch.")


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("name", list(SHAPES))
def test_tma_tile_matches_float64(name: str, dtype: torch.dtype) -> None:
    shape = SHAPES[name]
    assert tconv._tma_unfit(_geometry(shape), False, dtype, 90) is None
    for epi in ("raw_bias", "eval_res"):
        with tconv._gemm.forced(TMA16):
            _check(shape, dtype, epi, "cpu", mean_offset=4.0 if epi == "raw_bias" else 0.0)
        assert tconv._gemm.last_config is TMA16


@pytest.mark.parametrize("gated", [False, True], ids=["", "gated"])
@pytest.mark.parametrize("epilogue", ["train", "eval"])
@pytest.mark.parametrize("name, dtype", [("3x3", torch.bfloat16), ("1x1", torch.float16),
                                         ("g2x16", torch.bfloat16)], ids=_ids)
def test_tma_tile_with_the_prologue(name: str, dtype: torch.dtype, epilogue: str,
                                    gated: bool) -> None:
    """The activation prologue on the TMA tile (loaded, then activated in registers, padding
    and out-of-image rows zeroed after the activation), with and without the per-(sample,
    channel) gate (tiles of rows spanning samples)."""
    with tconv._gemm.forced(TMA16):
        _check_forward(SHAPES[name], dtype, epilogue, gated=gated)
    assert tconv._gemm.last_config is TMA16


def _geometry(shape: Case) -> dict[str, int]:
    oh, ow = shape.conv.out_hw(shape.h, shape.w, shape.r, shape.r)
    return dict(C=shape.c, Cg=shape.c // shape.groups, H=shape.h, W=shape.w, OH=oh, OW=ow,
                stride_h=shape.conv.stride[0], stride_w=shape.conv.stride[1],
                R=shape.kernel[0], S=shape.kernel[1])


def _offered(shape: Case, dtype: torch.dtype, cc: int | None, monkeypatch,
             flat: bool = False, x: torch.Tensor | None = None,
             **flags: bool) -> list[triton.Config]:
    monkeypatch.setattr(_tuning, "target", lambda t: cc)
    if x is None:
        x = torch.empty(shape.n, shape.c, shape.h, shape.w, dtype=dtype)
    nargs = dict(_geometry(shape), x_ptr=x, Kg=shape.k // shape.groups)
    kept = tconv._prune_gemm(tconv.GPU_GEMM_CONFIGS, nargs, FLAT_K=flat, IN_AFFINE=False,
                             **flags)
    return [c for c in kept if c.kwargs.get("TMA")]


def test_pruner_offers_tma_tiles_only_on_sm90_for_eligible_problems(monkeypatch) -> None:
    tma = [c for c in tconv.GPU_GEMM_CONFIGS if c.kwargs.get("TMA")]
    assert tma and all(c.kwargs["BLOCK_M"] >= 64 for c in tma)
    wide_1x1 = Case(n=2, c=256, k=256, r=1, padding=0, h=14, w=14)
    wide_3x3 = Case(n=2, c=128, k=128, h=28, w=28)
    for dtype in HALF:
        assert _offered(wide_1x1, dtype, 90, monkeypatch) == tma
        assert _offered(wide_3x3, dtype, 90, monkeypatch) == tma
        for cc in (80, None):  # A100, CPU
            assert _offered(wide_1x1, dtype, cc, monkeypatch) == []
        assert _offered(wide_1x1, dtype, 90, monkeypatch, flat=True) == []
    assert _offered(wide_1x1, torch.float32, 90, monkeypatch) == []
    not_eligible = [
        Case(n=2, c=256, k=256, r=1, padding=0, stride=2, h=14, w=14),  # stride 2
        Case(n=2, c=128, k=128, stride=2, h=28, w=28),
        Case(n=2, c=128, k=128, padding=0, h=28, w=28),  # output smaller than the input
        Case(n=2, c=36, k=64, r=1, padding=0, h=14, w=14),  # rows of 72 bytes: not 16-aligned
        # 20 channels per group: the second group's first channel is 40 bytes in
        Case(n=2, c=40, k=128, groups=2, h=14, w=14),
    ]
    for shape in not_eligible:
        assert _offered(shape, torch.float16, 90, monkeypatch) == [], shape.id
    # 24 channels per group (48 bytes): aligned; the 64-wide channel tiles fit 64 per group
    assert _offered(Case(n=2, c=48, k=128, groups=2, h=14, w=14), torch.float16, 90,
                    monkeypatch)
    # an input whose data pointer is not 16-byte aligned (a view 1 element in)
    x = torch.empty(2 * 256 * 14 * 14 + 1, dtype=torch.float16)[1:]
    assert _offered(wide_1x1, torch.float16, 90, monkeypatch, x=x) == []


def test_compile_specs_hold_the_tma_tiles_for_sm90_only() -> None:
    specs = {s.name: s for s in tconv.compile_specs()}
    for cfg in (c for c in tconv.GPU_GEMM_CONFIGS if c.kwargs.get("TMA")):
        for dtype in ("float16", "bfloat16"):
            for cls in ("1x1", "3x3s1"):
                spec = specs[f"conv_gemm-{dtype}-all-{tconv._cfg_name(cfg)}-{cls}"]
                assert spec.constexprs["TMA"] is True
                # the report holds sm_90 to its rules
                assert set(spec.pruned) == set(TARGETS) - {90}, spec.name
        assert not any(n.startswith("conv_gemm-float32-") and "_tma_" in n for n in specs)
    for epi in ("train", "eval", "prologue"):  # the largest TMA tile, held to the rules
        spec = specs[f"conv_gemm-bfloat16-{epi}-128_128_32_tma_w8s3-1x1"]
        assert set(spec.pruned) == set(TARGETS) - {90}


def test_pruner_offers_every_tma_tile_with_every_epilogue(monkeypatch) -> None:
    """Since the epilogue stores the output before it forms the statistics, the 128x128 tiles
    no longer spill on sm_90 with the statistics and the eval epilogue together on 1x1 convs
    (the kernel report): all three TMA tiles are offered, 1x1 and 3x3 alike."""
    wide_1x1 = Case(n=2, c=256, k=256, r=1, padding=0, h=14, w=14)
    full = dict(STATS=True, HAS_AFFINE=True, HAS_RES=True)
    for flags in (full, dict(STATS=True), dict(HAS_AFFINE=True, HAS_RES=True)):
        assert len(_offered(wide_1x1, torch.bfloat16, 90, monkeypatch, **flags)) == 3
    assert len(_offered(Case(n=2, c=128, k=128, h=28, w=28), torch.bfloat16, 90, monkeypatch,
                        **full)) == 3
