"""Triton convolutions with a fused epilogue (bias, BN statistics, scale/shift, residual, ReLU).

Everything is NHWC (channels_last) inside and accumulates in fp32. Two kernels serve
:func:`conv2d_fused`:

* ``_conv_gemm_kernel``: implicit GEMM on tensor cores (``tl.dot``). Rows are output pixels
  (M = N·OH·OW), columns output channels of one group (Kg), the reduction runs over R·S·Cg.
  Used when a group has >= 16 input channels, one launch covering every group through a group
  program axis, and, with ``FLAT_K``, for ungrouped convolutions with few input channels (the
  7x7 stem on RGB), where the reduction index is decoded into (r, s, c) per element so that the
  3 channels do not waste a 16-wide ``tl.dot`` slab per filter tap.
* ``_conv_direct_kernel``: direct convolution with CUDA-core FMAs for grouped convolutions with
  few channels per group (ResNeXt's 4–8, depthwise 1), where a ``tl.dot`` tile would be mostly
  zeros. Each output channel reads only the Cg input channels of its own group.

The epilogue (shared, ``_epilogue``) adds the bias, optionally writes per-tile BN partial
statistics of that raw output, then applies ``acc * scale + shift``, adds the residual, applies
ReLU and stores in the input dtype, all in fp32 registers.

On sm_90 the autotuner also offers TMA tiles (``TMA``, fp16/bf16, stride-1 convolutions whose
output is the input's size): per filter tap the A tile is a block of rows of the NHWC matrix
[N·H·W, Cg] shifted by dh·W + dw, loaded through a tensor descriptor (zero fill past the matrix),
rows in the padding or a neighbouring image row zeroed after the load (see ``_tma_unfit``).

The prologue (``IN_AFFINE``, block-fused training) reads the input through the previous conv's
BN and ReLU, ``relu(x·in_scale + in_shift)`` per input channel (``_activated``), so that only
raw conv outputs are stored between the convs of a residual block; with ``IN_GATE`` also times a
per-(sample, channel) gate after the ReLU (a squeeze-excitation gate between two convs: each
A-tile row reads the gate of its own sample). It is computed in fp32 on the loaded elements, set
to 0 where the load mask is off (zero padding after the activation: a padded element is 0, not
relu(in_shift)) and rounded once to x's dtype: the activation PyTorch would have stored
(compiled, x·scale + shift is one FMA where eager rounds the product first: one ulp of x's
dtype apart near a rounding boundary). fp32 operands are then rounded to TF32 as usual.
conv_bwd's wgrad reads x through the same helper.

BN partials (:class:`Partials`) are per M tile: each tile of BLOCK_M output rows yields, for
every channel, the count of valid rows, their mean and M2 (sum of squared deviations from the
tile mean) of the raw output y = conv + bias. M2 is computed from the fp32 tile in registers with
the corrected two-pass algorithm (mean, deviations from it, correction), so it stays accurate
when |mean| >> std; tiles are merged with Chan's formula downstream. For fp32 outputs the
statistics are taken on the accumulator before the bias is added (the bias only shifts the
mean); for fp16/bf16 outputs on y as stored, rounded to its dtype, as PyTorch's batch_norm would
see it, so the mean and variance stay consistent with the y that BN apply and backward read.
Remaining limit: the fp32 tile means carry a rounding error of half an ulp of |mean|, which
enters the merged variance like a rounding of each output to fp32 would.

Tile boundaries depend on BLOCK_M, which autotuning chooses. The partial buffers are allocated
for the smallest BLOCK_M of all configurations (the most tiles); the kernel writes rows
``[0, cdiv(M, BLOCK_M))`` for the BLOCK_M it ran with, and :func:`conv2d_fused` returns the
buffers sliced to those rows, reading the configuration that ran from the autotuner
(``last_config``, set on every launch) and computing the counts on the host from M and BLOCK_M
(no device sync). Rows past the slice are never read.

Precision: fp32 inputs go through ``tl.dot`` with its default TF32 input precision on GPU, like
cuDNN's fp32 convolution under PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``; the
operands are rounded to TF32 first (the tensor cores would truncate them, a bias towards zero);
fp16/bf16 operands are multiplied exactly and accumulated in fp32.

Interpreter (``TRITON_INTERPRET=1`` at import): its bf16 ``tl.dot`` is broken, so operands are
upcast to fp32 there, and its fp32 -> bf16 conversion truncates, so the epilogue rounds to
nearest even itself (both under the ``INTERPRET`` constexpr, False on GPU); each autotuner gets
exactly one small configuration (the interpreter cannot benchmark several).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import triton
import triton.language as tl

from ...analysis.compile import TARGETS, UNSPECIALISED, CompileSpec
from .. import _alloc, devices
from ..base import ConvParams
from . import _tuning
from ._activation import silu

_INTERPRET = _tuning.INTERPRET

# A group needs at least this many input channels for the tensor-core kernel: tl.dot's reduction
# tile is at least 16 wide, so fewer channels would multiply mostly zeros.
MIN_DENSE_CHANNELS = 16

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclasses.dataclass
class Partials:
    """Per-tile BN partial statistics of the raw conv output (acc + bias), fp32.

    For fp16/bf16 outputs the statistics are of the output as stored (rounded to its dtype).
    """

    count: torch.Tensor  # (T,) float32: number of valid output rows (pixels) in each M tile
    mean: torch.Tensor  # (T, K) float32: per-tile, per-channel mean
    m2: torch.Tensor  # (T, K) float32: per-tile, per-channel sum of squared deviations from it


# ---------------------------------------------------------------------------------------------
# Autotuning configurations
# ---------------------------------------------------------------------------------------------

# BLOCK_M >= 64 everywhere: the partial-statistics buffers hold one row per BLOCK_M output
# pixels, so a larger minimum keeps them (and the finalize pass over them) small.
GPU_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 128, 64, 8, 3),
        (64, 64, 64, 4, 3),
        # narrow channel tiles for grouped convolutions (ResNeXt: 16-32 channels per group)
        (128, 32, 32, 4, 4),
        (64, 32, 32, 4, 4),
        (128, 16, 32, 4, 4),
    )
]
GPU_DIRECT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in (
        (64, 32, 4, 2),
        (128, 32, 4, 2),
        (64, 64, 4, 2),
        (128, 64, 8, 2),
        (256, 16, 4, 2),
    )
]
# Hopper TMA variants (sm_90, fp16/bf16, stride-1 convs whose output is the input's size: 1x1
# unpadded, 3x3 with padding 1): the best-shaped tensor-core tiles again with the input tile read
# through a tensor descriptor (``TMA``; _conv_gemm_kernel). The autotuner times them against the
# pointer-load tiles and keeps whichever is faster; _tma_unfit says where they are not offered.
_TMA_TILES = ((128, 128, 64), (128, 128, 32), (128, 64, 32))
GPU_GEMM_CONFIGS += [
    triton.Config({**c.kwargs, "TMA": True}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in GPU_GEMM_CONFIGS
    if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in _TMA_TILES
]
if _INTERPRET:  # one small configuration each: the interpreter cannot benchmark several
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    _DIRECT_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
else:
    _GEMM_CONFIGS = GPU_GEMM_CONFIGS
    _DIRECT_CONFIGS = GPU_DIRECT_CONFIGS


# Tiles the autotuner never offers for an input dtype on a target, found by the kernel report
# (python -m fastres.analysis.kernel_report, bench/kernel_report.json: every configuration
# compiled as a launch on the ResNet shape classes of compile_specs specialises it): they spill
# registers to local memory there. Keyed (kernel: "gemm", "gemm_flat" or "direct"; dtype; tile
# as in the config lists above, a TMA tile with its True; flags), where flags names the launches
# the entry holds for (_FLAG_SETS: "" every launch) -> {compute capability: why}. fp32 operands
# take twice the registers of fp16/bf16 ones, and the flat-K kernel also holds decoded (r, s, c)
# indices per element. Since the epilogue stores the output before it forms the statistics
# (2026-12-07), the sm_90 TMA tiles on 1x1 convs and the direct kernel's narrower bf16 tiles no
# longer spill there, and are offered again.
_SPILLS = {
    "": "spills registers",
    "prologue": "spills registers with the prologue",
    "full": "spills registers with the statistics and the eval epilogue together",
    "gate": "spills registers with the gated prologue",
}
_UNFIT_TILES: dict[tuple[str, torch.dtype, tuple[int, ...], str], dict[int, str]] = {}
for _key, _ccs in {
    # (sm_100: tcgen05's accumulator comes back a row per thread, and with the operands rounded
    # to TF32 in registers, see _tf32_rounded, the fp32 128-row tiles spill 300-520 bytes there)
    ("gemm", torch.float32, (128, 128, 32), ""): (89, 90, 100, 120),
    ("gemm", torch.float32, (128, 128, 64), ""): (80, 90, 100),
    ("gemm", torch.float32, (128, 64, 32), ""): (80, 89, 100, 120),
    ("gemm", torch.float32, (64, 128, 32), ""): (89, 90, 120),  # 16 B on sm_89 / sm_120
    ("gemm", torch.float16, (128, 128, 64), ""): (100,),  # 8 bytes
    ("gemm", torch.bfloat16, (64, 128, 32), ""): (100,),  # 24 bytes
    ("gemm_flat", torch.float32, (128, 128, 32), ""): (80, 90),
    ("gemm_flat", torch.float32, (128, 128, 64), ""): (80, 90),
    ("gemm_flat", torch.float32, (128, 64, 32), ""): (80, 89, 90, 100, 120),
    ("gemm_flat", torch.float32, (64, 64, 32), ""): (89,),  # 8 bytes
    ("gemm_flat", torch.float16, (128, 128, 64), ""): (90,),
    ("gemm_flat", torch.bfloat16, (128, 128, 64), ""): (90,),
    ("gemm_flat", torch.float16, (128, 16, 32), ""): (80,),  # 8 bytes
    ("gemm_flat", torch.bfloat16, (128, 16, 32), ""): (80,),
    # the direct kernel's bf16 128x64 tile on sm_90: 8 bytes with the statistics and the eval
    # epilogue together, none with either alone
    ("direct", torch.bfloat16, (128, 64), "full"): (90,),
    # with the activation prologue (compiled with the training epilogue it serves, every
    # configuration on the kernels' first shape classes): it holds the input tile's per-channel
    # scale and shift and its fp32 activation besides what the plain kernel holds
    ("gemm", torch.float32, (128, 128, 64), "prologue"): (80,),
    ("gemm", torch.float32, (64, 64, 64), "prologue"): (80,),
    ("gemm_flat", torch.float32, (64, 128, 32), "prologue"): (80, 90),
    ("gemm_flat", torch.float32, (64, 64, 64), "prologue"): (80,),
    ("gemm_flat", torch.float32, (128, 16, 32), "prologue"): (90,),
    ("gemm_flat", torch.float32, (128, 32, 32), "prologue"): (80, 89, 120),  # 200-536 B
    ("gemm_flat", torch.float16, (128, 64, 32), "prologue"): (80, 90),
    ("gemm_flat", torch.float16, (128, 128, 64), "prologue"): (80,),
    ("gemm_flat", torch.float16, (64, 64, 64), "prologue"): (90,),
    ("gemm_flat", torch.bfloat16, (128, 64, 32), "prologue"): (80, 90),
    ("gemm_flat", torch.bfloat16, (128, 128, 64), "prologue"): (80,),
    ("direct", torch.float32, (128, 64), "prologue"): (80,),
    ("direct", torch.float16, (128, 32), "prologue"): (80,),
    ("direct", torch.float16, (64, 64), "prologue"): (80,),
    ("direct", torch.float16, (128, 64), "prologue"): (80,),
    # with the gated prologue (the largest tiles, compiled with and without the statistics):
    # the gate is gathered per (pixel, output channel's input channel) element in every step
    ("direct", torch.float32, (128, 32), "gate"): (80, 90),  # 32 B without the statistics
    ("direct", torch.float32, (64, 64), "gate"): (80, 90),  # 8-32 B
    ("direct", torch.float32, (256, 16), "gate"): (80, 90),  # 32 B without the statistics
    ("direct", torch.float16, (256, 16), "gate"): (80, 90, 100),  # 24-40 B
}.items():
    for _cc in _ccs:
        _UNFIT_TILES.setdefault(_key, {})[_cc] = _SPILLS[_key[3]]
# (Tiles needing more shared memory than a device has per block are dropped by the pruner's
# estimate against the device's own limit, not listed here: _tuning.smem_reason.)
del _key, _ccs, _cc

# The launches each _UNFIT_TILES flag set stands for, by their integer arguments and constexpr
# flags; each entry is what spilled when compiled under exactly those (ptxas's register
# allocation is not monotonic in the code): "full" is the statistics and the eval epilogue
# together (the report's "all" flag set), which a tile may not survive while training's
# statistics or fused eval's scale/shift, residual and ReLU alone keep it.
_FLAG_SETS: dict[str, Callable[[Mapping[str, int], Mapping[str, object]], bool]] = {
    "prologue": lambda ints, flags: bool(flags.get("IN_AFFINE")),  # a block's inner convs
    "gate": lambda ints, flags: bool(flags.get("IN_GATE")),  # the conv after a channel gate
    "full": lambda ints, flags: bool(flags.get("STATS")) and bool(
        flags.get("HAS_AFFINE") or flags.get("HAS_RES")),
}


# Shared memory per configuration (_tuning.SmemModel), fitted to the kernel report's compiled
# figures (the heaviest epilogue and prologue): (mma.sync targets, wgmma / tcgen05 targets).
# The gemm kernel stages the x and w tiles; an activation prologue or TF32 rounding forms the
# x tile in registers and stores it again for the MMA.
_SMEM_MODELS = {
    # scratch: the prologue variants' layout conversions and sm_120's barriers (up to 4.8 KB
    # more than the tiles, kernel report)
    "gemm": (_tuning.SmemModel((1, 1), (1, 0), 2048), _tuning.SmemModel((1, 1), (1, 2), 2048)),
    "gemm_flat": (_tuning.SmemModel((1, 1), (0, 1), 6144),
                  _tuning.SmemModel((1, 2), (0, 0), 2048)),
}


def smem_bytes(kname: str, cfg: triton.Config, dtype: torch.dtype | None,
               cc: int | None, gated: bool = False) -> int:
    """Shared memory (bytes, an upper estimate) configuration ``cfg`` of kernel ``kname``
    ("gemm", "gemm_flat", "direct") takes in ``dtype`` on target ``cc``; ``gated``: with the
    gated prologue (IN_GATE)."""
    kw = cfg.kwargs
    if kname == "direct":
        return _tuning.reduction_smem(kw["BLOCK_N"], cfg.num_warps)
    m, n, k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    cls = devices.for_target(cc) if cc is not None else None
    size = dtype.itemsize if dtype is not None else 4
    gate = _tuning.gate_smem(m * k, cfg.num_stages) if gated else 0
    return _tuning.gemm_smem(_SMEM_MODELS[kname], m * k, k * n, cfg.num_stages, size, cls) + gate


def _flag_sets(ints: Mapping[str, int], flags: Mapping[str, object]) -> tuple[str, ...]:
    """The _UNFIT_TILES flag sets a launch with integer arguments ``ints`` and constexpr
    ``flags`` falls under ("" always)."""
    return ("", *(name for name, holds in _FLAG_SETS.items() if holds(ints, flags)))


def _tma_unfit(
    geom: Mapping[str, int], flat: bool, dtype: torch.dtype | None, cc: int | None,
    x_aligned: bool = True,
) -> str | None:
    """Why a problem cannot read its input through a TMA descriptor (None: it can).

    ``geom`` holds the kernel's integer arguments (C, Cg, H, W, OH, OW, stride_h, stride_w);
    ``x_aligned``: x's data pointer is 16-byte aligned. The descriptor views one group's
    channels as the [N·H·W, Cg] matrix with row stride C, which needs a 16-byte aligned base
    (x and each group's first channel) and row stride, and the kernel shifts whole rows per
    filter tap, which needs stride 1 and an output the size of the input.
    """
    if cc != 90:
        return "TMA descriptors only on sm_90" if cc is not None else "TMA needs a CUDA sm_90 GPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"TMA tiles only in fp16/bf16, not {str(dtype).removeprefix('torch.')}"
    if flat:
        return "TMA not for the flat-K kernel"
    if not all(k in geom for k in ("C", "Cg", "H", "W", "OH", "OW", "stride_h", "stride_w")):
        return "no convolution geometry given"
    if (geom["stride_h"], geom["stride_w"]) != (1, 1) or (
            (geom["OH"], geom["OW"]) != (geom["H"], geom["W"])):
        return "TMA needs stride 1 and an output the size of the input"
    if geom["Cg"] % 8 or geom["C"] % 8 or not x_aligned:
        return "TMA needs 16-byte aligned rows (channels per group a multiple of 8)"
    return None


def _unfit(
    kname: str, cfg: triton.Config, ints: Mapping[str, int], dtype: torch.dtype | None,
    cc: int | None, flags: Mapping[str, object] | None = None, x_aligned: bool = True,
    smem_limit: int | None = None,
) -> str | None:
    """Why the autotuner does not offer ``cfg`` of kernel ``kname`` ("gemm", "gemm_flat",
    "direct") for a problem with integer arguments ``ints`` and constexpr ``flags`` on target
    ``cc`` (None: it does); ``x_aligned``: x's data pointer is 16-byte aligned. TMA tiles need a
    problem they can run on (_tma_unfit); tiles much wider than the channels they span are
    dropped; then _UNFIT_TILES; then tiles needing more shared memory than ``smem_limit``
    (default: the target's table figure)."""
    kw = cfg.kwargs
    if kw.get("TMA") and (why := _tma_unfit(ints, kname == "gemm_flat", dtype, cc, x_aligned)):
        return why
    if kname == "direct":
        if kw["BLOCK_N"] > max(16, triton.next_power_of_2(ints["K"])):
            return f"BLOCK_N much wider than the {ints['K']} output channels"
    else:
        if kw["BLOCK_N"] > max(32, triton.next_power_of_2(ints["Kg"])):
            return f"BLOCK_N much wider than the {ints['Kg']} output channels per group"
        if kname == "gemm" and kw["BLOCK_K"] > max(32, triton.next_power_of_2(ints["Cg"])):
            return f"BLOCK_K much wider than the {ints['Cg']} input channels per group"
    tile = tuple(kw.values())
    for fset in _flag_sets(ints, flags or {}):
        if why := _UNFIT_TILES.get((kname, dtype, tile, fset), {}).get(cc):
            return f"{why} in {str(dtype).removeprefix('torch.')} on sm_{cc}"
    gated = bool((flags or {}).get("IN_GATE"))
    return _tuning.smem_reason(smem_bytes(kname, cfg, dtype, cc, gated), smem_limit, cc)


def _pruner(kname: str):
    """The early_config_prune function of kernel ``kname`` ("gemm", whose FLAT_K launches are
    "gemm_flat", or "direct"): the configurations :func:`_unfit` accepts for the launch's
    arguments, flags, dtype and device; if none is, every one but the TMA tiles (which may not
    run there) that fits the device's shared memory (_tuning.fitting)."""
    def prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        name = "gemm_flat" if kname == "gemm" and kwargs.get("FLAT_K") else kname
        x = nargs.get("x_ptr")
        dtype, cc = getattr(x, "dtype", None), _tuning.target(x)
        limit = _tuning.smem_limit(x, cc)
        aligned = isinstance(x, torch.Tensor) and _tuning.aligned16(x)
        kept = [c for c in configs
                if _unfit(name, c, nargs, dtype, cc, kwargs, aligned, limit) is None]
        gated = bool(kwargs.get("IN_GATE"))
        return kept or _tuning.fitting([c for c in configs if not c.kwargs.get("TMA")],
                                       lambda c: smem_bytes(name, c, dtype, cc, gated), limit)
    prune.__name__ = f"_prune_{kname}"
    return prune


_prune_gemm = _pruner("gemm")
_prune_direct = _pruner("direct")


# Partial-statistics buffers are sized for this many rows per tile (the most tiles).
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in (*_GEMM_CONFIGS, *_DIRECT_CONFIGS))

# What selects a configuration: the whole problem geometry (the image size, padding and dilation
# change how many rows a tile wastes at the borders) and the epilogue (tensor dtypes are added by
# the autotuner itself).
_KEY = [
    "M", "H", "W", "C", "K", "Cg", "Kg", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w",
    "dil_h", "dil_w", "STATS", "HAS_RES", "IN_AFFINE", "IN_GATE", "HAS_BIAS", "HAS_AFFINE", "RELU",
    "SILU",
]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_to_output(
    v,  # fp32 values
    out_ptr,  # the output pointer: its element type is the dtype to round to
    INTERPRET: tl.constexpr,  # running in the interpreter
):
    """``v`` rounded to nearest even in the output dtype, returned as (exact) fp32."""
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        # The interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest even),
        # a bias that would show in every mean: round on the bits instead. Finite values only
        # (inf stays inf).
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _tf32_rounded(v):
    """fp32 ``v`` rounded to TF32 (10 mantissa bits) to nearest, ties away from zero, as cuDNN's
    TF32 path rounds. Fed fp32, the tensor cores read TF32 by *truncation*, which would pull
    every product towards zero by up to 2^-10 relative: a bias that batch-statistics BN hides
    but eval outputs and running statistics keep. Inf and NaN stay what they are."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_weight_rows(
    acc,  # (BLOCK_M, BLOCK_N) fp32 accumulator
    a,  # (BLOCK_M, BLOCK_K) input tile in x's dtype
    rows,  # (BLOCK_K,) rows of the group's packed weight matrix: reduction index (r·S + s)·Cg + c
    rows_ok,  # (BLOCK_K,) the rows that exist (the rest load 0)
    w_g,  # this group's packed weight matrix (R·S·Cg, Kg)
    offs_n,  # (BLOCK_N,) output channels within the group
    n_ok,  # (BLOCK_N,) the output channels that exist
    Kg,  # output channels per group: the matrix's row stride
    x_ptr,  # the input pointer: its element type is the operands' dtype
    INTERPRET: tl.constexpr,  # running in the interpreter
):
    """``acc + a · W[rows, offs_n]``, the weight tile loaded here; the one multiply-accumulate
    step of every input path of _conv_gemm_kernel (TMA, flat K, per-tap slabs)."""
    b = tl.load(w_g + rows[:, None] * Kg + offs_n[None, :],
                mask=rows_ok[:, None] & n_ok[None, :], other=0.0)
    if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 products are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    elif x_ptr.dtype.element_ty == tl.float32:  # TF32 tensor cores: round, not truncate
        a = _tf32_rounded(a)
        b = _tf32_rounded(b)
    return tl.dot(a, b, acc)


@triton.jit
def _activated(
    v,  # loaded input elements (any float dtype; masked-off elements are ignored)
    scale,  # per-channel fp32 scale of the previous BN, broadcastable to v
    shift,  # per-channel fp32 shift, broadcastable to v
    gate,  # fp32 per-(sample, channel) gate broadcastable to v, or None (no gate)
    mask,  # the load mask of v: False for padding and out-of-image elements
    x_ptr,  # the input pointer: its element type is the dtype to round to
    INTERPRET: tl.constexpr,  # running in the interpreter
):
    """The activation ``relu(v·scale + shift)`` (times ``gate``) a convolution reads in place of
    its input when the previous conv's BN+ReLU (and a channel gate) is fused into this one's load
    (the prologue), in x's dtype.

    Computed in fp32 and rounded once to x's dtype: the activation eager PyTorch would have
    stored (BN apply computes in fp32). The gate multiplies after the ReLU (it may be negative).
    Padding is applied *after* the activation: an element outside the image is 0, as the zero
    padding of the stored activation is, not relu(shift).
    """
    a = v.to(tl.float32) * scale + shift
    a = tl.where(a < 0.0, 0.0, a)  # not maximum(): max.f32 drops NaN on a GPU
    if gate is not None:
        a = a * gate
    a = tl.where(mask, a, 0.0)
    if INTERPRET:  # its fp32 -> bf16 conversion truncates: round first, then convert exactly
        a = _round_to_output(a, x_ptr, INTERPRET)
    return a.to(x_ptr.dtype.element_ty)


@triton.jit
def _gate(
    gate_ptr,  # (N, C) fp32 per-sample gate, row-major
    img,  # int64 sample of each element, broadcastable against ch
    ch,  # absolute input channel of each element
    C,  # input channels: the gate's row stride
    mask,  # the elements to read (the rest are padding: 0)
    IN_GATE: tl.constexpr,  # a gate is passed
):
    """The gate operand of :func:`_activated`: ``gate[img, ch]`` as fp32, None without a gate.
    (A tile's rows may span samples, so the gate is gathered per element; it is N·C floats,
    cache resident.)"""
    if IN_GATE:
        return tl.load(gate_ptr + img * C + ch, mask=mask, other=0.0)
    else:
        return None


@triton.jit
def _epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32 accumulator of the convolution
    offs_m,  # [BLOCK_M] int32 output row (pixel) indices of this tile
    m_ok,  # [BLOCK_M] bool: row < M
    offs_k,  # [BLOCK_N] int32 global output channel indices
    k_ok,  # [BLOCK_N] bool: channel exists (in this group)
    pid_m,  # this tile's index along M (row of the partial-statistics buffers)
    M,  # number of output rows N·OH·OW
    K,  # total output channels (row stride of out / residual / partials)
    bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,  # see the kernels
    count_ptr, mean_ptr, m2_ptr,
    HAS_BIAS: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    SILU: tl.constexpr,
    STATS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    # The output first, the statistics after: the output's fp32 values are dead once stored,
    # so the statistics' per-channel vectors never share the registers with them. (Where a
    # thread holds a whole accumulator row, as Blackwell's tcgen05 accumulator is read back,
    # the reductions over rows leave BLOCK_N / warps-across-N sums in every thread: with the
    # output still live that spilled on sm_100.)
    out = acc
    if HAS_BIAS:
        out += bias[None, :]
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
        out = out * scale[None, :] + shift[None, :]
    # int64: M·K passes 2^31 for large batches.
    o_off = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    o_mask = m_ok[:, None] & k_ok[None, :]
    if HAS_RES:
        out += tl.load(res_ptr + o_off, mask=o_mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.where(out < 0.0, 0.0, out)  # not maximum(): max.f32 drops NaN on a GPU
    if SILU:
        out = silu(out)
    if INTERPRET:
        out = _round_to_output(out, out_ptr, INTERPRET)
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    if STATS:
        if out_ptr.dtype.element_ty == tl.float32:
            # Statistics of acc + bias, taken on acc and shifted by the bias afterwards (M2
            # does not change under a shift): a large bias then costs no precision.
            vals = acc
        else:
            # fp16/bf16: statistics of the raw output as stored, rounded to its dtype, as
            # PyTorch's batch_norm sees it; the mean and variance the BN apply and backward
            # passes use are then consistent with the y they read (normalised y sums to 0).
            vals = acc
            if HAS_BIAS:
                vals += bias[None, :]
            vals = _round_to_output(vals, out_ptr, INTERPRET)
        # Corrected two-pass algorithm over the fp32 tile in registers: a first mean, the
        # deviations from it, then the mean corrected by the (small, accurately summed) mean
        # deviation and M2 = sum(d^2) - (sum d)^2 / n. Robust when |mean| >> std, unlike
        # E[y^2] - E[y]^2; the correction matters because Chan's merge assumes each tile's mean
        # is exact, and the first mean's rounding (a sum of BLOCK_M values of size |mean|)
        # would otherwise enter the merged variance to first order.
        n_valid = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        valid = m_ok[:, None]
        t_mean = tl.sum(tl.where(valid, vals, 0.0), axis=0) / n_valid
        dev = tl.where(valid, vals - t_mean[None, :], 0.0)
        d_sum = tl.sum(dev, axis=0)
        t_m2 = tl.sum(dev * dev, axis=0) - d_sum * d_sum / n_valid
        t_mean += d_sum / n_valid
        if HAS_BIAS and out_ptr.dtype.element_ty == tl.float32:
            t_mean += bias
        p_off = pid_m.to(tl.int64) * K + offs_k
        tl.store(mean_ptr + p_off, t_mean, mask=k_ok)
        tl.store(m2_ptr + p_off, t_m2, mask=k_ok)
        # the tile's row count, once per tile: by the program holding output channel 0
        tl.store(count_ptr + pid_m + 0 * offs_k, tl.zeros_like(t_mean) + n_valid, mask=offs_k == 0)


@triton.jit
def _conv_gemm_kernel(
    x_ptr,  # input, NHWC contiguous (N, H, W, C) (IN_AFFINE: the previous conv's raw y)
    in_scale_ptr,  # (C,) fp32 prologue scale: relu(x·scale + shift) (read only if IN_AFFINE)
    in_shift_ptr,  # (C,) fp32 prologue shift (read only if IN_AFFINE)
    in_gate_ptr,  # (N, C) fp32 per-sample gate after the prologue's ReLU (read only if IN_GATE)
    w_ptr,  # weight packed as (groups, R, S, Cg, Kg) contiguous: per group a (R·S·Cg, Kg) matrix
    bias_ptr,  # (K,) conv bias in x's dtype (read only if HAS_BIAS)
    scale_ptr,  # (K,) fp32 epilogue scale (read only if HAS_AFFINE)
    shift_ptr,  # (K,) fp32 epilogue shift (read only if HAS_AFFINE)
    res_ptr,  # residual, NHWC contiguous (N, OH, OW, K) in x's dtype (read only if HAS_RES)
    out_ptr,  # output, NHWC contiguous (N, OH, OW, K) in x's dtype
    count_ptr,  # (tiles,) fp32 valid rows per tile (written only if STATS)
    mean_ptr,  # (tiles, K) fp32 per-tile channel means (written only if STATS)
    m2_ptr,  # (tiles, K) fp32 per-tile channel M2 (written only if STATS)
    M,  # output rows N·OH·OW
    H, W, C,  # input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    HAS_BIAS: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    SILU: tl.constexpr,  # SiLU instead of ReLU (never both)
    STATS: tl.constexpr,
    IN_AFFINE: tl.constexpr,  # read the input through relu(x·in_scale + in_shift) (_activated)
    IN_GATE: tl.constexpr,  # ... times in_gate[n, c] (only with IN_AFFINE)
    FLAT_K: tl.constexpr,  # reduction index runs over R·S·Cg jointly (few input channels)
    INTERPRET: tl.constexpr,  # running in the interpreter: work around its bf16 gaps
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # reduction slab per tl.dot
    TMA: tl.constexpr = False,  # read x through a tensor descriptor (sm_90 TMA; _tma_unfit)
):
    # Program axis 0 walks the (M tile, N tile) pairs with the channel tile fastest, so the
    # programs sharing an input tile run together (L2 reuse); axis 1 is the group.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_n = tl.cdiv(Kg, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    img = (t // OH).to(tl.int64)  # int64: later multiplied by H·W·C
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Kg
    offs_kk = tl.arange(0, BLOCK_K)
    x_g = x_ptr + g * Cg  # this group's first input channel
    w_g = w_ptr + g.to(tl.int64) * (R * S * Cg * Kg)  # this group's weight matrix

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # Stride 1 with the output the input's size (OH == H, OW == W: 1x1 unpadded, 3x3 with
        # padding 1, ...; _tma_unfit): the input pixel of output row m for filter tap (r, s) is
        # row m + dh·W + dw of the NHWC matrix [N·H·W, C], so each tap's A tile is one
        # contiguous block of rows of this group's [M, Cg] view, loaded by the TMA unit
        # (rows and channels past the matrix are zero-filled by the hardware). Rows whose
        # shifted pixel falls in the padding or in a neighbouring image row are zeroed after the
        # load (the tile is in registers then; a 1x1 conv, R = S = 1 at compile time, has none
        # and feeds the TMA tile straight to tl.dot unless the prologue is on).
        x_desc = tl.make_tensor_descriptor(
            x_g, shape=[M, Cg], strides=[C, 1], block_shape=[BLOCK_M, BLOCK_K],
        )
        m0 = pid_m * BLOCK_M
        n_slabs = tl.cdiv(Cg, BLOCK_K)
        for it in range(0, R * S * n_slabs):
            rs = it // n_slabs
            c0 = (it - rs * n_slabs) * BLOCK_K
            r = rs // S
            s = rs - r * S
            dh = r * dil_h - pad_h
            dw = s * dil_w - pad_w
            a = x_desc.load([m0 + dh * W + dw, c0])
            ck = c0 + offs_kk
            ck_ok = ck < Cg
            if R * S != 1 or IN_AFFINE:
                ih = oh + dh
                iw = ow + dw
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                if IN_AFFINE:
                    x_ch = g * Cg + ck  # absolute input channel
                    a_mask = row_ok[:, None] & ck_ok[None, :]
                    a = _activated(
                        a,
                        tl.load(in_scale_ptr + x_ch, mask=ck_ok, other=0.0)[None, :],
                        tl.load(in_shift_ptr + x_ch, mask=ck_ok, other=0.0)[None, :],
                        _gate(in_gate_ptr, img[:, None], x_ch[None, :], C, a_mask, IN_GATE),
                        a_mask, x_ptr, INTERPRET,
                    )
                else:
                    a = tl.where(row_ok[:, None], a, 0.0)
            acc = _dot_weight_rows(acc, a, rs * Cg + ck, ck_ok, w_g, offs_n, n_ok, Kg, x_ptr,
                                   INTERPRET)
    elif FLAT_K:
        # Reduction index kk = (r·S + s)·Cg + c, decoded per element: the packed weight matrix
        # has exactly this row order, so its tile load is a plain 2-D block.
        KTOT = R * S * Cg
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + offs_kk
            kk_ok = kk < KTOT
            c = kk % Cg
            rs = kk // Cg
            r = rs // S
            s = rs % S
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_mask = (
                m_ok[:, None] & kk_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            )
            a_off = ((img[:, None] * H + ih) * W + iw) * C + c[None, :]
            a = tl.load(x_g + a_off, mask=a_mask, other=0.0)
            if IN_AFFINE:
                x_ch = g * Cg + c  # absolute input channel
                a = _activated(
                    a,
                    tl.load(in_scale_ptr + x_ch, mask=kk_ok, other=0.0)[None, :],
                    tl.load(in_shift_ptr + x_ch, mask=kk_ok, other=0.0)[None, :],
                    _gate(in_gate_ptr, img[:, None], x_ch[None, :], C, a_mask, IN_GATE),
                    a_mask, x_ptr, INTERPRET,
                )
            acc = _dot_weight_rows(acc, a, kk, kk_ok, w_g, offs_n, n_ok, Kg, x_ptr, INTERPRET)
    else:
        # One loop over (filter tap, channel slab) pairs rather than two nested loops: the
        # software pipeliner only overlaps loads with tl.dot across iterations of the innermost
        # loop, and a tap alone has few slabs (Cg / BLOCK_K). Each iteration recomputes its
        # tap's input rows and padding mask (a few integer ops per row, cheap next to the dot).
        n_slabs = tl.cdiv(Cg, BLOCK_K)
        for it in range(0, R * S * n_slabs):
            rs = it // n_slabs
            c0 = (it - rs * n_slabs) * BLOCK_K
            r = rs // S
            s = rs - r * S
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = ((img * H + ih) * W + iw) * C  # [BLOCK_M] int64 offsets of the input pixels
            ck = c0 + offs_kk
            ck_ok = ck < Cg
            a_mask = row_ok[:, None] & ck_ok[None, :]
            a = tl.load(x_g + x_row[:, None] + ck[None, :], mask=a_mask, other=0.0)
            if IN_AFFINE:
                x_ch = g * Cg + ck  # absolute input channel
                a = _activated(
                    a,
                    tl.load(in_scale_ptr + x_ch, mask=ck_ok, other=0.0)[None, :],
                    tl.load(in_shift_ptr + x_ch, mask=ck_ok, other=0.0)[None, :],
                    _gate(in_gate_ptr, img[:, None], x_ch[None, :], C, a_mask, IN_GATE),
                    a_mask, x_ptr, INTERPRET,
                )
            acc = _dot_weight_rows(acc, a, rs * Cg + ck, ck_ok, w_g, offs_n, n_ok, Kg, x_ptr,
                                   INTERPRET)

    _epilogue(
        acc, offs_m, m_ok, g * Kg + offs_n, n_ok, pid_m, M, K,
        bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, count_ptr, mean_ptr, m2_ptr,
        HAS_BIAS, HAS_AFFINE, HAS_RES, RELU, SILU, STATS, INTERPRET, BLOCK_M,
    )


@triton.jit
def _conv_direct_kernel(
    x_ptr,  # input, NHWC contiguous (N, H, W, C) (IN_AFFINE: the previous conv's raw y)
    in_scale_ptr,  # (C,) fp32 prologue scale: relu(x·scale + shift) (read only if IN_AFFINE)
    in_shift_ptr,  # (C,) fp32 prologue shift (read only if IN_AFFINE)
    in_gate_ptr,  # (N, C) fp32 per-sample gate after the prologue's ReLU (read only if IN_GATE)
    w_ptr,  # weight packed as (R, S, Cg, K) contiguous: per tap and group channel, a K vector
    bias_ptr,  # (K,) conv bias in x's dtype (read only if HAS_BIAS)
    scale_ptr,  # (K,) fp32 epilogue scale (read only if HAS_AFFINE)
    shift_ptr,  # (K,) fp32 epilogue shift (read only if HAS_AFFINE)
    res_ptr,  # residual, NHWC contiguous (N, OH, OW, K) in x's dtype (read only if HAS_RES)
    out_ptr,  # output, NHWC contiguous (N, OH, OW, K) in x's dtype
    count_ptr,  # (tiles,) fp32 valid rows per tile (written only if STATS)
    mean_ptr,  # (tiles, K) fp32 per-tile channel means (written only if STATS)
    m2_ptr,  # (tiles, K) fp32 per-tile channel M2 (written only if STATS)
    M,  # output rows N·OH·OW
    H, W, C,  # input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    HAS_BIAS: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    SILU: tl.constexpr,  # SiLU instead of ReLU (never both)
    STATS: tl.constexpr,
    IN_AFFINE: tl.constexpr,  # read the input through relu(x·in_scale + in_shift) (_activated)
    IN_GATE: tl.constexpr,  # ... times in_gate[n, c] (only with IN_AFFINE)
    INTERPRET: tl.constexpr,  # running in the interpreter: work around its bf16 gaps
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_N: tl.constexpr,  # output channels per program (may span several groups)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    img = (t // OH).to(tl.int64)  # int64: later multiplied by H·W·C
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    # Each output channel reads the Cg input channels of its own group, starting here.
    c_first = (offs_k // Kg) * Cg

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(0, R * S):
        r = rs // S
        s = rs - r * S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = x_ptr + ((img * H + ih) * W + iw) * C  # [BLOCK_M] pointers, int64 offsets
        x_mask = row_ok[:, None] & k_ok[None, :]
        w_rs = w_ptr + rs * Cg * K
        for ci in range(0, Cg):
            # Neighbouring output channels of one group read the same input element (a cache
            # hit); in depthwise convolutions the reads are contiguous along the channels.
            x_ch = c_first + ci  # [BLOCK_N] absolute input channel of each output channel
            xv = tl.load(x_row[:, None] + x_ch[None, :], mask=x_mask, other=0.0)
            if IN_AFFINE:
                xv = _activated(
                    xv,
                    tl.load(in_scale_ptr + x_ch, mask=k_ok, other=0.0)[None, :],
                    tl.load(in_shift_ptr + x_ch, mask=k_ok, other=0.0)[None, :],
                    _gate(in_gate_ptr, img[:, None], x_ch[None, :], C, x_mask, IN_GATE),
                    x_mask, x_ptr, INTERPRET,
                )
            wv = tl.load(w_rs + ci * K + offs_k, mask=k_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    _epilogue(
        acc, offs_m, m_ok, offs_k, k_ok, pid_m, M, K,
        bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, count_ptr, mean_ptr, m2_ptr,
        HAS_BIAS, HAS_AFFINE, HAS_RES, RELU, SILU, STATS, INTERPRET, BLOCK_M,
    )


_gemm = _tuning.autotune(_GEMM_CONFIGS, _KEY, _prune_gemm)(_conv_gemm_kernel)
_direct = _tuning.autotune(_DIRECT_CONFIGS, _KEY, _prune_direct)(_conv_direct_kernel)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def kernel_for(c_per_group: int, groups: int) -> str:
    """Which kernel serves a convolution: ``"gemm"``, ``"gemm_flat"`` or ``"direct"``."""
    if c_per_group >= MIN_DENSE_CHANNELS:
        return "gemm"
    if groups == 1:
        return "gemm_flat"
    return "direct"


def _check_vec(
    name: str, t: torch.Tensor | None, k: int, dtype: torch.dtype, dev: torch.device
) -> None:
    if t is None:
        return
    assert t.shape == (k,), f"conv2d_fused: {name} must have shape ({k},), got {tuple(t.shape)}"
    assert t.dtype == dtype, f"conv2d_fused: {name} must be {dtype}, got {t.dtype}"
    assert t.device == dev, f"conv2d_fused: {name} is on {t.device}, x on {dev}"


_placeholders: dict[torch.device, torch.Tensor] = {}


def _f32_placeholder(device: torch.device) -> torch.Tensor:
    """One (1,) fp32 tensor per device, allocated once, passed for absent pointer arguments
    (the kernels neither read nor write it: their flags turn those accesses off)."""
    t = _placeholders.get(device)
    if t is None:
        t = _placeholders[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


def conv2d_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv: ConvParams,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    silu: bool = False,
    stats: bool = False,
    out: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    in_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Partials | None]:
    """``relu(conv2d(x, weight, bias) * scale + shift + residual)`` in one kernel, NHWC.

    ``x`` (N, C, H, W) channels_last contiguous, fp32/fp16/bf16; ``weight`` (K, C/groups, R, S)
    same dtype, any layout; ``bias`` (K,) same dtype or None; ``scale``/``shift`` (K,) fp32 or
    None (both or neither); ``residual`` (N, K, OH, OW) channels_last contiguous in x's dtype,
    added after scale/shift; ReLU (or with ``silu`` SiLU) last. With ``stats`` also returns
    :class:`Partials` of the raw output ``conv + bias`` (before scale/shift). ``out`` optionally
    receives the result (N, K, OH, OW) channels_last contiguous, x's dtype; it must not overlap
    the inputs. Returns ``(out, partials or None)``, ``out`` channels_last in x's dtype.

    ``in_scale``/``in_shift`` (C,) fp32 (both or neither) add the prologue of block-fused
    training: the convolution reads ``relu(x * in_scale + in_shift)`` in place of ``x`` (x is
    then the previous conv's raw output and the pair its BN's folded scale/shift), computed in
    fp32 and rounded to x's dtype as the stored activation would be; zero padding applies after
    the activation (a padded element is 0, not relu(in_shift)). ``in_gate`` (N, C) fp32, only
    with the prologue: the convolution reads ``relu(x * in_scale + in_shift) * in_gate[n, c]``
    (a channel gate between two convs; any sign), still rounded once to x's dtype.
    """
    cl = torch.channels_last
    assert x.dim() == 4 and weight.dim() == 4, "conv2d_fused: x and weight must be 4-D"
    assert x.dtype in DTYPES, f"conv2d_fused: unsupported dtype {x.dtype}"
    assert x.is_contiguous(memory_format=cl), "conv2d_fused: x must be channels_last contiguous"
    assert weight.dtype == x.dtype, f"conv2d_fused: weight is {weight.dtype}, x is {x.dtype}"
    assert weight.device == x.device, f"conv2d_fused: weight on {weight.device}, x on {x.device}"
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    groups = conv.groups
    assert c == cg * groups and k % groups == 0, (
        f"conv2d_fused: x {tuple(x.shape)}, weight {tuple(weight.shape)}, groups={groups} mismatch"
    )
    kg = k // groups
    oh, ow = conv.out_hw(h, w, r, s)
    assert oh > 0 and ow > 0, f"conv2d_fused: empty output {oh}x{ow}"
    assert (scale is None) == (shift is None), "conv2d_fused: pass both scale and shift or neither"
    assert not (relu and silu), "conv2d_fused: one activation, ReLU or SiLU"
    assert (in_scale is None) == (in_shift is None), (
        "conv2d_fused: pass both in_scale and in_shift or neither"
    )
    _check_vec("bias", bias, k, x.dtype, x.device)
    _check_vec("scale", scale, k, torch.float32, x.device)
    _check_vec("shift", shift, k, torch.float32, x.device)
    _check_vec("in_scale", in_scale, c, torch.float32, x.device)
    _check_vec("in_shift", in_shift, c, torch.float32, x.device)
    if in_gate is not None:
        assert in_scale is not None, "conv2d_fused: in_gate needs the prologue (in_scale, in_shift)"
        assert in_gate.shape == (n, c), (
            f"conv2d_fused: in_gate must have shape ({n}, {c}), got {tuple(in_gate.shape)}"
        )
        assert in_gate.dtype == torch.float32, (
            f"conv2d_fused: in_gate must be torch.float32, got {in_gate.dtype}"
        )
        assert in_gate.device == x.device, (
            f"conv2d_fused: in_gate is on {in_gate.device}, x on {x.device}"
        )
    # The kernels index the (K,), (C,) and (N, C) operands densely; copies only if a caller
    # passes a strided view.
    bias, scale, shift, in_scale, in_shift, in_gate = (
        None if t is None else t.contiguous()
        for t in (bias, scale, shift, in_scale, in_shift, in_gate)
    )
    if residual is not None:
        assert residual.shape == (n, k, oh, ow), (
            f"conv2d_fused: residual {tuple(residual.shape)} != output {(n, k, oh, ow)}"
        )
        assert residual.dtype == x.dtype and residual.device == x.device, (
            "conv2d_fused: residual must have x's dtype and device"
        )
        assert residual.is_contiguous(memory_format=cl), (
            "conv2d_fused: residual must be channels_last contiguous"
        )
    if x.is_cuda and not _tuning.aligned16(x):
        # A view that starts mid-vector (never a batch slice of an aligned tensor with C % 8 == 0):
        # the sm_90 TMA tiles need a 16-byte aligned input, and the tuned choice per shape does
        # not see alignment, so such an input is copied to an aligned one.
        x = x.clone(memory_format=cl)
    m = n * oh * ow
    if out is None:
        out = _alloc.empty(n, k, oh, ow, dtype=x.dtype, device=x.device, channels_last=True)
    else:
        assert out.shape == (n, k, oh, ow) and out.dtype == x.dtype and out.device == x.device, (
            f"conv2d_fused: out must be {(n, k, oh, ow)} {x.dtype} on {x.device}"
        )
        assert out.is_contiguous(memory_format=cl), "conv2d_fused: out must be channels_last"
        # Autotuning runs the kernel several times: an out aliasing an input would be corrupted.
        out_mem = out.untyped_storage().data_ptr()
        for name, t in (("x", x), ("residual", residual)):
            assert t is None or t.untyped_storage().data_ptr() != out_mem, (
                f"conv2d_fused: out must not share memory with {name}"
            )

    which = kernel_for(cg, groups)
    if which == "direct":
        # (K, Cg, R, S) -> (R, S, Cg, K): per tap and group channel, one vector over all K.
        w_packed = weight.permute(2, 3, 1, 0).contiguous()
    else:
        # (K, Cg, R, S) -> (groups, R, S, Cg, Kg): per group the (R·S·Cg, Kg) GEMM operand.
        w_packed = weight.view(groups, kg, cg, r, s).permute(0, 3, 4, 2, 1).contiguous()

    # Absent optional tensors are replaced by placeholders of the pointer type the kernel
    # declares (so the compiled variants are those compile_specs() lists); they are never read.
    f32_dummy = _f32_placeholder(x.device)
    if stats:
        max_tiles = triton.cdiv(m, _MIN_BLOCK_M)
        count = _alloc.empty(max_tiles, dtype=torch.float32, device=x.device)
        mean = _alloc.empty(max_tiles, k, dtype=torch.float32, device=x.device)
        m2 = _alloc.empty(max_tiles, k, dtype=torch.float32, device=x.device)
    else:
        count = mean = m2 = f32_dummy
    args = (
        x,
        in_scale if in_scale is not None else f32_dummy,
        in_shift if in_shift is not None else f32_dummy,
        in_gate if in_gate is not None else f32_dummy,
        w_packed,
        bias if bias is not None else out,
        scale if scale is not None else f32_dummy,
        shift if shift is not None else f32_dummy,
        residual if residual is not None else out,
        out, count, mean, m2,
        m, h, w, c, oh, ow, k, cg, kg, r, s,
        conv.stride[0], conv.stride[1], conv.padding[0], conv.padding[1],
        conv.dilation[0], conv.dilation[1],
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_AFFINE=scale is not None,
        HAS_RES=residual is not None,
        RELU=bool(relu),
        SILU=bool(silu),
        STATS=bool(stats),
        IN_AFFINE=in_scale is not None,
        IN_GATE=in_gate is not None,
        INTERPRET=_INTERPRET,
    )
    if which == "direct":
        tuner = _direct
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))
        tuner[grid](*args, **flags)
    else:
        tuner = _gemm
        if x.is_cuda:  # a TMA tile builds its descriptor on the device: Triton's scratch
            _tuning.ensure_allocator()
        grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kg, meta["BLOCK_N"]),
            groups,
        )
        tuner[grid](*args, **flags, FLAT_K=which == "gemm_flat")
    if not stats:
        return out, None

    tiles = triton.cdiv(m, tuner.last_config.kwargs["BLOCK_M"])  # the configuration that ran
    return out, Partials(count=count[:tiles], mean=mean[:tiles], m2=m2[:tiles])


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# ---------------------------------------------------------------------------------------------

_INT_ARGS = (
    "M", "H", "W", "C", "OH", "OW", "K", "Cg", "Kg", "R", "S",
    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
)

# Epilogue flag sets compiled ahead of time. "all" turns every epilogue feature on (the most
# code and registers; a flag that is off only removes code) and is compiled with every
# configuration; the real uses, training (raw output + bias + BN partials), fused eval (bias,
# folded BN scale/shift, residual, ReLU) and block-fused training (training's epilogue reading
# its input through the previous BN+ReLU, IN_AFFINE: the prologue), are compiled with each
# kernel's largest tile, as is fused eval with SiLU in place of ReLU, and the gated prologue
# (IN_GATE: a squeeze-excitation gate between two convs), with and without the statistics
# (training; a gated block run on running statistics), on the kernels a gated conv runs on
# (_GATED_KERNELS: not the flat-K stem, whose input is no block's activation).
_NO_GATE = dict(IN_AFFINE=False, IN_GATE=False)
EPILOGUES = {
    "all": dict(HAS_BIAS=True, HAS_AFFINE=True, HAS_RES=True, RELU=True, SILU=False, STATS=True,
                **_NO_GATE),
    "train": dict(HAS_BIAS=True, HAS_AFFINE=False, HAS_RES=False, RELU=False, SILU=False,
                  STATS=True, **_NO_GATE),
    "eval": dict(HAS_BIAS=True, HAS_AFFINE=True, HAS_RES=True, RELU=True, SILU=False,
                 STATS=False, **_NO_GATE),
    "prologue": dict(HAS_BIAS=True, HAS_AFFINE=False, HAS_RES=False, RELU=False, SILU=False,
                     STATS=True, IN_AFFINE=True, IN_GATE=False),
    # fused eval with SiLU (timm's '*ts' ByobNet, RegNetZ, CSP models)
    "evalsilu": dict(HAS_BIAS=True, HAS_AFFINE=True, HAS_RES=True, RELU=False, SILU=True,
                     STATS=False, **_NO_GATE),
    "gate": dict(HAS_BIAS=True, HAS_AFFINE=False, HAS_RES=False, RELU=False, SILU=False,
                 STATS=True, IN_AFFINE=True, IN_GATE=True),
    "gatenostats": dict(HAS_BIAS=True, HAS_AFFINE=False, HAS_RES=False, RELU=False, SILU=False,
                        STATS=False, IN_AFFINE=True, IN_GATE=True),
}
_GATED_KERNELS = ("gemm", "direct")
del _NO_GATE


def _geometry(
    n: int, h: int, w: int, c: int, k: int, groups: int, r: int, stride: int, pad: int
) -> dict[str, int]:
    """The kernels' integer arguments for an n x c x h x w input and k r x r filters."""
    oh, ow = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - r) // stride + 1
    return dict(
        M=n * oh * ow, H=h, W=w, C=c, OH=oh, OW=ow, K=k, Cg=c // groups, Kg=k // groups,
        R=r, S=r, stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad, dil_h=1, dil_w=1,
    )


# Shape classes a ResNet-family launch falls into, by representative arguments: a launch
# specialises on which integers are 1 and which are multiples of 16 (see launch_source).
# Channel counts are multiples of 16; spatial sizes (56, 28, 14, 7) and, for odd batches, the
# row count M are not. Batch 3 keeps M odd where the spatial size allows.
SHAPE_CLASSES = {
    # stage-4 3x3 stride 2 of ResNet-50: every geometry argument a runtime value except dilation
    "3x3s2": _geometry(3, 14, 14, 256, 256, 1, 3, 2, 1),
    # bottleneck 1x1 stride 1: filter size and stride become constants
    "1x1": _geometry(3, 14, 14, 1024, 256, 1, 1, 1, 0),
    # the 7x7 stride-2 stem on RGB (FLAT_K): 3 input channels
    "stem": _geometry(3, 224, 224, 3, 64, 1, 7, 2, 3),
    # bottleneck 3x3 stride 1 padding 1 (ResNet-50 stage 3): the TMA tiles' other shape class
    "3x3s1": _geometry(3, 28, 28, 128, 128, 1, 3, 1, 1),
    # ResNeXt-50 32x4d stage 2 grouped 3x3 stride 2 (direct kernel): 8 channels per group
    "grouped": _geometry(3, 56, 56, 256, 256, 32, 3, 2, 1),
}


def _signature(dtype: torch.dtype) -> dict[str, str]:
    p = _TL_PTR[dtype]
    sig = {
        "x_ptr": p, "in_scale_ptr": "*fp32", "in_shift_ptr": "*fp32", "in_gate_ptr": "*fp32",
        "w_ptr": p, "bias_ptr": p, "scale_ptr": "*fp32", "shift_ptr": "*fp32",
        "res_ptr": p, "out_ptr": p, "count_ptr": "*fp32", "mean_ptr": "*fp32",
        "m2_ptr": "*fp32",
    }
    sig.update({a: "i32" for a in _INT_ARGS})
    return sig


def compile_specs() -> list[CompileSpec]:
    """Every kernel x autotune configuration x dtype, for the real-target compile check.

    Each configuration is compiled with the "all" epilogue for each of its kernel's ResNet shape
    classes (``SHAPE_CLASSES``); the largest tile offered for the first class also with the
    "train", "eval", "prologue", "evalsilu" and (gemm and direct kernels) "gate" and
    "gatenostats" flag sets and, once per kernel and dtype, unspecialised (odd shapes).
    Lists the GPU configurations even under the interpreter (they are what runs on a GPU).
    """
    plain = [c for c in GPU_GEMM_CONFIGS if not c.kwargs.get("TMA")]
    tma = [c for c in GPU_GEMM_CONFIGS if c.kwargs.get("TMA")]
    kernels = [  # (_UNFIT_TILES name, kernel, configurations, extra constexprs, shape classes,
        # tensor cores)
        ("gemm", _conv_gemm_kernel, plain, {"FLAT_K": False}, ("3x3s2", "1x1"), True),
        ("gemm_flat", _conv_gemm_kernel, plain, {"FLAT_K": True}, ("stem",), True),
        ("direct", _conv_direct_kernel, GPU_DIRECT_CONFIGS, {}, ("grouped",), False),
        # the sm_90 TMA tiles, fp16/bf16, on the stride-1 classes they serve (no unspecialised
        # compile: an unaligned launch never gets them)
        ("gemm", _conv_gemm_kernel, tma, {"FLAT_K": False}, ("1x1", "3x3s1"), True),
    ]
    specs = []
    for dtype in DTYPES:
        dname = str(dtype).removeprefix("torch.")
        sig = _signature(dtype)
        for kname, kernel, cfgs, extra, classes, tensor_cores in kernels:
            first = SHAPE_CLASSES[classes[0]]
            is_tma = cfgs is tma
            if is_tma and dtype == torch.float32:
                continue
            variants = [  # (epilogue, configuration, shape class)
                *(("all", cfg, cls) for cfg in cfgs for cls in classes),
                *((epi, _largest(kname, cfgs, first, dtype, flags), classes[0])
                  for epi, flags in EPILOGUES.items()
                  if epi != "all" and (kname in _GATED_KERNELS or not flags["IN_GATE"])),
                *(() if is_tma else ((
                    "all", _largest(kname, cfgs, first, dtype, EPILOGUES["all"]), UNSPECIALISED),)),
            ]
            for epi, cfg, cls in variants:
                ints = SHAPE_CLASSES.get(cls)
                pruned = {} if ints is None else {
                    cc: why for cc in TARGETS
                    if (why := _unfit(kname, cfg, ints, dtype, cc, EPILOGUES[epi]))}
                specs.append(CompileSpec(
                    name=f"conv_{kname}-{dname}-{epi}-{_cfg_name(cfg)}-{cls}",
                    kernel=kernel,
                    signature=sig,
                    constexprs={**EPILOGUES[epi], **extra, "INTERPRET": False,
                                **({"TMA": False} if kernel is _conv_gemm_kernel else {}),
                                **cfg.kwargs},
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    ints=ints,
                    shape_class=cls,
                    tensor_cores=tensor_cores,
                    pruned=pruned,
                ))
    return specs


def _largest(
    kname: str, cfgs: list[triton.Config], ints: dict[str, int], dtype: torch.dtype,
    flags: Mapping[str, object],
) -> triton.Config:
    """The largest tile of ``kname`` offered on every target for a shape class and epilogue
    flags (else the largest)."""
    offered = [c for c in cfgs
               if not any(_unfit(kname, c, ints, dtype, cc, flags) for cc in TARGETS)]
    return max(offered or cfgs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


def _cfg_name(cfg: triton.Config) -> str:
    """``128_128_64_w8s3``; a TMA tile ``128_128_64_tma_w8s3``."""
    meta = [f"{v}" for k, v in cfg.kwargs.items() if k != "TMA"]
    if cfg.kwargs.get("TMA"):
        meta.append("tma")
    return "_".join(meta) + f"_w{cfg.num_warps}s{cfg.num_stages}"
