"""Triton convolution backward: dgrad (dx) and wgrad (dW) with dy formed while it is loaded.

The fused op's backward needs the convolution's backward applied to
``dy = γ·invstd·(g − mean(g) − ŷ·mean(g·ŷ))`` (g = dz·[z > 0]; ``γ·invstd·g`` with running
statistics). No dy tensor exists: every kernel here loads dz (and z for the ReLU mask, y for ŷ)
and builds its dy tile with ``bn._grad_g`` / ``bn._dy_coefs`` / ``bn._dy_from_g``, the one place
the formula lives on the GPU, from the per-channel sums of ``bn.reductions`` (:class:`DyOperand`).

Everything is NHWC (channels_last) and accumulates in fp32. Kernels:

* ``_dgrad_gemm_kernel`` (tensor cores; a group with >= 16 input channels, or no groups): an
  implicit GEMM over the *input* pixels: rows are input pixels, columns the Cg input channels of
  one group (group program axis), the reduction runs over filter taps x the Kg output channels.
  Strided convolutions are decomposed by stride phase (no zero-stuffing): the input pixels with
  the same (ih mod stride_h, iw mod stride_w) are reached by one fixed set of filter taps, an
  arithmetic progression per axis (``_phase_taps``), so each program loops over exactly the
  taps that contribute (1 of 9 to 4 of 9 for a stride-2 3x3) and the phase is a program axis.
  The dy operand is rounded to the input dtype before ``tl.dot`` (as PyTorch's backward rounds
  the dy tensor it materialises); fp32 operands are rounded to TF32 (conv.py's _tf32_rounded)
  for ``tl.dot``'s TF32, like cuDNN under PyTorch's
  default ``allow_tf32``.
* ``_dgrad_direct_kernel``: the same phase decomposition with CUDA-core FMAs for few channels
  per group (ResNeXt's 4-8, depthwise): each input channel reads the Kg output channels of its
  own group.
* Both dgrad kernels end in ``_dgrad_epilogue``: optionally add a shortcut's gradient, and for a
  conv inside a fused block, whose input a = relu(y·scale + shift) was never stored
  (:class:`ActInput`), store the layer before's BN-output gradient g = dx·[y·scale + shift > 0]
  instead of dx, with that BN's backward sums as per-(pixel tile, phase) partials.
* ``_wgrad_gemm_kernel``: dW^T of one group, (R·S·Cg, Kg), as a GEMM whose reduction runs over
  the N·OH·OW output pixels. ``FLAT_K`` decodes the (r, s, c) row index per element (few input
  channels: the stem); otherwise a tile covers one tap and a slab of channels.
* ``_wgrad_direct_kernel``: one (tap, group channel) pair and a block of output channels per
  program, FMAs, for few channels per group.
* ``_wgrad_sum_kernel``: the wgrad kernels split the pixel reduction into fixed chunks of rows
  (a program axis, so early layers with few weight tiles still fill the GPU) and write fp32
  partials; this kernel sums them in chunk order and writes dW in the weight's dtype and layout.

Block-fused training (``IN_AFFINE``, both wgrad kernels): x is the previous conv's raw output
and is read through the forward's activation prologue (``conv._activated``: relu(x·scale +
shift), zero padding after it, rounded to x's dtype; with ``IN_GATE`` times a per-(sample,
channel) gate after the ReLU), the activation recomputed at load rather than stored.

Determinism: no atomics; every sum runs in an order fixed by the shapes and the configuration
(the chunking does not depend on the autotuned tile), so a step is bitwise reproducible for a
given configuration. The autotuner picks a configuration once per shape and process.

The bias gradient needs no pass over dy at all (:func:`bias_grad`).

Interpreter (``TRITON_INTERPRET=1``): operands stay fp32 for ``tl.dot`` (its bf16 dot is
broken) and every autotuner has one small configuration.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ...analysis.compile import TARGETS, UNSPECIALISED, CompileSpec
from .. import _alloc, devices
from ..base import ConvParams
from . import _tuning
from .bn import (
    _act_mask,
    _cast_out,
    _dy_coefs,
    _dy_from_g,
    _finish_sums,
    _grad_g,
)
from .conv import _TL_PTR, DTYPES, SHAPE_CLASSES, _activated, _gate, _tf32_rounded, kernel_for

_INTERPRET = _tuning.INTERPRET
Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Autotuning configurations
# ---------------------------------------------------------------------------------------------

# dgrad GEMM: (rows = input pixels, columns = input channels, reduction slab of output channels)
GPU_DGRAD_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 32, 4, 4),  # narrow groups (ResNeXt: 16-32 channels per group), the stem
        # the fp32 "join" epilogue's tile on sm_80, where every wider tile spills or does not
        # fit (kernel report, _UNFIT_TILES)
        (64, 64, 32, 4, 3),
    )
]
# wgrad GEMM: (BLOCK_J rows of dW^T = (r, s, c) indices, BLOCK_N output channels, BLOCK_M pixels
# reduced per step)
GPU_WGRAD_GEMM_CONFIGS = [
    triton.Config({"BLOCK_J": bj, "BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bj, bn, bm, w, s in (
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 32, 64, 4, 3),  # narrow groups
        # the stem's flat wgrad (per-element (r, s, c) decoding of the x tile): its one tile
        # that does not spill (kernel report, _UNFIT_TILES)
        (64, 32, 32, 4, 3),
    )
]
GPU_DIRECT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in (
        (64, 32, 4, 2),
        (128, 32, 4, 2),
        (64, 64, 4, 2),
        (32, 32, 4, 2),  # fp32 dgrad: every wider tile spills (kernel report, _UNFIT_TILES)
    )
]
if _INTERPRET:
    # One small configuration each (the interpreter cannot benchmark several): 16-wide channel
    # tiles so that the tests' small channel counts cross tile boundaries, 32 pixels per tile or
    # step (the interpreter's cost is per program and loop step).
    _DGRAD_GEMM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})]
    _WGRAD_GEMM_CONFIGS = [triton.Config({"BLOCK_J": 16, "BLOCK_N": 16, "BLOCK_M": 32})]
    _DIRECT_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})]
else:
    _DGRAD_GEMM_CONFIGS = GPU_DGRAD_GEMM_CONFIGS
    _WGRAD_GEMM_CONFIGS = GPU_WGRAD_GEMM_CONFIGS
    _DIRECT_CONFIGS = GPU_DIRECT_CONFIGS

# dW elements per program of the chunk sum (a small pass over the weights); the interpreter
# pays per program, not per element.
_GPU_SUM_BLOCK = 1024
_SUM_BLOCK = 1 << 16 if _INTERPRET else _GPU_SUM_BLOCK

# wgrad splits the N·OH·OW reduction into chunks of rows: enough programs to fill a GPU
# (~4 per SM on 132 SMs), but at least this many rows per chunk, a multiple of every BLOCK_M.
_WGRAD_TARGET_PROGRAMS = 512
_MIN_CHUNK_ROWS = 1024
_CHUNK_ALIGN = 128


# Tiles the autotuner never offers for a dtype on a target, found by the kernel report
# (python -m fastres.analysis.kernel_report, bench/kernel_report.json: every configuration
# compiled as a launch on the ResNet shape classes of compile_specs specialises it), with the
# reason. Keyed (kernel, dtype, tile as in the config lists above, flags), where flags names the
# launch flags the entry holds for (_FLAG_SETS: "" every launch; the dgrad epilogue's "join"
# (HAS_ADD and ACT), "act" (ACT alone) and "add" (HAS_ADD alone); wgrad's "prologue"
# (IN_AFFINE)) -> {compute capability: why}.
_SM80_SMEM = "needs more shared memory than an sm_80 SM has (166,912 B)"
_UNFIT_TILES: dict[tuple[str, torch.dtype, tuple[int, ...], str], dict[int, str]] = {
    ("dgrad_gemm", torch.float32, (128, 64, 32), ""): {80: _SM80_SMEM},
    ("dgrad_gemm", torch.float32, (128, 32, 32), ""): {80: _SM80_SMEM},
    ("wgrad_gemm", torch.float32, (64, 128, 32), ""): {80: _SM80_SMEM},
    ("wgrad_gemm_flat", torch.float32, (64, 128, 32), ""): {80: _SM80_SMEM},
}
# (Tiles needing more shared memory than a device has per block, e.g. the fp32 GEMM tiles on the
# 99 KB classes, are dropped by the pruner's estimate against the device's own limit:
# _tuning.smem_reason.)
# ... and the tiles that spill registers (local memory), as compiled for the ResNet shape
# classes: with the "full" dy flags, and with the block-fusion variants (compiled with every
# configuration on the first shape class). fp32 operands take twice the registers (and the TF32
# rounding more); the flat wgrad also holds decoded (r, s, c) indices per element of its x tile.
# The "act", "add" and "prologue" flag sets have no entries: every configuration the other
# entries leave compiled clean with them (2026-11-30).
_SPILLS = "spills registers (kernel report)"
_JOIN_SPILLS = "spills registers with the join epilogue, add and act together (kernel report)"
for _key, _ccs in {
    ("dgrad_gemm", torch.float32, (64, 64, 64), ""): (80,),
    ("dgrad_gemm", torch.float16, (128, 32, 32), ""): (80,),  # 16 B on the 1x1 class
    ("dgrad_gemm", torch.float32, (128, 128, 32), "join"): (80, 100),  # sm_100: 56 B
    ("dgrad_gemm", torch.float32, (128, 64, 32), "join"): (90, 100),  # sm_100: 72 B
    ("dgrad_gemm", torch.float32, (64, 128, 32), "join"): (80, 90, 100),  # sm_100: 40 B
    ("dgrad_gemm", torch.float16, (128, 64, 32), "join"): (90,),
    ("dgrad_gemm", torch.bfloat16, (128, 64, 32), "join"): (80,),
    # sm_89 (8 B) and sm_120 (16 B) with the full dy flags: the one fp32 dgrad tile within
    # their 99 KB (the pruner falls back to it, see _pruner)
    ("dgrad_gemm", torch.float32, (64, 64, 32), ""): (100, 120),  # sm_100: 8 B on 1x1
    ("wgrad_gemm", torch.float32, (64, 32, 64), ""): (89,),  # 8 B
    ("dgrad_gemm", torch.float16, (64, 128, 32), ""): (100,),  # 8 B
    ("wgrad_gemm", torch.float16, (64, 64, 64), ""): (100,),  # 8 B on 1x1
    # sm_100: wgrad with the activation prologue in tiles narrower than 128x128 (150-380 B)
    **{("wgrad_gemm", _dt, _tile, "prologue"): (100,)
       for _dt in DTYPES for _tile in ((128, 64, 32), (64, 64, 64), (64, 32, 64))},
    # the direct dgrad: every fp32 tile of 16 elements per thread (sm_89 / sm_120: 64x32
    # spills 8-16 B, the others hold more per thread), and in fp16/bf16 the tiles of 16
    # elements per thread with 128 rows or 64 channels
    ("dgrad_direct", torch.float32, (64, 32), ""): (80, 89, 90, 120),
    ("dgrad_direct", torch.float32, (128, 32), ""): (80, 89, 90, 100, 120),
    ("dgrad_direct", torch.float32, (64, 64), ""): (80, 89, 90, 100, 120),
    ("dgrad_direct", torch.float16, (128, 32), ""): (80, 90, 100),
    ("dgrad_direct", torch.float16, (64, 64), ""): (80, 90, 100),
    ("dgrad_direct", torch.bfloat16, (128, 32), ""): (80, 90, 100),
    ("dgrad_direct", torch.bfloat16, (64, 64), ""): (80, 90, 100),
    # the stem's flat wgrad: every tile wider than 64 x 32 x 32, in every dtype, on every target
    # (sm_89 / sm_100 / sm_120: 128x64x32 and 64x32x64 spill 250-560 B)
    **{("wgrad_gemm_flat", _dt, _tile, ""): TARGETS
       for _dt in DTYPES for _tile in ((128, 64, 32), (64, 64, 64), (64, 32, 64))},
}.items():
    _why = _JOIN_SPILLS if _key[3] == "join" else _SPILLS
    for _cc in _ccs:
        _UNFIT_TILES.setdefault(_key, {})[_cc] = _why
del _key, _ccs, _why, _cc

# The launch flags each _UNFIT_TILES flag set stands for: its entries apply to a launch whose
# flags have these values. The kernel report compiles each with every configuration (the
# block-fusion variants of compile_specs, the heaviest way: ACT_CENTER and every dy feature on),
# so each entry is what spilled under exactly those flags: ptxas's register allocation is not
# monotonic in the code, and a tile spilling with the join's add and act together may be clean
# with either alone (fp32/fp16/bf16 128x64, fp32 64x128 and 128x128 are).
_FLAG_SETS = {
    "join": dict(HAS_ADD=True, ACT=True),  # a pre-activation block's first conv
    "act": dict(HAS_ADD=False, ACT=True),  # a block's inner convs
    "add": dict(HAS_ADD=True, ACT=False),  # a post-activation block's first conv
    "prologue": dict(IN_AFFINE=True),  # wgrad of a block's inner convs
}


# Shared memory per configuration (_tuning.SmemModel), fitted to the kernel report's compiled
# figures (the heaviest dy flags): (mma.sync targets, wgmma / tcgen05 targets). dgrad stages its
# dy operand as three loads (dz, z for the ReLU mask, y for ŷ) and the weight tile, and forms
# dy in registers (stored once more for the MMA); wgrad stages the x tile and dy's three loads.
_SMEM_MODELS = {
    "dgrad_gemm": (_tuning.SmemModel((3, 1), (1, 0), 4096),
                   _tuning.SmemModel((3, 1), (2, 1), 4096)),
    "wgrad_gemm": (_tuning.SmemModel((1, 3), (1, 1), 1024),
                   _tuning.SmemModel((1, 3), (1, 1), 2048)),
    "wgrad_gemm_flat": (_tuning.SmemModel((1, 3), (0, 2), 1024),
                        _tuning.SmemModel((1, 3), (0, 2), 2048)),
}


def smem_bytes(kname: str, cfg: triton.Config, dtype: torch.dtype | None,
               cc: int | None, gated: bool = False) -> int:
    """Shared memory (bytes, an upper estimate) configuration ``cfg`` of kernel ``kname``
    ("dgrad_gemm", "dgrad_direct", "wgrad_gemm", "wgrad_gemm_flat", "wgrad_direct") takes in
    ``dtype`` on target ``cc``. The GEMMs' A operand is rows x reduction (dgrad: BLOCK_M x
    BLOCK_K of dy; wgrad: BLOCK_J x BLOCK_M of x), B reduction x columns. ``gated``: wgrad with
    the gated prologue (IN_GATE), whose gate tile is staged like x's."""
    kw = cfg.kwargs
    if kname.endswith("direct"):
        return _tuning.reduction_smem(kw["BLOCK_N"], cfg.num_warps)
    if kname == "dgrad_gemm":
        rows, cols, depth = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    else:
        rows, cols, depth = kw["BLOCK_J"], kw["BLOCK_N"], kw["BLOCK_M"]
    cls = devices.for_target(cc) if cc is not None else None
    size = dtype.itemsize if dtype is not None else 4
    gate = _tuning.gate_smem(rows * depth, cfg.num_stages) if gated else 0
    return _tuning.gemm_smem(_SMEM_MODELS[kname], rows * depth, depth * cols, cfg.num_stages,
                             size, cls) + gate


def _flag_sets(flags: dict) -> tuple[str, ...]:
    """The _UNFIT_TILES flag sets a launch with constexpr ``flags`` falls under ("" always)."""
    return ("", *(name for name, want in _FLAG_SETS.items()
                  if all(bool(flags.get(f)) == v for f, v in want.items())))


def _unfit(kname: str, cfg: triton.Config, ints: dict, dtype: torch.dtype | None,
           cc: int | None, flags: dict | None = None, smem_limit: int | None = None
           ) -> str | None:
    """Why the autotuner does not offer ``cfg`` of kernel ``kname`` ("dgrad_gemm",
    "dgrad_direct", "wgrad_gemm", "wgrad_gemm_flat", "wgrad_direct") for a problem with integer
    arguments ``ints`` and constexpr ``flags`` on target ``cc`` (None: it does). Tiles much wider
    than the channels they span are dropped (the narrowest BLOCK_J offered is 64)."""
    kw = cfg.kwargs
    if kname.endswith("direct"):  # the channel tile spans input (dgrad) or output channels
        channels = ints["C"] if kname == "dgrad_direct" else ints["K"]
        if kw["BLOCK_N"] > max(16, triton.next_power_of_2(channels)):
            return f"BLOCK_N much wider than the {channels} channels"
    elif kname == "dgrad_gemm":
        if kw["BLOCK_N"] > max(32, triton.next_power_of_2(ints["Cg"])):
            return f"BLOCK_N much wider than the {ints['Cg']} input channels per group"
        if kw["BLOCK_K"] > max(32, triton.next_power_of_2(ints["Kg"])):
            return f"BLOCK_K much wider than the {ints['Kg']} output channels per group"
    else:
        if kw["BLOCK_N"] > max(32, triton.next_power_of_2(ints["Kg"])):
            return f"BLOCK_N much wider than the {ints['Kg']} output channels per group"
        if kname == "wgrad_gemm" and kw["BLOCK_J"] > max(64, triton.next_power_of_2(ints["Cg"])):
            return f"BLOCK_J much wider than the {ints['Cg']} input channels per group"
    return _target_reason(kname, cfg, dtype, cc, flags, smem_limit)


def _target_reason(kname: str, cfg: triton.Config, dtype: torch.dtype | None,
                   cc: int | None, flags: dict | None = None, smem_limit: int | None = None
                   ) -> str | None:
    """Why tile ``cfg`` of ``kname`` is never offered for ``dtype`` on ``cc`` with constexpr
    ``flags`` (_UNFIT_TILES), or needs more shared memory than ``smem_limit`` (default: the
    target's table figure)."""
    tile = tuple(cfg.kwargs.values())
    for fset in _flag_sets(flags or {}):
        why = _UNFIT_TILES.get((kname, dtype, tile, fset), {}).get(cc)
        if why:
            return why
    gated = bool((flags or {}).get("IN_GATE"))
    return _tuning.smem_reason(smem_bytes(kname, cfg, dtype, cc, gated), smem_limit, cc)


def _pruner(kname: str):
    """The early_config_prune function of kernel ``kname``: the configurations :func:`_unfit`
    accepts for the launch's arguments, flags, dtype and device; if none is, those the target
    can run for those flags; if none is, those that fit the device's shared memory
    (_tuning.fitting)."""
    def prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        name = "wgrad_gemm_flat" if kname == "wgrad_gemm" and kwargs.get("FLAT_K") else kname
        dz = nargs.get("dz_ptr")
        dtype, cc = getattr(dz, "dtype", None), _tuning.target(dz)
        gated = bool(kwargs.get("IN_GATE"))
        limit = _tuning.smem_limit(dz, cc)
        launchable = [c for c in configs
                      if _target_reason(name, c, dtype, cc, kwargs, limit) is None]
        return ([c for c in launchable if _unfit(name, c, nargs, dtype, cc, kwargs, limit) is None]
                or launchable
                or _tuning.fitting(configs, lambda c: smem_bytes(name, c, dtype, cc, gated),
                                   limit))
    prune.__name__ = f"_prune_{kname}"
    return prune


_prune_dgrad = _pruner("dgrad_gemm")
_prune_wgrad = _pruner("wgrad_gemm")
_prune_direct_dgrad = _pruner("dgrad_direct")
_prune_direct_wgrad = _pruner("wgrad_direct")


# What selects a configuration: the whole problem geometry and the dy flags (dtypes are added by
# the autotuner itself).
_KEY = ["M", "H", "W", "C", "K", "Cg", "Kg", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w",
        "dil_h", "dil_w", "RELU", "BATCH_STATS", "HAS_GAMMA"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

# Every kernel takes the dy operand as these nine pointers first (see DyOperand.pointers):
#   dz_ptr         (N, OH, OW, K) x dtype: gradient of the op's output z
#   z_ptr          (N, OH, OW, K) x dtype: forward output (read only if RELU)
#   y_ptr          (N, OH, OW, K) x dtype: raw conv output (read only if BATCH_STATS)
#   mean_ptr       (K,) fp32: mean used to normalise (read only if BATCH_STATS)
#   var_ptr        (K,) fp32: variance used to normalise
#   gamma_ptr      (K,) any float: BN weight (read only if HAS_GAMMA)
#   sum_g_ptr      (K,) fp32: Σg (read only if BATCH_STATS)
#   sum_gyhat_ptr  (K,) fp32: Σg·ŷ (read only if BATCH_STATS)
#   delta_ptr      (K,) fp32: centring correction δ (read only if BATCH_STATS)
# and eps (BN epsilon), M (output pixels N·OH·OW, also the BN count) and the flags RELU,
# BATCH_STATS (batch statistics: the full formula) and HAS_GAMMA.


@triton.jit
def _phase_taps(p, pad, dil, stride, R):
    """The filter taps along one axis that reach input pixels of phase ``p`` (index ≡ p mod
    stride): tap r does when p + pad − r·dil is a multiple of stride, and those r form an
    arithmetic progression. Returns ``(first, step, count)``; count 0 when no tap reaches."""
    # R means "none found yet"; as int32 tensors (R may arrive as a constexpr) so that the
    # loop-carried values keep one type
    first = tl.zeros_like(p) + R
    second = first
    for r in range(0, R):
        hit = (p + pad - r * dil) % stride == 0  # zero remainder: the same in C and floor mod
        second = tl.where(hit & (first < r) & (second == R), r, second)
        first = tl.where(hit & (first == R), r, first)
    step = tl.maximum(second - first, 1)
    count = tl.where(first >= R, 0, tl.where(second >= R, 1, (R - first + step - 1) // step))
    return first, step, count


@triton.jit
def _phase_rows(pid_m, p, NB, H, W, stride_h, stride_w, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M input pixels of stride phase ``p`` (= ph·stride_w + pw).

    Pixel i of the phase is (img, ph + ih_i·stride_h, pw + iw_i·stride_w). Returns
    ``(img int64, ih_i, iw_i, ok, ph, pw)``; ``ok`` is False past the phase's pixels.
    """
    ph = p // stride_w
    pw = p % stride_w
    hp = (H - ph + stride_h - 1) // stride_h  # input rows / columns of this phase (may be 0)
    wp = (W - pw + stride_w - 1) // stride_w
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < NB * hp * wp
    wp_safe = tl.maximum(wp, 1)  # an empty phase still decodes (every row masked)
    hp_safe = tl.maximum(hp, 1)
    iw_i = offs % wp_safe
    t = offs // wp_safe
    ih_i = t % hp_safe
    img = (t // hp_safe).to(tl.int64)  # int64: later multiplied by H·W·C
    return img, ih_i, iw_i, ok, ph, pw


@triton.jit
def _phase_tap(tap, ph, pw, ih_i, iw_i, row_ok, r0, r_step, s0, s_step, ns,
               OH, OW, pad_h, pad_w, dil_h, dil_w, stride_h, stride_w):
    """Tap number ``tap`` of the phase's progression: ``(r, s, oh, ow, ok)``, where (oh, ow) is
    the output pixel each input pixel of the tile reaches through it and ok says it exists."""
    r = r0 + (tap // ns) * r_step
    s = s0 + (tap % ns) * s_step
    # exact divisions (the phase makes them so): truncating and flooring agree
    oh = ih_i + (ph + pad_h - r * dil_h) // stride_h
    ow = iw_i + (pw + pad_w - s * dil_w) // stride_w
    ok = row_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    return r, s, oh, ow, ok


@triton.jit
def _dgrad_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: the conv-transpose of dy for these input pixels, channels
    x_idx,  # [BLOCK_M, BLOCK_N] int64: flat NHWC offsets of those elements in dx / add / act_y
    mask,  # [BLOCK_M, BLOCK_N] bool: the element exists
    ch,  # [BLOCK_N] input channel indices (of all C)
    ch_ok,  # [BLOCK_N] bool: the channel exists
    part_row,  # this program's row of the partial-sum buffers: pixel tile · phases + phase
    C,  # input channels (row stride of the partial sums)
    dx_ptr,  # out: (N, H, W, C) x dtype: dx, or g with ACT
    add_ptr,  # (N, H, W, C) x dtype: added to dx first, in fp32 (read only if HAS_ADD)
    act_y_ptr,  # (N, H, W, C) x dtype: raw output y of the layer before (read only if ACT)
    act_scale_ptr,  # (C,) fp32: that layer's BN scale (read only if ACT)
    act_shift_ptr,  # (C,) fp32: that layer's BN shift (read only if ACT)
    act_mean_ptr,  # (C,) fp32: the mean that normalised y (read only if ACT)
    part_g_ptr,  # (P, C) fp32 out: per-tile Σg (written only if ACT)
    part_gy_ptr,  # (P, C) fp32 out: per-tile Σg·(y − mean) (written only if ACT)
    part_y_ptr,  # (P, C) fp32 out: per-tile Σ(y − mean) (written only if ACT_CENTER)
    HAS_ADD: tl.constexpr,  # join a shortcut's gradient (identity or projection dgrad)
    ACT: tl.constexpr,  # the input was a = relu(y·scale + shift), never stored: store g, sums
    ACT_CENTER: tl.constexpr,  # with ACT, that BN used batch statistics: also Σ(y − mean)
):
    """Store dx, or with ACT fuse the layer before's dReLU and the first pass of its dBN.

    In a fused block the conv's input a = relu(y·scale + shift) only ever existed in the
    consuming conv's load prologue, so its gradient does not need storing either: what the
    layer before needs is g = dx·[y·scale + shift > 0] (its BN output's gradient) and the
    per-channel Σg, Σg·(y − mean), Σ(y − mean) of ``bn._bn_bwd_reduce_kernel``, here per
    (pixel tile, stride phase) row, finished by ``bn._bn_bwd_sum_kernel``: no pass of its own.
    The sums are of g as stored (rounded to the dtype), the g that dy is then formed from, so
    Σdy = 0 holds for the values actually used, as in ``bn.reductions`` over a stored dz.
    """
    if HAS_ADD:
        acc += tl.load(add_ptr + x_idx, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        y = tl.load(act_y_ptr + x_idx, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(act_scale_ptr + ch, mask=ch_ok, other=0.0)
        shift = tl.load(act_shift_ptr + ch, mask=ch_ok, other=0.0)
        mean = tl.load(act_mean_ptr + ch, mask=ch_ok, other=0.0)
        g = _cast_out(
            tl.where(mask & _act_mask(y, scale[None, :], shift[None, :]), acc, 0.0), dx_ptr
        )
        tl.store(dx_ptr + x_idx, g, mask=mask)
        g = g.to(tl.float32)
        d = tl.where(mask, y - mean[None, :], 0.0)  # centred before multiplying (mean ≫ std)
        out = part_row.to(tl.int64) * C + ch
        tl.store(part_g_ptr + out, tl.sum(g, axis=0), mask=ch_ok)
        tl.store(part_gy_ptr + out, tl.sum(g * d, axis=0), mask=ch_ok)
        if ACT_CENTER:
            tl.store(part_y_ptr + out, tl.sum(d, axis=0), mask=ch_ok)
    else:
        tl.store(dx_ptr + x_idx, _cast_out(acc, dx_ptr), mask=mask)


@triton.jit
def _dgrad_gemm_kernel(
    dz_ptr, z_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
    w_ptr,  # weight packed as (groups, R, S, Kg, Cg) contiguous: per group and tap (Kg, Cg)
    dx_ptr,  # out: input gradient, NHWC contiguous (N, H, W, C) in x's dtype (g with ACT)
    add_ptr, act_y_ptr, act_scale_ptr, act_shift_ptr, act_mean_ptr,  # the epilogue (see
    part_g_ptr, part_gy_ptr, part_y_ptr,  # _dgrad_epilogue)
    M,  # output pixels N·OH·OW (the BN count)
    NB, H, W, C,  # batch, input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    eps,
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_ADD: tl.constexpr,
    ACT: tl.constexpr,
    ACT_CENTER: tl.constexpr,
    INTERPRET: tl.constexpr,  # running in the interpreter: fp32 tl.dot operands
    BLOCK_M: tl.constexpr,  # input pixels (of one phase) per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # output channels per reduction slab
):
    # Axis 0 walks (pixel tile, channel tile) pairs, channel tile fastest; axis 1 is the group,
    # axis 2 the stride phase.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_n = tl.cdiv(Cg, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    img, ih_i, iw_i, row_ok, ph, pw = _phase_rows(
        pid_m, tl.program_id(2), NB, H, W, stride_h, stride_w, BLOCK_M
    )
    r0, r_step, nr = _phase_taps(ph, pad_h, dil_h, stride_h, R)
    s0, s_step, ns = _phase_taps(pw, pad_w, dil_w, stride_w, S)

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < Cg
    offs_kk = tl.arange(0, BLOCK_K)
    w_g = w_ptr + g.to(tl.int64) * (R * S * Kg * Cg)  # this group's packed weights

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One loop over (contributing tap, output-channel slab) pairs, so the pipeliner overlaps
    # loads with tl.dot across taps too (as the forward kernel does).
    n_slabs = tl.cdiv(Kg, BLOCK_K)
    for it in range(0, nr * ns * n_slabs):
        tap = it // n_slabs
        k0 = (it - tap * n_slabs) * BLOCK_K
        r, s, oh, ow, ok = _phase_tap(
            tap, ph, pw, ih_i, iw_i, row_ok, r0, r_step, s0, s_step, ns,
            OH, OW, pad_h, pad_w, dil_h, dil_w, stride_h, stride_w,
        )
        kk = k0 + offs_kk
        kk_ok = kk < Kg
        ch = g * Kg + kk
        a_c, mean_g, c_c, mean, delta = _dy_coefs(
            ch, kk_ok, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
            M, eps, HAS_GAMMA, BATCH_STATS,
        )
        idx = (((img * OH + oh) * OW + ow) * K)[:, None] + ch[None, :]
        mask = ok[:, None] & kk_ok[None, :]
        dy = _dy_from_g(
            _grad_g(dz_ptr, z_ptr, idx, mask, RELU), y_ptr, idx, mask, a_c[None, :],
            mean_g[None, :], c_c[None, :], mean[None, :], delta[None, :], BATCH_STATS,
        )
        b = tl.load(
            w_g + ((r * S + s) * Kg + kk)[:, None] * Cg + offs_c[None, :],
            mask=kk_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 products are exact
            b = b.to(tl.float32)
        else:
            dy = dy.to(b.dtype)
            if w_ptr.dtype.element_ty == tl.float32:  # TF32 tensor cores: round, not truncate
                dy = _tf32_rounded(dy)
                b = _tf32_rounded(b)
        acc = tl.dot(dy, b, acc)

    ih = ph + ih_i * stride_h
    iw = pw + iw_i * stride_w
    x_row = ((img * H + ih) * W + iw) * C + g * Cg
    _dgrad_epilogue(
        acc, x_row[:, None] + offs_c[None, :], row_ok[:, None] & c_ok[None, :], g * Cg + offs_c,
        c_ok, pid_m * tl.num_programs(2) + tl.program_id(2), C,
        dx_ptr, add_ptr, act_y_ptr, act_scale_ptr, act_shift_ptr, act_mean_ptr,
        part_g_ptr, part_gy_ptr, part_y_ptr, HAS_ADD, ACT, ACT_CENTER,
    )


@triton.jit
def _dgrad_direct_kernel(
    dz_ptr, z_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
    w_ptr,  # weight packed as (R, S, Kg, C): [r, s, kk, c] = W[(c // Cg)·Kg + kk, c % Cg, r, s]
    dx_ptr,  # out: input gradient, NHWC contiguous (N, H, W, C) in x's dtype (g with ACT)
    add_ptr, act_y_ptr, act_scale_ptr, act_shift_ptr, act_mean_ptr,  # the epilogue (see
    part_g_ptr, part_gy_ptr, part_y_ptr,  # _dgrad_epilogue)
    M,  # output pixels N·OH·OW (the BN count)
    NB, H, W, C,  # batch, input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    eps,
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_ADD: tl.constexpr,
    ACT: tl.constexpr,
    ACT_CENTER: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels (of one phase) per program
    BLOCK_N: tl.constexpr,  # input channels per program (may span several groups)
):
    img, ih_i, iw_i, row_ok, ph, pw = _phase_rows(
        tl.program_id(0), tl.program_id(2), NB, H, W, stride_h, stride_w, BLOCK_M
    )
    r0, r_step, nr = _phase_taps(ph, pad_h, dil_h, stride_h, R)
    s0, s_step, ns = _phase_taps(pw, pad_w, dil_w, stride_w, S)
    offs_c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C
    k_first = (offs_c // Cg) * Kg  # first output channel of each input channel's group

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, nr * ns):
        r, s, oh, ow, ok = _phase_tap(
            tap, ph, pw, ih_i, iw_i, row_ok, r0, r_step, s0, s_step, ns,
            OH, OW, pad_h, pad_w, dil_h, dil_w, stride_h, stride_w,
        )
        dy_row = ((img * OH + oh) * OW + ow) * K
        mask = ok[:, None] & c_ok[None, :]
        w_tap = w_ptr + (r * S + s) * Kg * C
        for kk in range(0, Kg):
            ch = k_first + kk
            a_c, mean_g, c_c, mean, delta = _dy_coefs(
                ch, c_ok, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
                M, eps, HAS_GAMMA, BATCH_STATS,
            )
            idx = dy_row[:, None] + ch[None, :]
            dy = _dy_from_g(
                _grad_g(dz_ptr, z_ptr, idx, mask, RELU), y_ptr, idx, mask, a_c[None, :],
                mean_g[None, :], c_c[None, :], mean[None, :], delta[None, :], BATCH_STATS,
            )
            wv = tl.load(w_tap + kk * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            acc += dy * wv[None, :]

    ih = ph + ih_i * stride_h
    iw = pw + iw_i * stride_w
    x_row = ((img * H + ih) * W + iw) * C
    _dgrad_epilogue(
        acc, x_row[:, None] + offs_c[None, :], row_ok[:, None] & c_ok[None, :], offs_c, c_ok,
        tl.program_id(0) * tl.num_programs(2) + tl.program_id(2), C,
        dx_ptr, add_ptr, act_y_ptr, act_scale_ptr, act_shift_ptr, act_mean_ptr,
        part_g_ptr, part_gy_ptr, part_y_ptr, HAS_ADD, ACT, ACT_CENTER,
    )


@triton.jit
def _output_pixels(m0, row_end, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M: tl.constexpr):
    """Output pixels [m0, m0 + BLOCK_M) of a chunk ending at row_end: ``(offs_m int64, ok, img
    int64, ih0, iw0)``, (ih0, iw0) the input pixel under filter tap (0, 0)."""
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    ok = offs_m < row_end
    ow = (offs_m % OW).to(tl.int32)
    t = offs_m // OW
    oh = (t % OH).to(tl.int32)
    img = t // OH
    return offs_m, ok, img, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def _wgrad_gemm_kernel(
    dz_ptr, z_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
    x_ptr,  # input, NHWC contiguous (N, H, W, C) (IN_AFFINE: the previous conv's raw y)
    in_scale_ptr,  # (C,) fp32 prologue scale: relu(x·scale + shift) (read only if IN_AFFINE)
    in_shift_ptr,  # (C,) fp32 prologue shift (read only if IN_AFFINE)
    in_gate_ptr,  # (N, C) fp32 per-sample gate after the prologue's ReLU (read only if IN_GATE)
    part_ptr,  # out: (chunks, groups, R·S·Cg, Kg) fp32 partial dW^T per chunk of output pixels
    M,  # output pixels N·OH·OW (the BN count and the reduction length)
    H, W, C,  # input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    rows_per_chunk,  # program (·, ·, q) reduces output pixels [q·rows_per_chunk, ...) of M
    eps,
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    IN_AFFINE: tl.constexpr,  # read x through relu(x·in_scale + in_shift) (conv._activated)
    IN_GATE: tl.constexpr,  # ... times in_gate[n, c] (only with IN_AFFINE)
    FLAT_K: tl.constexpr,  # rows j = (r·S + s)·Cg + c decoded per element (few input channels)
    INTERPRET: tl.constexpr,  # running in the interpreter: fp32 tl.dot operands
    BLOCK_J: tl.constexpr,  # rows of dW^T ((r, s, c) indices) per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_M: tl.constexpr,  # output pixels reduced per step
):
    # Axis 0 walks (row tile, channel tile) pairs, channel tile fastest; axis 1 is the group,
    # axis 2 the chunk of output pixels.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.program_id(2)
    num_n = tl.cdiv(Kg, BLOCK_N)
    pid_j = pid // num_n
    pid_n = pid % num_n
    if FLAT_K:
        offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = offs_j < R * S * Cg
        c = offs_j % Cg
        rs = offs_j // Cg
        dr = (rs // S) * dil_h  # [BLOCK_J] offsets of each row's tap
        ds = (rs % S) * dil_w
    else:  # one tap and a slab of its channels per tile
        n_cs = tl.cdiv(Cg, BLOCK_J)
        rs = pid_j // n_cs
        c = (pid_j - rs * n_cs) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = c < Cg
        offs_j = rs * Cg + c
        dr = (rs // S) * dil_h  # scalars
        ds = (rs % S) * dil_w
    x_ch = g * Cg + c
    if IN_AFFINE:  # the rows' channels are fixed for the whole reduction
        in_scale = tl.load(in_scale_ptr + x_ch, mask=j_ok, other=0.0)[:, None]
        in_shift = tl.load(in_shift_ptr + x_ch, mask=j_ok, other=0.0)[:, None]

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Kg
    ch = g * Kg + offs_n
    a_c, mean_g, c_c, mean, delta = _dy_coefs(
        ch, n_ok, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
        M, eps, HAS_GAMMA, BATCH_STATS,
    )

    acc = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    row_begin = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, M)
    for m0 in range(row_begin, row_end, BLOCK_M):
        offs_m, m_ok, img, ih0, iw0 = _output_pixels(
            m0, row_end, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M
        )
        # x^T tile [BLOCK_J, BLOCK_M]: row j is input channel c under tap (r, s)
        if FLAT_K:
            ih = ih0[None, :] + dr[:, None]
            iw = iw0[None, :] + ds[:, None]
            a_mask = j_ok[:, None] & m_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = ((img[None, :] * H + ih) * W + iw) * C + x_ch[:, None]
        else:
            ih = ih0 + dr
            iw = iw0 + ds
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_mask = j_ok[:, None] & pix_ok[None, :]
            a_off = (((img * H + ih) * W + iw) * C)[None, :] + x_ch[:, None]
        a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
        if IN_AFFINE:
            # x^T tile: columns are pixels, so the gate's sample runs along axis 1
            gate = _gate(in_gate_ptr, img[None, :], x_ch[:, None], C, a_mask, IN_GATE)
            a = _activated(a, in_scale, in_shift, gate, a_mask, x_ptr, INTERPRET)
        idx = (offs_m * K)[:, None] + ch[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        dy = _dy_from_g(
            _grad_g(dz_ptr, z_ptr, idx, mask, RELU), y_ptr, idx, mask, a_c[None, :],
            mean_g[None, :], c_c[None, :], mean[None, :], delta[None, :], BATCH_STATS,
        )
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 products are exact
            a = a.to(tl.float32)
        else:
            dy = dy.to(a.dtype)
            if x_ptr.dtype.element_ty == tl.float32:  # TF32 tensor cores: round, not truncate
                a = _tf32_rounded(a)
                dy = _tf32_rounded(dy)
        acc = tl.dot(a, dy, acc)

    rsc = R * S * Cg
    out = part_ptr + (chunk.to(tl.int64) * tl.num_programs(1) + g) * rsc * Kg
    tl.store(
        out + offs_j[:, None] * Kg + offs_n[None, :], acc, mask=j_ok[:, None] & n_ok[None, :]
    )


@triton.jit
def _wgrad_direct_kernel(
    dz_ptr, z_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
    x_ptr,  # input, NHWC contiguous (N, H, W, C) (IN_AFFINE: the previous conv's raw y)
    in_scale_ptr,  # (C,) fp32 prologue scale: relu(x·scale + shift) (read only if IN_AFFINE)
    in_shift_ptr,  # (C,) fp32 prologue shift (read only if IN_AFFINE)
    in_gate_ptr,  # (N, C) fp32 per-sample gate after the prologue's ReLU (read only if IN_GATE)
    part_ptr,  # out: (chunks, R·S·Cg, K) fp32 partial dW per chunk of output pixels
    M,  # output pixels N·OH·OW (the BN count and the reduction length)
    H, W, C,  # input height, width, channels (all groups)
    OH, OW, K,  # output height, width, channels (all groups)
    Cg, Kg,  # input / output channels per group
    R, S,  # filter height, width
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # convolution geometry
    rows_per_chunk,  # program (·, ·, q) reduces output pixels [q·rows_per_chunk, ...) of M
    eps,
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    IN_AFFINE: tl.constexpr,  # read x through relu(x·in_scale + in_shift) (conv._activated)
    IN_GATE: tl.constexpr,  # ... times in_gate[n, c] (only with IN_AFFINE)
    INTERPRET: tl.constexpr,  # running in the interpreter: its fp32 -> bf16 conversion truncates
    BLOCK_M: tl.constexpr,  # output pixels reduced per step
    BLOCK_N: tl.constexpr,  # output channels per program (may span several groups)
):
    # Axis 1 is the dW row j = (r·S + s)·Cg + c: one tap and one channel of every group.
    offs_k = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    j = tl.program_id(1)
    chunk = tl.program_id(2)
    c = j % Cg
    rs = j // Cg
    dr = (rs // S) * dil_h
    ds = (rs % S) * dil_w
    x_ch = (offs_k // Kg) * Cg + c  # each output channel reads channel c of its own group
    if IN_AFFINE:  # the channels are fixed for the whole reduction
        in_scale = tl.load(in_scale_ptr + x_ch, mask=k_ok, other=0.0)[None, :]
        in_shift = tl.load(in_shift_ptr + x_ch, mask=k_ok, other=0.0)[None, :]
    a_c, mean_g, c_c, mean, delta = _dy_coefs(
        offs_k, k_ok, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
        M, eps, HAS_GAMMA, BATCH_STATS,
    )
    # elementwise accumulator, reduced over the pixels once at the end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_begin = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, M)
    for m0 in range(row_begin, row_end, BLOCK_M):
        offs_m, m_ok, img, ih0, iw0 = _output_pixels(
            m0, row_end, OH, OW, stride_h, stride_w, pad_h, pad_w, BLOCK_M
        )
        ih = ih0 + dr
        iw = iw0 + ds
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_mask = pix_ok[:, None] & k_ok[None, :]
        xv = tl.load(
            x_ptr + (((img * H + ih) * W + iw) * C)[:, None] + x_ch[None, :],
            mask=x_mask,
            other=0.0,
        )
        if IN_AFFINE:
            gate = _gate(in_gate_ptr, img[:, None], x_ch[None, :], C, x_mask, IN_GATE)
            xv = _activated(xv, in_scale, in_shift, gate, x_mask, x_ptr, INTERPRET)
        idx = (offs_m * K)[:, None] + offs_k[None, :]
        mask = m_ok[:, None] & k_ok[None, :]
        dy = _dy_from_g(
            _grad_g(dz_ptr, z_ptr, idx, mask, RELU), y_ptr, idx, mask, a_c[None, :],
            mean_g[None, :], c_c[None, :], mean[None, :], delta[None, :], BATCH_STATS,
        )
        acc += xv.to(tl.float32) * dy
    out = part_ptr + (chunk.to(tl.int64) * tl.num_programs(1) + j) * K
    tl.store(out + offs_k, tl.sum(acc, axis=0), mask=k_ok)


@triton.jit
def _wgrad_sum_kernel(
    part_ptr,  # (chunks, ...) fp32 partials of the wgrad kernels, chunk_stride apart
    dw_ptr,  # out: (K, Cg, R, S) contiguous weight gradient in the weight's dtype
    chunks,  # number of partials per element, summed in order 0, 1, ...
    chunk_stride,  # elements per chunk (K·Cg·R·S)
    Cg, Kg,  # input / output channels per group
    RS,  # filter taps R·S
    total,  # K·Cg·R·S
    group_stride,  # partial offset of group g: g·group_stride ...
    row_stride,  # ... + j·row_stride for row j = rs·Cg + c, + the channel within the group
    BLOCK: tl.constexpr,  # dW elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    k = offs // (Cg * RS)
    rest = offs - k * (Cg * RS)
    c = rest // RS
    rs = rest - c * RS
    src = (k // Kg) * group_stride + (rs * Cg + c) * row_stride + k % Kg
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + src
    for _ in range(0, chunks):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += chunk_stride  # pointer arithmetic is 64-bit: chunks·chunk_stride may pass 2^31
    tl.store(dw_ptr + offs, _cast_out(acc, dw_ptr), mask=ok)


_DGRAD_KEY = [*_KEY, "HAS_ADD", "ACT", "ACT_CENTER"]
_dgrad_gemm = _tuning.autotune(_DGRAD_GEMM_CONFIGS, _DGRAD_KEY, _prune_dgrad)(_dgrad_gemm_kernel)
_dgrad_direct = _tuning.autotune(
    _DIRECT_CONFIGS, _DGRAD_KEY, _prune_direct_dgrad
)(_dgrad_direct_kernel)
_wgrad_gemm = _tuning.autotune(
    _WGRAD_GEMM_CONFIGS, [*_KEY, "rows_per_chunk", "IN_AFFINE", "IN_GATE"], _prune_wgrad
)(_wgrad_gemm_kernel)
_wgrad_direct = _tuning.autotune(
    _DIRECT_CONFIGS, [*_KEY, "rows_per_chunk", "IN_AFFINE", "IN_GATE"], _prune_direct_wgrad
)(_wgrad_direct_kernel)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DyOperand:
    """What dy = dBN(dReLU(dz)) is formed from: the per-element tensors and the per-channel
    constants (``bn.reductions``). All activations (N, K, OH, OW) channels_last contiguous."""

    dz: Tensor  # gradient of the op's output, x's dtype
    z: Tensor | None  # forward output, for the ReLU mask; None without ReLU
    y: Tensor  # raw conv output (read with batch statistics)
    mean: Tensor  # (K,) fp32
    var: Tensor  # (K,) fp32
    gamma: Tensor | None  # (K,) BN weight, None without affine
    sums: tuple[Tensor, Tensor, Tensor | None] | None  # (Σg, Σg·ŷ, δ), or None
    batch_stats: bool  # mean/var are this batch's: the full formula (needs sums with δ)
    eps: float

    def __post_init__(self) -> None:
        assert not self.batch_stats or (self.sums is not None and self.sums[2] is not None), (
            "DyOperand: batch statistics need bn.reductions' sums, δ included"
        )

    def pointers(self) -> tuple[Tensor, ...]:
        """The nine dy pointer arguments of every kernel here (placeholders are never read)."""
        dz, var = self.dz, self.var
        sum_g, sum_gyhat, delta = self.sums if self.batch_stats else (var, var, var)
        return (
            dz, self.z if self.z is not None else dz, self.y, self.mean, var,
            self.gamma.contiguous() if self.gamma is not None else var,
            sum_g, sum_gyhat, delta,
        )

    def flags(self) -> dict[str, bool]:
        return dict(RELU=self.z is not None, BATCH_STATS=self.batch_stats,
                    HAS_GAMMA=self.gamma is not None)


def _geometry(conv: ConvParams) -> tuple[int, ...]:
    return (*conv.stride, *conv.padding, *conv.dilation)


@dataclasses.dataclass
class ActInput:
    """A conv input that was never stored: a = relu(y·scale + shift), the activation of the
    layer before inside a fused block (y its raw conv output, (scale, shift) its BN's affine
    map). Given to :func:`dgrad`, whose epilogue then applies that layer's dReLU and takes its
    BN backward sums. All per-channel tensors (C,) fp32."""

    y: Tensor  # (N, C, H, W) channels_last in x's dtype: raw output of the layer before
    scale: Tensor  # that layer's BN scale γ·invstd
    shift: Tensor  # that layer's BN shift β − mean·scale
    mean: Tensor  # the mean its BN normalised with (batch or running)
    var: Tensor  # the variance its BN normalised with
    eps: float
    batch_stats: bool  # mean/var are this batch's: δ is taken too (see bn._bn_bwd_sum_kernel)


def dgrad(
    op: DyOperand, weight: Tensor, conv: ConvParams, x_shape: torch.Size, *,
    add: Tensor | None = None, act: ActInput | None = None,
):
    """The input gradient (N, C, H, W) channels_last in the weight's dtype: conv-transpose of dy.

    ``add`` ((N, C, H, W) channels_last, the weight's dtype): added to the computed dx in fp32
    before anything else (joining a shortcut's gradient).

    ``act``: the input was ``relu(act.y·scale + shift)``. Then the result is ``(g, sums)``: g =
    (dx + add)·[y·scale + shift > 0] (the gradient of that layer's BN output, in place of dx)
    and ``sums = (Σg, Σg·ŷ, δ)`` of that layer's BN (δ None without batch statistics), what
    ``bn.reductions(dx + add, y, a, mean, var, relu=True, ...)`` returns; so
    ``DyOperand(g, None, y, mean, var, γ, sums, batch_stats, eps)`` is that layer's dy.
    The sums are per-tile partials written once each by the dgrad programs (rows = pixel tile ·
    phases + phase, no atomics) and summed in a fixed order by ``bn._bn_bwd_sum_kernel``.
    """
    n, c, h, w = x_shape
    k, cg, r, s = weight.shape
    groups = conv.groups
    kg = k // groups
    _, _, oh, ow = op.dz.shape
    sh, sw = conv.stride
    dev = weight.device
    dx = _alloc.empty(n, c, h, w, dtype=weight.dtype, device=dev, channels_last=True)
    ints = (n * oh * ow, n, h, w, c, oh, ow, k, cg, kg, r, s, *_geometry(conv))
    # rows of the largest stride phase (phase (0, 0))
    m_phase = n * triton.cdiv(h, sh) * triton.cdiv(w, sw)
    direct = kernel_for(cg, groups) == "direct"
    tuner = _dgrad_direct if direct else _dgrad_gemm

    for t in (add, act.y if act is not None else None):
        if t is not None:
            assert tuple(t.shape) == (n, c, h, w) and t.dtype == weight.dtype, (
                f"dgrad: add / act.y must be {(n, c, h, w)} {weight.dtype}, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
            assert t.is_contiguous(memory_format=torch.channels_last), "need channels_last"
    f32 = torch.float32
    parts: tuple[Tensor, ...] = (dx, dx, dx)  # placeholders: never written without ACT
    act_args: tuple[Tensor, ...] = (dx, dx, dx, dx)  # placeholders: never read without ACT
    if act is not None:
        # one row per (pixel tile, phase): sized for the smallest BLOCK_M any configuration has,
        # sliced below to the rows the configuration that ran wrote
        min_bm = min(cfg.kwargs["BLOCK_M"] for cfg in tuner.configs)
        p_max = triton.cdiv(m_phase, min_bm) * sh * sw
        parts = tuple(_alloc.empty(p_max, c, dtype=f32, device=dev) for _ in range(3))
        act_args = (act.y, act.scale.float().contiguous(), act.shift.float().contiguous(),
                    act.mean.float().contiguous())
    epilogue = (add if add is not None else dx, *act_args, *parts)
    flags = dict(**op.flags(), HAS_ADD=add is not None, ACT=act is not None,
                 ACT_CENTER=act is not None and act.batch_stats)
    if direct:
        # (K, Cg, R, S) -> (R, S, Kg, C): per tap and output channel of a group, a C vector
        w_packed = weight.view(groups, kg, cg, r, s).permute(3, 4, 1, 0, 2).reshape(r, s, kg, c)
        grid = lambda meta: (
            triton.cdiv(m_phase, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), sh * sw
        )
        _dgrad_direct[grid](
            *op.pointers(), w_packed.contiguous(), dx, *epilogue, *ints, op.eps, **flags
        )
    else:
        # (K, Cg, R, S) -> (groups, R, S, Kg, Cg): per group and tap the (Kg, Cg) GEMM operand
        w_packed = weight.view(groups, kg, cg, r, s).permute(0, 3, 4, 1, 2).contiguous()
        grid = lambda meta: (
            triton.cdiv(m_phase, meta["BLOCK_M"]) * triton.cdiv(cg, meta["BLOCK_N"]),
            groups,
            sh * sw,
        )
        _dgrad_gemm[grid](
            *op.pointers(), w_packed, dx, *epilogue, *ints, op.eps, **flags,
            INTERPRET=_INTERPRET,
        )
    if act is None:
        return dx
    rows = triton.cdiv(m_phase, tuner.last_config.kwargs["BLOCK_M"]) * sh * sw
    part_g, part_gy, part_y = (t[:rows] for t in parts)
    return dx, _finish_sums(part_g, part_gy, part_y, act.var.float().contiguous(), n * h * w,
                            act.eps, act.batch_stats)


def _rows_per_chunk(m: int, weight_tiles: int) -> int:
    """Output pixels per wgrad chunk: enough chunks that weight_tiles x chunks programs fill
    the GPU, each at least _MIN_CHUNK_ROWS rows, a multiple of _CHUNK_ALIGN (so the chunking,
    and with it the summation order, does not depend on the autotuned configuration)."""
    chunks = max(1, min(triton.cdiv(_WGRAD_TARGET_PROGRAMS, weight_tiles),
                        triton.cdiv(m, _MIN_CHUNK_ROWS)))
    return triton.cdiv(triton.cdiv(m, chunks), _CHUNK_ALIGN) * _CHUNK_ALIGN


def _weight_tiles(which: str, rsc: int, k: int, kg: int) -> int:
    """Nominal weight tiles of a wgrad launch with ``kernel_for`` result ``which`` (R·S·Cg rows,
    K output channels, Kg per group): nominal sizes, so the chunking does not depend on the
    configuration."""
    if which == "direct":
        return rsc * triton.cdiv(k, 32)
    return (k // kg) * triton.cdiv(rsc, 64) * triton.cdiv(kg, 64)  # 64 x 64 tiles per group


def wgrad(
    op: DyOperand, x: Tensor, weight: Tensor, conv: ConvParams,
    rows_per_chunk: int | None = None, *,
    x_scale: Tensor | None = None, x_shift: Tensor | None = None, x_gate: Tensor | None = None,
) -> Tensor:
    """The weight gradient (K, Cg, R, S) contiguous in the weight's dtype, deterministic.

    ``rows_per_chunk`` overrides how many output pixels each partial covers (tests).
    ``x_scale``/``x_shift`` (C,) fp32 (both or neither): the convolution read its input through
    the prologue ``relu(x * x_scale + x_shift)`` (conv2d_fused's ``in_scale``/``in_shift``), so
    wgrad recomputes that activation while loading x, the same way (rounded to x's dtype, zero
    padding after the activation), instead of reading a stored activation. ``x_gate`` (N, C)
    fp32, only with them: the input was ``relu(x * x_scale + x_shift) * x_gate[n, c]``
    (conv2d_fused's ``in_gate``).
    """
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    assert (x_scale is None) == (x_shift is None), "wgrad: pass both x_scale and x_shift or neither"
    for name, t in (("x_scale", x_scale), ("x_shift", x_shift)):
        assert t is None or (t.shape == (c,) and t.dtype == torch.float32
                             and t.device == x.device), f"wgrad: {name} must be ({c},) fp32"
    if x_gate is not None:
        assert x_scale is not None, "wgrad: x_gate needs the prologue (x_scale, x_shift)"
        assert x_gate.shape == (n, c), (
            f"wgrad: x_gate must have shape ({n}, {c}), got {tuple(x_gate.shape)}"
        )
        assert x_gate.dtype == torch.float32, f"wgrad: x_gate must be fp32, got {x_gate.dtype}"
        assert x_gate.device == x.device, f"wgrad: x_gate is on {x_gate.device}, x on {x.device}"
    groups = conv.groups
    kg = k // groups
    _, _, oh, ow = op.dz.shape
    m = n * oh * ow
    rsc = r * s * cg
    which = kernel_for(cg, groups)
    rows = rows_per_chunk or _rows_per_chunk(m, _weight_tiles(which, rsc, k, kg))
    chunks = triton.cdiv(m, rows)
    part = _alloc.empty(chunks, rsc * k, dtype=torch.float32, device=x.device)
    ints = (m, h, w, c, oh, ow, k, cg, kg, r, s, *_geometry(conv), rows)
    in_affine = x_scale is not None
    in_gate = x_gate is not None
    placeholder = op.var  # an fp32 tensor on the device, never read without IN_AFFINE / IN_GATE
    x_args = (
        x,
        x_scale.contiguous() if in_affine else placeholder,
        x_shift.contiguous() if in_affine else placeholder,
        x_gate.contiguous() if in_gate else placeholder,
    )
    if which == "direct":
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_N"]), rsc, chunks)
        _wgrad_direct[grid](
            *op.pointers(), *x_args, part, *ints, op.eps, **op.flags(), IN_AFFINE=in_affine,
            IN_GATE=in_gate, INTERPRET=_INTERPRET,
        )
        group_stride, row_stride = kg, k  # partial layout (chunks, R·S·Cg, K)
    else:
        flat = which == "gemm_flat"

        def grid(meta):
            bj = meta["BLOCK_J"]
            j_tiles = triton.cdiv(rsc, bj) if flat else r * s * triton.cdiv(cg, bj)
            return (j_tiles * triton.cdiv(kg, meta["BLOCK_N"]), groups, chunks)

        _wgrad_gemm[grid](
            *op.pointers(), *x_args, part, *ints, op.eps, **op.flags(),
            IN_AFFINE=in_affine, IN_GATE=in_gate, FLAT_K=flat, INTERPRET=_INTERPRET,
        )
        group_stride, row_stride = rsc * kg, kg  # partial layout (chunks, groups, R·S·Cg, Kg)
    dw = _alloc.empty(k, cg, r, s, dtype=weight.dtype, device=weight.device)
    total = k * rsc
    _wgrad_sum_kernel[(triton.cdiv(total, _SUM_BLOCK),)](
        part, dw, chunks, rsc * k, cg, kg, r * s, total, group_stride, row_stride,
        BLOCK=_SUM_BLOCK,
    )
    return dw


def bias_grad(op: DyOperand, m: int, dtype: torch.dtype) -> Tensor:
    """Σ over the ``m`` output pixels of dy per channel, from the BN sums alone (no pass over dy).

    Σdy = a·(Σg − m·mean_g − c·Σd) with d = (y − mean) − δ, and Σd = 0 by δ's construction
    (``bn._bn_bwd_sum_kernel``), so with batch statistics Σdy = a·(Σg − m·mean_g): zero up to
    rounding, as the gradient of a bias that BN subtracts again must be; with running statistics
    Σdy = a·Σg. Needs ``op.sums``.
    """
    assert op.sums is not None, "bias_grad needs bn.reductions' sums"
    sum_g = op.sums[0]
    a = torch.rsqrt(op.var + op.eps)
    if op.gamma is not None:
        a = a * op.gamma.float()
    if op.batch_stats:
        return (a * (sum_g - m * (sum_g / m))).to(dtype)
    return (a * sum_g).to(dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# ---------------------------------------------------------------------------------------------

_DY_ARGS = ("dz_ptr", "z_ptr", "y_ptr", "mean_ptr", "var_ptr", "gamma_ptr", "sum_g_ptr",
            "sum_gyhat_ptr", "delta_ptr")
_GEOMETRY = ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")

# dy flag sets compiled ahead of time: every feature on (the most code) with every
# configuration; the running-statistics / no-ReLU / no-affine variant with the largest tile.
DY_FLAGS = {
    "full": dict(RELU=True, BATCH_STATS=True, HAS_GAMMA=True),
    "running": dict(RELU=False, BATCH_STATS=False, HAS_GAMMA=False),
}

# dgrad epilogue flags of a fused block's backward
JOIN_FLAGS = dict(HAS_ADD=True, ACT=True, ACT_CENTER=True)
_NO_JOIN = dict(HAS_ADD=False, ACT=False, ACT_CENTER=False)


def _signature(dtype: torch.dtype, io: str, extra_ints: tuple[str, ...]) -> dict[str, str]:
    p = _TL_PTR[dtype]
    sig = {a: p if a in ("dz_ptr", "z_ptr", "y_ptr") else "*fp32" for a in _DY_ARGS}
    if io == "dgrad":
        sig.update(w_ptr=p, dx_ptr=p, add_ptr=p, act_y_ptr=p, act_scale_ptr="*fp32",
                   act_shift_ptr="*fp32", act_mean_ptr="*fp32", part_g_ptr="*fp32",
                   part_gy_ptr="*fp32", part_y_ptr="*fp32")
        ints = ("M", "NB", "H", "W", "C", "OH", "OW", "K", "Cg", "Kg", "R", "S", *_GEOMETRY)
    else:
        sig.update(x_ptr=p, in_scale_ptr="*fp32", in_shift_ptr="*fp32", in_gate_ptr="*fp32",
                   part_ptr="*fp32")
        ints = ("M", "H", "W", "C", "OH", "OW", "K", "Cg", "Kg", "R", "S", *_GEOMETRY)
    sig.update({a: "i32" for a in (*ints, *extra_ints)})
    sig["eps"] = "fp32"
    return sig


def _shape_class(name: str) -> dict[str, int]:
    """The integer arguments of the backward kernels for forward shape class ``name``
    (``conv.SHAPE_CLASSES``, the same ResNet convolutions): those plus the batch ``NB`` (dgrad)
    and the chunk length ``rows_per_chunk`` a wgrad launch computes (a multiple of 128)."""
    ints = dict(SHAPE_CLASSES[name])
    rsc = ints["R"] * ints["S"] * ints["Cg"]
    which = kernel_for(ints["Cg"], ints["K"] // ints["Kg"])
    ints["NB"] = ints["M"] // (ints["OH"] * ints["OW"])
    ints["rows_per_chunk"] = _rows_per_chunk(
        ints["M"], _weight_tiles(which, rsc, ints["K"], ints["Kg"]))
    return ints


# (name, kernel, io, extra int args, configurations, extra constexprs, ResNet shape classes,
# tensor cores); the flat wgrad serves the stem only, whose input is no block's activation.
_KERNELS = (
    ("dgrad_gemm", _dgrad_gemm_kernel, "dgrad", (), GPU_DGRAD_GEMM_CONFIGS,
     {"INTERPRET": False}, ("3x3s2", "1x1"), True),
    ("dgrad_direct", _dgrad_direct_kernel, "dgrad", (), GPU_DIRECT_CONFIGS, {}, ("grouped",),
     False),
    ("wgrad_gemm", _wgrad_gemm_kernel, "wgrad", ("rows_per_chunk",), GPU_WGRAD_GEMM_CONFIGS,
     {"FLAT_K": False, "INTERPRET": False}, ("3x3s2", "1x1"), True),
    ("wgrad_gemm_flat", _wgrad_gemm_kernel, "wgrad", ("rows_per_chunk",),
     GPU_WGRAD_GEMM_CONFIGS, {"FLAT_K": True, "INTERPRET": False}, ("stem",), True),
    ("wgrad_direct", _wgrad_direct_kernel, "wgrad", ("rows_per_chunk",), GPU_DIRECT_CONFIGS,
     {"INTERPRET": False}, ("grouped",), False),
)


# The wgrad kernel a gated conv (the 1x1 after a squeeze-excitation gate: ungrouped, >= 16
# input channels) runs on: only it is compiled with the gate.
_GATED_KERNELS = ("wgrad_gemm",)


def _variant_flags(io: str) -> dict[str, dict[str, bool]]:
    """The constexpr flag sets compiled: the dy flags, and the block-fusion variants of
    ``_FLAG_SETS`` (dgrad's epilogue "join": add + act, "act", "add"; wgrad's "prologue": x read
    through the previous BN+ReLU, and "gate": times a per-(sample, channel) gate), every dy
    feature on."""
    if io == "dgrad":
        return {"full": {**DY_FLAGS["full"], **_NO_JOIN},
                "running": {**DY_FLAGS["running"], **_NO_JOIN},
                "join": {**DY_FLAGS["full"], **JOIN_FLAGS},
                "act": {**DY_FLAGS["full"], **JOIN_FLAGS, "HAS_ADD": False},
                "add": {**DY_FLAGS["full"], **_NO_JOIN, "HAS_ADD": True}}
    return {"full": {**DY_FLAGS["full"], "IN_AFFINE": False, "IN_GATE": False},
            "running": {**DY_FLAGS["running"], "IN_AFFINE": False, "IN_GATE": False},
            "prologue": {**DY_FLAGS["full"], "IN_AFFINE": True, "IN_GATE": False},
            "gate": {**DY_FLAGS["full"], "IN_AFFINE": True, "IN_GATE": True}}


def compile_specs() -> list[CompileSpec]:
    """Every kernel x autotune configuration x dtype, for the real-target compile check.

    Each configuration is compiled as a ResNet launch specialises it (``_shape_class``): with the
    "full" dy flags for each of its kernel's shape classes, and with each block-fusion variant
    (dgrad's epilogue: "join", "act", "add"; wgrad's "prologue", ``IN_AFFINE``: ``_FLAG_SETS``,
    and on ``_GATED_KERNELS`` "gate", ``IN_GATE``) for the first class, which block-fused training
    runs on every block (the stem's flat wgrad has no prologue there); the largest tile offered
    with the "running" dy flags; and once per kernel and dtype unspecialised (odd shapes) with
    its heaviest flag set. ``pruned`` carries
    :func:`_unfit`'s verdict for each target, so the report holds every configuration the
    autotuner may pick for those flags to its spill / MMA / async-copy rules. Plus the chunk sum
    for each weight dtype. Lists the GPU configurations even under the interpreter.
    """
    specs = []
    for dtype in DTYPES:
        dname = str(dtype).removeprefix("torch.")
        for kname, kernel, io, extra_ints, cfgs, extra, classes, tensor_cores in _KERNELS:
            sig = _signature(dtype, io, extra_ints)
            flag_sets = _variant_flags(io)
            fused = (("join", "act", "add") if io == "dgrad" else
                     ("prologue", "gate") if kname in _GATED_KERNELS else ("prologue",))
            heavy = fused[0]
            first = _shape_class(classes[0])
            variants = [  # (flag set, configuration, shape class)
                *(("full", cfg, cls) for cfg in cfgs for cls in classes),
                *((v, cfg, classes[0]) for v in fused for cfg in cfgs
                  if kname != "wgrad_gemm_flat"),
                ("running", _largest(kname, cfgs, first, dtype, flag_sets["running"]),
                 classes[0]),
                (heavy, max(cfgs, key=_tile_size), UNSPECIALISED),
            ]
            for vname, cfg, cls in variants:
                flags = flag_sets[vname]
                ints = None if cls == UNSPECIALISED else _shape_class(cls)
                pruned = {} if ints is None else {
                    cc: why for cc in TARGETS
                    if (why := _unfit(kname, cfg, ints, dtype, cc, flags))}
                specs.append(CompileSpec(
                    name=f"{kname}-{dname}-{vname}-{_cfg_name(cfg)}-{cls}",
                    kernel=kernel,
                    signature=sig,
                    constexprs={**extra, **flags, **cfg.kwargs},
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    ints=ints,
                    shape_class=cls,
                    tensor_cores=tensor_cores,
                    pruned=pruned,
                ))
        specs.append(CompileSpec(
            name=f"wgrad_sum-{dname}",
            kernel=_wgrad_sum_kernel,
            signature={"part_ptr": "*fp32", "dw_ptr": _TL_PTR[dtype], "chunks": "i32",
                       "chunk_stride": "i32", "Cg": "i32", "Kg": "i32", "RS": "i32",
                       "total": "i32", "group_stride": "i32", "row_stride": "i32"},
            constexprs={"BLOCK": _GPU_SUM_BLOCK},
        ))
    return specs


def _largest(kname: str, cfgs: list[triton.Config], ints: dict[str, int], dtype: torch.dtype,
             flags: dict[str, bool]) -> triton.Config:
    """The largest tile of ``kname`` offered on every target for a shape class and flags (else
    the largest)."""
    offered = [c for c in cfgs
               if not any(_unfit(kname, c, ints, dtype, cc, flags) for cc in TARGETS)]
    return max(offered or cfgs, key=_tile_size)


def _tile_size(cfg: triton.Config) -> int:
    size = 1
    for v in cfg.kwargs.values():
        size *= v
    return size


def _cfg_name(cfg: triton.Config) -> str:
    return "_".join(f"{v}" for v in cfg.kwargs.values()) + f"_w{cfg.num_warps}s{cfg.num_stages}"


__all__ = ["ActInput", "DyOperand", "bias_grad", "compile_specs", "dgrad", "wgrad"]
