"""Triton BatchNorm kernels around the fused convolution: statistics, normalisation, backward.

Every activation tensor here is an NHWC (channels_last contiguous) 4-d tensor viewed as a 2-d
row-major matrix: rows are the M = N·H·W pixels, columns the K channels, so element (m, k) sits at
``m * K + k``. Statistics and all arithmetic are fp32 whatever the storage dtype.

Kernels, in the order a training step uses them:

* ``_bn_merge_kernel`` / ``_bn_finalize_kernel``: merge the conv epilogue's per-tile (count, mean,
  M2) partials with Chan's parallel formula into the batch mean and biased variance, and turn them
  into the per-channel affine map ``scale = γ·rsqrt(var + eps)``, ``shift = β − mean·scale``.
  (Never E[y²] − E[y]²: a channel with mean ≫ std keeps its precision.)
* ``_bn_running_kernel``: the same affine map from the running statistics (eval).
* ``_bn_stats_kernel``: the same (count, mean, M2) partials of a stored tensor (a BN whose input
  no conv epilogue of ours produced: a pre-activation block's entry BN).
* ``_bn_apply_kernel``: ``z = relu(y·scale + shift (+ residual))`` (or SiLU); with the
  residual's own affine map, ``relu(y·scale + shift + residual·res_scale + res_shift)`` (the
  block output with the projection shortcut's BN folded in).
* ``_bn_bwd_reduce_kernel`` + ``_bn_bwd_sum_kernel``: ``g = dz·[z > 0]`` (SiLU: dz·silu'(v), v =
  (y − mean)·scale + β (+ residual) recomputed, g stored for the conv backward); per-channel Σg and
  Σg·ŷ as per-program partial sums, then a small deterministic reduction (no atomics, no host
  synchronisation); the first also writes ``dresidual = g`` when asked, and the sums of a second
  BN fed by the same g (the projection shortcut's) from the same pass. For a channel gate the g
  of the gated BN: scaled by the gate, plus its pooled-mean gradient (and, for a gate on a conv's
  input, times that activation's ReLU mask).
* ``_sample_sums_kernel``: per-(sample, channel) spatial sums for a channel gate, of y − mean
  or of an activation relu(y·scale + shift) that is never stored, and their gradient sums.
* ``_bn_bwd_dx_kernel``: ``dy = γ·invstd·(g − Σg/M − ŷ·Σgŷ/M)`` (batch statistics) or
  ``dy = γ·invstd·g`` (running statistics), and ``dresidual = g``; optionally ``dy + add`` (a
  pre-activation block's entry BN joined with the shortcut gradient). The formula lives in the
  ``_dy_coefs`` / ``_dy_from_g`` helpers, which the convolution backward kernels (conv_bwd.py)
  call too, to form dy while loading it instead of reading a dy tensor. With batch statistics ŷ is
  centred on the *stored* y (whose fp16/bf16 rounding moves its mean off the fp32 batch mean),
  so Σŷ = 0 and the bias gradient stays ≈ 0 as it must (see ``_bn_bwd_sum_kernel``).
* ``_act_mask``: the ReLU mask of an activation that is never stored (a fused block's conv input),
  for conv_bwd's dgrad epilogue, which does the first pass of the layer before's dBN itself, and
  for the gated reduction above.

Running-statistic updates are the op layer's job, not this module's.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ...analysis.compile import TARGETS, UNSPECIALISED, CompileSpec
from .. import _alloc
from . import _tuning
from ._activation import silu, silu_grad

Tensor = torch.Tensor

# The interpreter runs one autotune config only (several fail there), and bigger blocks make it
# faster: it executes each program with numpy.
INTERPRET = _tuning.INTERPRET


def _configs(blocks: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, num_warps) pairs; one fixed config under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in blocks]


# Elementwise and row-reduction kernels see BLOCK_M x BLOCK_K tiles; BLOCK_K is picked by the
# launcher from K (see _block_k), so the configs only vary the rows per tile and the warps.
_ELEMENTWISE_BLOCKS = [(16, 4), (32, 4), (64, 4), (64, 8), (128, 8)]
_REDUCE_BLOCKS = [(16, 4), (32, 4), (64, 8)]

# Tiles of partial statistics each finalize/merge program reads per loop step, and channels per
# program; these kernels touch (tiles x K) floats, too little to be worth autotuning.
_BLOCK_T = 32
_BLOCK_K_STATS = 32
# Above this many tiles the finalize runs in two levels (merge groups of _MERGE_GROUP tiles first)
# so that a large batch does not leave a handful of programs looping over thousands of tiles.
_MERGE_THRESHOLD = 512
_MERGE_GROUP = 64


# The interpreter converts fp32 to bf16 by truncation (round toward zero); GPUs round to nearest
# even. Under the interpreter the stores round explicitly (_cast_out), so the CPU tests see the
# GPU's rounding rather than a biased one. A global constexpr: the compiled kernels skip it.
_RNE_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def _cast_out(x, ptr):
    """fp32 ``x`` converted to ``ptr``'s element type, rounding to nearest even."""
    if _RNE_BF16 and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carry into the kept bits: ties to even
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


def _block_k(k: int) -> int:
    """Channels per tile: all of them up to 128 (powers of two; masked past K)."""
    return min(triton.next_power_of_2(k), 128)


# ---------------------------------------------------------------------------------------------
# Statistics: merge partials, finalize, running statistics
# ---------------------------------------------------------------------------------------------


@triton.jit
def _merge_tiles(
    count_ptr, mean_ptr, m2_ptr, t_begin, t_end, K, offs_k, mask_k, c,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Chan-merge tiles [t_begin, t_end) of (count, mean, M2) partials for channels ``offs_k``.

    Each loop step takes BLOCK_T tiles, combines them two-pass (block mean first, then the
    squared deviations of the tile means from it) and merges that block into the running result
    with Chan's pairwise update, so no step subtracts two large nearly equal sums.
    Tile means are taken relative to ``c`` (per channel, subtracted on load): with c close to the
    mean, the merged mean is small and every rounding is relative to the spread of the tile means,
    not to |mean| (which matters when mean ≫ std and for the fp32 two-level intermediates).
    Returns per-channel (count, mean − c, M2) vectors, fp32.
    """
    n_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        n_i = tl.load(count_ptr + offs_t, mask=mask_t, other=0.0)
        # a tile with no rows contributes nothing, whatever its mean/M2 slots hold
        valid = (mask_t & (n_i > 0))[:, None] & mask_k[None, :]
        idx = offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
        mu_i = tl.where(valid, tl.load(mean_ptr + idx, mask=valid, other=0.0) - c[None, :], 0.0)
        m2_i = tl.load(m2_ptr + idx, mask=valid, other=0.0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i[:, None] * mu_i, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(valid, mu_i - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_i, axis=0) + tl.sum(n_i[:, None] * d * d, axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        w_b = n_b / tl.maximum(n, 1.0)  # the new block's share of the merged count
        mean_a = mean_a + delta * w_b
        m2_a = m2_a + m2_b + delta * delta * n_a * w_b
        n_a = n
    return n_a, mean_a, m2_a


@triton.jit
def _affine(
    mean, var, gamma_ptr, beta_ptr, offs_k, mask_k, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
):
    """scale = γ·rsqrt(var + eps), shift = β − mean·scale (γ = 1, β = 0 when absent)."""
    scale = tl.math.rsqrt(var + eps)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BETA:
        shift = shift + tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _bn_merge_kernel(
    count_ptr,  # (T,) fp32: rows in each input tile
    mean_ptr,  # (T, K) fp32: per-tile channel means (row 0 also serves as the shift)
    m2_ptr,  # (T, K) fp32: per-tile sums of squared deviations from the tile mean
    out_count_ptr,  # (G,) fp32: rows in each group of tiles (written by the first channel block)
    out_mean_ptr,  # (G, K) fp32: per-group channel means minus the first tile's means
    out_m2_ptr,  # (G, K) fp32: per-group M2
    T,  # number of input tiles
    K,  # channels
    group,  # input tiles per output group: program (g, ·) merges tiles [g·group, (g+1)·group)
    BLOCK_T: tl.constexpr,  # tiles per loop step
    BLOCK_K: tl.constexpr,  # channels per program
):
    """First level of a two-level finalize: T tile partials -> G = cdiv(T, group) partials.

    The group means are written relative to the first tile's mean (see _merge_tiles), which the
    second level (_bn_finalize_kernel with INPUT_SHIFTED) adds back once at the end.
    """
    pid_g = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    c = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)  # tile 0's means: the shift
    t_begin = pid_g * group
    t_end = tl.minimum(t_begin + group, T)
    n, mean, m2 = _merge_tiles(
        count_ptr, mean_ptr, m2_ptr, t_begin, t_end, K, offs_k, mask_k, c, BLOCK_T, BLOCK_K
    )
    out = pid_g.to(tl.int64) * K + offs_k
    tl.store(out_mean_ptr + out, mean, mask=mask_k)
    tl.store(out_m2_ptr + out, m2, mask=mask_k)
    if pid_k == 0:
        # n holds the same count for every channel; store it once
        tl.store(out_count_ptr + pid_g, tl.max(n, axis=0))


@triton.jit
def _bn_finalize_kernel(
    count_ptr,  # (T,) fp32: rows in each tile
    mean_ptr,  # (T, K) fp32: per-tile channel means (minus shift_ref if INPUT_SHIFTED)
    m2_ptr,  # (T, K) fp32: per-tile M2
    shift_ref_ptr,  # (K,) fp32: per-channel shift of the means (the first tile's means)
    gamma_ptr,  # (K,) any float: BN weight (read only if HAS_GAMMA)
    beta_ptr,  # (K,) any float: BN bias (read only if HAS_BETA)
    out_mean_ptr,  # (K,) fp32: batch mean
    out_var_ptr,  # (K,) fp32: biased batch variance
    scale_ptr,  # (K,) fp32: γ·invstd (written only if AFFINE)
    shift_ptr,  # (K,) fp32: β − mean·scale (written only if AFFINE)
    T,  # number of tiles
    K,  # channels
    eps,  # BN epsilon
    INPUT_SHIFTED: tl.constexpr,  # means arrive already relative to shift_ref (from the merge)
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    AFFINE: tl.constexpr,  # also produce scale/shift
    BLOCK_T: tl.constexpr,  # tiles per loop step
    BLOCK_K: tl.constexpr,  # channels per program
):
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    c = tl.load(shift_ref_ptr + offs_k, mask=mask_k, other=0.0)
    n, mean, m2 = _merge_tiles(
        count_ptr, mean_ptr, m2_ptr, 0, T, K, offs_k, mask_k,
        tl.zeros_like(c) if INPUT_SHIFTED else c, BLOCK_T, BLOCK_K,
    )
    mean = mean + c  # the one rounding at |mean| scale
    # clamp rounding below 0, not with maximum(): on a GPU it turns NaN into 0
    var = tl.where(m2 < 0.0, 0.0, m2) / tl.maximum(n, 1.0)
    tl.store(out_mean_ptr + offs_k, mean, mask=mask_k)
    tl.store(out_var_ptr + offs_k, var, mask=mask_k)
    if AFFINE:
        scale, shift = _affine(
            mean, var, gamma_ptr, beta_ptr, offs_k, mask_k, eps, HAS_GAMMA, HAS_BETA
        )
        tl.store(scale_ptr + offs_k, scale, mask=mask_k)
        tl.store(shift_ptr + offs_k, shift, mask=mask_k)


@triton.jit
def _bn_running_kernel(
    rmean_ptr,  # (K,) any float: running mean
    rvar_ptr,  # (K,) any float: running variance
    gamma_ptr,  # (K,) any float: BN weight (read only if HAS_GAMMA)
    beta_ptr,  # (K,) any float: BN bias (read only if HAS_BETA)
    out_mean_ptr,  # (K,) fp32: copy of the running mean
    out_var_ptr,  # (K,) fp32: copy of the running variance
    scale_ptr,  # (K,) fp32: γ·rsqrt(running_var + eps)
    shift_ptr,  # (K,) fp32: β − running_mean·scale
    K,  # channels
    eps,  # BN epsilon
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BLOCK_K: tl.constexpr,  # channels per program
):
    """Eval: the affine map from the running statistics, plus fp32 copies of them."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mean = tl.load(rmean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    var = tl.load(rvar_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    scale, shift = _affine(mean, var, gamma_ptr, beta_ptr, offs_k, mask_k, eps, HAS_GAMMA, HAS_BETA)
    tl.store(out_mean_ptr + offs_k, mean, mask=mask_k)
    tl.store(out_var_ptr + offs_k, var, mask=mask_k)
    tl.store(scale_ptr + offs_k, scale, mask=mask_k)
    tl.store(shift_ptr + offs_k, shift, mask=mask_k)


@_tuning.autotune(_configs(_REDUCE_BLOCKS), key=["M", "K", "BLOCK_K"])
@triton.jit
def _bn_stats_kernel(
    x_ptr,  # (M, K) any float: the activation
    count_ptr,  # (P,) fp32 out: rows in each tile
    mean_ptr,  # (P, K) fp32 out: per-tile channel means
    m2_ptr,  # (P, K) fp32 out: per-tile sums of squared deviations from the tile mean
    M,  # rows (pixels)
    K,  # channels
    rows_per_prog,  # program p covers rows [p·rows_per_prog, (p+1)·rows_per_prog): one tile
    BLOCK_K: tl.constexpr,  # channels per tile (launcher's choice)
    BLOCK_M: tl.constexpr,  # rows per loop step (autotuned)
):
    """Per-tile (count, mean, M2) of a stored tensor, in the conv epilogue's format (conv.py
    ``_epilogue``), for a BN whose input no conv epilogue produced (a pre-activation block's
    entry BN on the block input). The same corrected two-pass algorithm, as two passes over the
    tile (the second from cache): a first mean, then the deviations from it, the mean corrected
    by their (small) sum and M2 = Σd² − (Σd)²/n, so Chan's merge gets accurate tile means."""
    pid_p = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    row_begin = pid_p.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    n = (row_end - row_begin).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for step in range(0, tl.cdiv(rows_per_prog, BLOCK_M)):
        offs_m = row_begin + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_k[None, :]
        acc += tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    t_mean = tl.sum(acc, axis=0) / n
    acc_d = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_d2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for step in range(0, tl.cdiv(rows_per_prog, BLOCK_M)):
        offs_m = row_begin + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - t_mean[None, :], 0.0)
        acc_d += d
        acc_d2 += d * d
    d_sum = tl.sum(acc_d, axis=0)
    out = pid_p.to(tl.int64) * K + offs_k
    tl.store(mean_ptr + out, t_mean + d_sum / n, mask=mask_k)
    tl.store(m2_ptr + out, tl.sum(acc_d2, axis=0) - d_sum * d_sum / n, mask=mask_k)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + pid_p, n)


# ---------------------------------------------------------------------------------------------
# Apply: z = relu(y·scale + shift (+ residual))
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_K) tile of an (M, K) matrix: flat int64 offsets, masks."""
    # int64 rows: M·K passes 2^31 for large batches (256·112·112·64 ≈ 2^27.6 per tensor is fine,
    # but wide layers and bigger batches are not)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    return offs_m[:, None] * K + offs_k[None, :], offs_k, mask_k, mask


@triton.jit
def _sample_scale(branch_scale_ptr, rows, offs_k, mask_k, M, HW, stride_n, stride_k,
                  PER_CHANNEL: tl.constexpr):
    """The per-(sample, channel) branch scale of the int64 ``rows`` (pixels) and channels
    ``offs_k``, fp32: element (n, k) at ``n·stride_n + k·stride_k`` (a channel gate times the
    drop path: (K, 1)), a (BLOCK_M, BLOCK_K) tile. Without PER_CHANNEL the scale is one value
    per sample (drop path: k-stride 0), loaded once per row, (BLOCK_M, 1). The division in
    int32 (rows < M < 2^31, checked by the launcher): an int64 division is a subroutine call
    whose register saves go to local memory (sm_80 compile)."""
    mask = rows < M
    sample = tl.where(mask, rows, 0).to(tl.int32) // HW
    if PER_CHANNEL:
        idx = sample[:, None] * stride_n + offs_k[None, :] * stride_k
        scale = tl.load(branch_scale_ptr + idx, mask=mask[:, None] & mask_k[None, :], other=0.0)
    else:
        scale = tl.load(branch_scale_ptr + sample * stride_n, mask=mask, other=0.0)[:, None]
    return scale


@_tuning.autotune(
    _configs(_ELEMENTWISE_BLOCKS),
    key=["M", "K", "BLOCK_K", "HAS_RES", "RES_AFFINE", "RELU", "SILU", "BRANCH_SCALE",
         "PER_CHANNEL_SCALE"],
)
@triton.jit
def _bn_apply_kernel(
    y_ptr,  # (M, K) x dtype: raw conv output
    scale_ptr,  # (K,) fp32
    shift_ptr,  # (K,) fp32
    res_ptr,  # (M, K) x dtype: residual (read only if HAS_RES)
    res_scale_ptr,  # (K,) fp32: the residual's own BN scale (read only if RES_AFFINE)
    res_shift_ptr,  # (K,) fp32: the residual's own BN shift (read only if RES_AFFINE)
    z_ptr,  # (M, K) x dtype: output
    M,  # rows (pixels)
    K,  # channels
    HAS_RES: tl.constexpr,
    RES_AFFINE: tl.constexpr,  # the residual is a raw projection output: normalise it too
    RELU: tl.constexpr,
    SILU: tl.constexpr,  # SiLU instead of ReLU (never both)
    BLOCK_K: tl.constexpr,  # channels per tile (launcher's choice)
    BLOCK_M: tl.constexpr,  # rows per tile (autotuned)
    branch_scale_ptr=None,  # (N, K) fp32: scale of y·scale + shift (if BRANCH_SCALE)
    HW=1,  # rows per sample (H·W): row m belongs to sample m // HW
    BRANCH_SCALE: tl.constexpr = False,  # drop path, channel gate: scale the branch
    bs_stride_n=1,  # the branch scale's strides (drop path: (1, 0))
    bs_stride_k=0,
    PER_CHANNEL_SCALE: tl.constexpr = False,  # bs_stride_k != 0 (a gate), else one per row
):
    """``z = relu(y·scale + shift + residual·res_scale + res_shift)``: with RES_AFFINE the
    projection shortcut's BN is folded into the block's output pass ("dual scale-bias-add-relu"),
    so the normalised shortcut is never stored. With BRANCH_SCALE the normalised y is multiplied
    by its (sample, channel)'s scale before the residual add (drop path, channel gate)."""
    idx, offs_k, mask_k, mask = _tile(M, K, BLOCK_M, BLOCK_K)
    scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    z = y * scale[None, :] + shift[None, :]
    if BRANCH_SCALE:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # as _tile's
        z *= _sample_scale(branch_scale_ptr, rows, offs_k, mask_k, M, HW, bs_stride_n,
                           bs_stride_k, PER_CHANNEL_SCALE)
    if HAS_RES:
        res = tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            res_scale = tl.load(res_scale_ptr + offs_k, mask=mask_k, other=0.0)
            res_shift = tl.load(res_shift_ptr + offs_k, mask=mask_k, other=0.0)
            res = res * res_scale[None, :] + res_shift[None, :]
        z += res
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # not maximum(): NaN must propagate as in torch.relu
    if SILU:
        z = silu(z)
    tl.store(z_ptr + idx, _cast_out(z, z_ptr), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _act_mask(y, scale, shift):
    """The ReLU mask of an activation a = relu(y·scale + shift) that is never stored: fp32
    ``y·scale + shift > 0``, the pre-activation exactly as the consuming conv's input prologue
    forms it (rounding a to its dtype keeps the sign, so this is the test ``a > 0`` on the stored
    activation would make). ``y`` fp32, ``scale``/``shift`` fp32 broadcast to it."""
    return y * scale + shift > 0.0


@triton.jit
def _grad_g(dz_ptr, z_ptr, idx, mask, RELU: tl.constexpr):
    """g = dz·[z > 0] (dz without ReLU) at flat element offsets ``idx``, fp32, 0 where masked."""
    g = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.load(z_ptr + idx, mask=mask, other=0.0)
        g = tl.where(z > 0, g, 0.0)
    return g


@triton.jit
def _silu_g(dz_ptr, res_ptr, d, scale, beta, idx, mask, g_ptr, HAS_RES: tl.constexpr):
    """g = dz·silu'(v), v = d·scale + β (+ residual), d = y − mean: the pre-activation
    recomputed in fp32 from the raw y (SiLU is not invertible: z alone cannot give it), centred
    first as BatchNorm computes it (y·scale + shift would cancel when |mean| ≫ std, and v's error
    enters g through silu''). Returned as fp32 values rounded to g_ptr's dtype, the g the conv
    backward reads, so that the sums taken from it here match it (as eager's BN backward sums
    the g SiLU's backward stored); 0 where masked."""
    v = d * scale + beta
    if HAS_RES:
        v += tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32) * silu_grad(v)
    return tl.where(mask, _cast_out(g, g_ptr).to(tl.float32), 0.0)


# The flags of _bn_bwd_reduce_kernel that _REDUCE_SPILLS_8 is keyed by, in this order
_REDUCE_SPILL_FLAGS = ("RELU", "CENTER", "WRITE_DRES", "SECOND", "ACT_MASK")
# Flag sets whose 8-elements-per-thread fp16/bf16 tile spills on a target (kernel report: 8-16 B
# on sm_100; ptxas's allocation is not monotonic in the flags)
_REDUCE_SPILLS_8 = {
    (torch.float16, (True, True, True, False, False)): (100,),
    (torch.bfloat16, (True, False, False, False, False)): (100,),
    (torch.float16, (False, True, False, False, True)): (100,),
}


def _reduce_spills(block_m: int, warps: int, block_k: int, second: bool, silu: bool = False,
                   dtype: torch.dtype | None = None, cc: int | None = None,
                   flags: tuple[bool, ...] = (), branch_scale: bool = False) -> str | None:
    """Why a _bn_bwd_reduce_kernel tile is not offered: with SECOND (five elementwise fp32
    accumulators) tiles of 32 elements per thread spill on sm_80 and sm_90, with SILU (y, the
    residual, dz and v's sigmoid per element) on sm_90 and sit at 255 registers on sm_80
    (compile check), and the _REDUCE_SPILLS_8 tiles on their targets; None where it is
    offered. (ACT_MASK comes with BRANCH_SCALE: its tiles are pruned as the branch scale's.)"""
    if block_m * block_k >= 32 * 32 * warps:
        if second:
            return "32 elements per thread with the second BN's sums spill registers"
        if silu:
            return "32 elements per thread with SiLU's recomputed pre-activation spill registers"
        if branch_scale:
            return ("32 elements per thread with the branch scale's g store: not compiled, "
                    "not offered")
    if block_m * block_k == 8 * 32 * warps and cc in _REDUCE_SPILLS_8.get((dtype, flags), ()):
        return f"8 elements per thread spill registers with these flags on sm_{cc}"
    return None


def _prune_bwd_reduce(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Drop the tiles that spill for this (launcher-chosen) BLOCK_K, flags, dtype and target."""
    dz = nargs.get("dz_ptr")
    flags = tuple(bool(kwargs.get(f)) for f in _REDUCE_SPILL_FLAGS)
    problem = (kwargs["BLOCK_K"], flags[3], bool(kwargs.get("SILU")), getattr(dz, "dtype", None),
               _tuning.target(dz), flags, bool(kwargs.get("BRANCH_SCALE")))
    kept = [c for c in configs
            if _reduce_spills(c.kwargs["BLOCK_M"], c.num_warps, *problem) is None]
    return kept or configs


@_tuning.autotune(
    _configs(_REDUCE_BLOCKS),
    key=["M", "K", "BLOCK_K", "RELU", "CENTER", "WRITE_DRES", "SECOND", "SILU", "HAS_RES",
         "BRANCH_SCALE", "BRANCH_ADD", "PER_CHANNEL_SCALE", "ACT_MASK"],
    prune=_prune_bwd_reduce,
)
@triton.jit
def _bn_bwd_reduce_kernel(
    dz_ptr,  # (M, K) x dtype: gradient of the output z
    z_ptr,  # (M, K) x dtype: forward output (read only if RELU, for the ReLU mask)
    y_ptr,  # (M, K) x dtype: raw conv output
    mean_ptr,  # (K,) fp32: the mean used to normalise
    part_g_ptr,  # (P, K) fp32: per-program Σg
    part_gy_ptr,  # (P, K) fp32: per-program Σg·(y − mean)
    part_y_ptr,  # (P, K) fp32: per-program Σ(y − mean) (written only if CENTER)
    dres_ptr,  # (M, K) x dtype out: gradient of the residual, g (written only if WRITE_DRES)
    y2_ptr,  # (M, K) x dtype: a second BN's input fed by the same g (read only if SECOND)
    mean2_ptr,  # (K,) fp32: the mean that normalises y2 (read only if SECOND)
    part_gy2_ptr,  # (P, K) fp32: per-program Σg·(y2 − mean2) (written only if SECOND)
    part_y2_ptr,  # (P, K) fp32: per-program Σ(y2 − mean2) (written only if SECOND and CENTER)
    var_ptr,  # (K,) fp32: the variance that normalised y (read only if SILU)
    gamma_ptr,  # (K,) any float: BN weight γ (read only if SILU)
    beta_ptr,  # (K,) any float: BN bias β (read only if SILU)
    res_ptr,  # (M, K) x dtype: the residual added before the SiLU (read only if HAS_RES)
    M,  # rows (pixels)
    K,  # channels
    rows_per_prog,  # program p reduces rows [p·rows_per_prog, (p+1)·rows_per_prog)
    eps,  # BN epsilon (used only if SILU)
    RELU: tl.constexpr,
    CENTER: tl.constexpr,  # batch statistics: also sum y − mean (see _bn_bwd_sum_kernel)
    WRITE_DRES: tl.constexpr,  # also store g (saves the residual gradient a pass over dz and z)
    SECOND: tl.constexpr,  # also the sums of BN(y2): the projection shortcut's BN sees this g
    SILU: tl.constexpr,  # g = dz·silu'((y − mean)·γ·invstd + β (+ res)), stored (WRITE_DRES)
    HAS_RES: tl.constexpr,  # with SILU: the pre-activation includes the residual
    BLOCK_K: tl.constexpr,  # channels per tile (launcher's choice)
    BLOCK_M: tl.constexpr,  # rows per loop step (autotuned)
    branch_scale_ptr=None,  # (N, K) fp32: scale of the BN output (if BRANCH_SCALE)
    g_branch_ptr=None,  # (M, K) x dtype out: the BN's g, g·scale[n, k] (if BRANCH_SCALE)
    HW=1,  # rows per sample (H·W)
    BRANCH_SCALE: tl.constexpr = False,  # drop path, gate: the BN sees g·scale[n, k], not g
    bs_stride_n=1,  # the branch scale's strides (drop path: (1, 0))
    bs_stride_k=0,
    branch_add_ptr=None,  # (N, K) fp32 contiguous: added to the BN's g (if BRANCH_ADD)
    BRANCH_ADD: tl.constexpr = False,  # a gate: g·scale[n, k] + dpooled[n, k]/HW
    PER_CHANNEL_SCALE: tl.constexpr = False,  # bs_stride_k != 0 (a gate), else one per row
    y_scale_ptr=None,  # (K,) fp32: y's own BN map, a = relu(y·scale + shift) (if ACT_MASK)
    y_shift_ptr=None,  # (K,) fp32
    ACT_MASK: tl.constexpr = False,  # with BRANCH_SCALE: times a's ReLU mask (see below)
):
    """Per-program partial sums; rows_per_prog is fixed by the launcher, not by the autotuned
    BLOCK_M, so the partial buffers have the same shape whichever config runs. With
    BRANCH_SCALE the sums are of the BN's own g (the output's g times the (sample, channel)'s
    scale, plus with BRANCH_ADD the gate's pooled-mean gradient), which is also stored: dres,
    when written, stays the output's g (the shortcut's). With ACT_MASK (a gate between a BN +
    ReLU and the conv reading a = relu(y·scale + shift)·gate: dz is that conv's input gradient)
    that g is also masked by a's ReLU, ``[y·scale + shift > 0]`` (``_act_mask``), before it is
    stored and summed: the g of the BN of y."""
    pid_p = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    if SECOND:
        mean2 = tl.load(mean2_ptr + offs_k, mask=mask_k, other=0.0)
    if SILU:  # v = (y − mean)·scale + β: _affine of a zero mean gives (scale, β)
        var = tl.load(var_ptr + offs_k, mask=mask_k, other=1.0)
        act_scale, act_beta = _affine(tl.zeros_like(var), var, gamma_ptr, beta_ptr, offs_k,
                                      mask_k, eps, True, True)
    if ACT_MASK:
        y_scale = tl.load(y_scale_ptr + offs_k, mask=mask_k, other=0.0)
        y_shift = tl.load(y_shift_ptr + offs_k, mask=mask_k, other=0.0)
    row_begin = pid_p.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    # elementwise accumulators, reduced over rows once at the end (fewer, better-ordered adds)
    acc_g = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_gy = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_gy2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_y2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for step in range(0, tl.cdiv(rows_per_prog, BLOCK_M)):
        offs_m = row_begin + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_k[None, :]
        idx = offs_m[:, None] * K + offs_k[None, :]

        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        # centred before multiplying: y − mean is exact-ish even when mean ≫ std
        d = tl.where(mask, y - mean[None, :], 0.0)
        if SILU:
            g = _silu_g(dz_ptr, res_ptr, d, act_scale[None, :], act_beta[None, :], idx, mask,
                        dres_ptr, HAS_RES)
        else:
            g = _grad_g(dz_ptr, z_ptr, idx, mask, RELU)
        if WRITE_DRES:
            tl.store(dres_ptr + idx, _cast_out(g, dres_ptr), mask=mask)
        if BRANCH_SCALE:
            # the sums are taken from the g dgrad reads (rounded to its dtype), as eager's BN
            # backward sums the gradient the drop path's backward stored
            g = g * _sample_scale(branch_scale_ptr, offs_m, offs_k, mask_k, M, HW, bs_stride_n,
                                  bs_stride_k, PER_CHANNEL_SCALE)
            if BRANCH_ADD:
                g += _sample_scale(branch_add_ptr, offs_m, offs_k, mask_k, M, HW, K, 1, True)
            if ACT_MASK:  # the ReLU of the gated activation, after the gate and its pooling
                g = tl.where(_act_mask(y, y_scale[None, :], y_shift[None, :]), g, 0.0)
            g = _cast_out(g, g_branch_ptr)
            tl.store(g_branch_ptr + idx, g, mask=mask)
            g = tl.where(mask, g.to(tl.float32), 0.0)
        acc_g += g
        acc_gy += g * d
        if CENTER:
            acc_y += d
        if SECOND:
            y2 = tl.load(y2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            d2 = tl.where(mask, y2 - mean2[None, :], 0.0)
            acc_gy2 += g * d2
            if CENTER:
                acc_y2 += d2
    out = pid_p.to(tl.int64) * K + offs_k
    tl.store(part_g_ptr + out, tl.sum(acc_g, axis=0), mask=mask_k)
    tl.store(part_gy_ptr + out, tl.sum(acc_gy, axis=0), mask=mask_k)
    if CENTER:
        tl.store(part_y_ptr + out, tl.sum(acc_y, axis=0), mask=mask_k)
    if SECOND:
        tl.store(part_gy2_ptr + out, tl.sum(acc_gy2, axis=0), mask=mask_k)
        if CENTER:
            tl.store(part_y2_ptr + out, tl.sum(acc_y2, axis=0), mask=mask_k)


@triton.jit
def _sample_sums_kernel(
    y_ptr,  # (M, K) x dtype: raw conv output, M = N·HW rows
    mean_ptr,  # (K,) fp32: the mean that normalises y (read only without ACT)
    dz_ptr,  # (M, K) x dtype: gradient of the block output, with ACT of a (read only if GRAD)
    z_ptr,  # (M, K) x dtype: the block output, for the ReLU mask (read only if GRAD, not ACT)
    sum_a_ptr,  # (N, K) fp32 out: Σ_hw (y − mean), or with GRAD Σ_hw g·(y − mean)
    sum_g_ptr,  # (N, K) fp32 out: Σ_hw g (written only if GRAD, not ACT)
    HW,  # rows per sample
    K,  # channels
    GRAD: tl.constexpr,  # g = dz·[z > 0] (with ACT: g = dz)
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_K: tl.constexpr,  # channels per program
    scale_ptr=None,  # (K,) fp32: with ACT, the sums are of a = relu(y·scale + shift), not y − mean
    shift_ptr=None,  # (K,) fp32
    ACT: tl.constexpr = False,  # sum_a gets Σ_hw a, or with GRAD Σ_hw dz·a
):
    """Per-(sample, channel) spatial sums for a channel gate: forward the sample's mean of y
    (Σ_hw (y − mean), centred as BatchNorm computes), backward the gate's gradient (Σ_hw g·(y −
    mean) and Σ_hw g). With ACT the gate scales an activation a = relu(y·scale + shift) that is
    never stored (a conv's input, between BN + ReLU and the conv): a as the conv's prologue forms
    it (conv.py ``_activated``: fp32, rounded to y's dtype), summed (Σ_hw a) or weighted by its
    gradient (Σ_hw dz·a). One program per (sample, channel block) looping over the sample's
    pixels in a fixed order: deterministic, no atomics."""
    n = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if ACT:
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    else:
        mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    acc_a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    first = n.to(tl.int64) * HW
    for r0 in range(0, HW, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < HW)[:, None] & mask_k[None, :]
        idx = (first + rows)[:, None] * K + offs_k[None, :]
        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            a = y * scale[None, :] + shift[None, :]
            a = tl.where(a < 0.0, 0.0, a)  # not maximum(): max.f32 drops NaN on a GPU
            d = tl.where(mask, _cast_out(a, y_ptr).to(tl.float32), 0.0)
        else:
            d = tl.where(mask, y - mean[None, :], 0.0)
        if GRAD:
            g = _grad_g(dz_ptr, z_ptr, idx, mask, not ACT)
            acc_a += g * d
            acc_g += g
        else:
            acc_a += d
    out = n.to(tl.int64) * K + offs_k
    tl.store(sum_a_ptr + out, tl.sum(acc_a, axis=0), mask=mask_k)
    if GRAD and not ACT:
        tl.store(sum_g_ptr + out, tl.sum(acc_g, axis=0), mask=mask_k)


@triton.jit
def _sum_partial_rows(g_ptr, gy_ptr, y_ptr, begin, end, K, offs_k, mask_k,
                      CENTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column sums over rows [begin, end) of the (P, K) backward partials Σg, Σg·(y − mean) and
    (with CENTER) Σ(y − mean), in a fixed order: ``(sum_g, sum_gy, sum_y)`` for channels
    ``offs_k`` (sum_y is zeros without CENTER)."""
    acc_g = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    acc_gy = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for p0 in range(begin, end, BLOCK_T):
        offs_p = p0 + tl.arange(0, BLOCK_T)
        mask = (offs_p < end)[:, None] & mask_k[None, :]
        idx = offs_p.to(tl.int64)[:, None] * K + offs_k[None, :]
        acc_g += tl.load(g_ptr + idx, mask=mask, other=0.0)
        acc_gy += tl.load(gy_ptr + idx, mask=mask, other=0.0)
        if CENTER:
            acc_y += tl.load(y_ptr + idx, mask=mask, other=0.0)
    return tl.sum(acc_g, axis=0), tl.sum(acc_gy, axis=0), tl.sum(acc_y, axis=0)


@triton.jit
def _bn_bwd_sum_kernel(
    part_g_ptr,  # (P, K) fp32: per-program Σg
    part_gy_ptr,  # (P, K) fp32: per-program Σg·(y − mean)
    part_y_ptr,  # (P, K) fp32: per-program Σ(y − mean) (read only if CENTER)
    var_ptr,  # (K,) fp32: the variance used to normalise
    dbeta_ptr,  # (K,) fp32 out: Σg
    dgamma_ptr,  # (K,) fp32 out: Σg·ŷ
    delta_ptr,  # (K,) fp32 out: mean of the stored y minus `mean` (written only if CENTER)
    P,  # number of partial rows
    K,  # channels
    M,  # rows of the activation (the BN count)
    eps,  # BN epsilon
    CENTER: tl.constexpr,  # batch statistics: centre ŷ on the stored y (see below)
    BLOCK_T: tl.constexpr,  # partial rows per loop step
    BLOCK_K: tl.constexpr,  # channels per program
):
    """Σg, Σg·ŷ and, with batch statistics, the centring correction δ.

    The batch mean comes from the fp32 accumulator, but y is stored in x's dtype: in fp16/bf16
    its rounding (0.5 at |y| = 1000 in fp16) leaves Σ(y − mean) ≠ 0, and then Σdy — the bias
    gradient, exactly 0 in theory — picks up that defect times Σg·ŷ. With ŷ taken as
    (y − mean − δ)·invstd, δ = Σ(y − mean)/M, ŷ sums to zero over the stored values again.
    """
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    sum_g, sum_gy, sum_y = _sum_partial_rows(
        part_g_ptr, part_gy_ptr, part_y_ptr, 0, P, K, offs_k, mask_k, CENTER, BLOCK_T, BLOCK_K)
    invstd = tl.math.rsqrt(tl.load(var_ptr + offs_k, mask=mask_k, other=1.0) + eps)
    if CENTER:
        delta = sum_y / M
        sum_gy = sum_gy - delta * sum_g  # Σg·(y − mean − δ)
        tl.store(delta_ptr + offs_k, delta, mask=mask_k)
    tl.store(dbeta_ptr + offs_k, sum_g, mask=mask_k)
    tl.store(dgamma_ptr + offs_k, sum_gy * invstd, mask=mask_k)


@triton.jit
def _bn_bwd_group_sum_kernel(
    g_ptr,  # (P, K) fp32: per-program Σg
    gy_ptr,  # (P, K) fp32: per-program Σg·(y − mean)
    y_ptr,  # (P, K) fp32: per-program Σ(y − mean) (read only if CENTER)
    g_out_ptr,  # (cdiv(P, group), K) fp32 out: the Σg of each group of rows
    gy_out_ptr,  # (cdiv(P, group), K) fp32 out: the Σg·(y − mean) of each group
    y_out_ptr,  # (cdiv(P, group), K) fp32 out: the Σ(y − mean) of each group (if CENTER)
    P,  # partial rows
    K,  # channels
    group,  # rows per group: program (i, ·) sums rows [i·group, (i+1)·group)
    CENTER: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows per loop step
    BLOCK_K: tl.constexpr,  # channels per program
):
    """First level of a two-level, fixed-order sum of backward partials: with many partial rows
    (a dgrad epilogue writes one per pixel tile and stride phase), ``_bn_bwd_sum_kernel``'s few
    programs would each loop over thousands of rows."""
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    begin = tl.program_id(0) * group
    sum_g, sum_gy, sum_y = _sum_partial_rows(
        g_ptr, gy_ptr, y_ptr, begin, tl.minimum(begin + group, P), K, offs_k, mask_k, CENTER,
        BLOCK_T, BLOCK_K)
    out = tl.program_id(0).to(tl.int64) * K + offs_k
    tl.store(g_out_ptr + out, sum_g, mask=mask_k)
    tl.store(gy_out_ptr + out, sum_gy, mask=mask_k)
    if CENTER:
        tl.store(y_out_ptr + out, sum_y, mask=mask_k)


@triton.jit
def _dy_coefs(
    offs_k,  # output channel indices (any shape)
    mask_k,  # bool, like offs_k: the channel exists
    mean_ptr,  # (K,) fp32: mean used to normalise (read only if BATCH_STATS)
    var_ptr,  # (K,) fp32: variance used to normalise
    gamma_ptr,  # (K,) any float: BN weight (read only if HAS_GAMMA)
    sum_g_ptr,  # (K,) fp32: Σg (read only if BATCH_STATS)
    sum_gyhat_ptr,  # (K,) fp32: Σg·ŷ (read only if BATCH_STATS)
    delta_ptr,  # (K,) fp32: centring correction δ of _bn_bwd_sum_kernel (read only if BATCH_STATS)
    M,  # the BN count (pixels N·H·W of y)
    eps,  # BN epsilon
    HAS_GAMMA: tl.constexpr,
    BATCH_STATS: tl.constexpr,
):
    """Per-channel constants of dy = a·(g − mean_g − ((y − mean) − δ)·c), all fp32:
    a = γ·invstd, mean_g = Σg/M, c = invstd·Σgŷ/M (mean_g = c = mean = δ = 0 with running
    statistics, where dy = a·g). Returns ``(a, mean_g, c, mean, delta)`` shaped like offs_k."""
    invstd = tl.math.rsqrt(tl.load(var_ptr + offs_k, mask=mask_k, other=1.0) + eps)
    a = invstd
    if HAS_GAMMA:
        a = a * tl.load(gamma_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    if BATCH_STATS:
        inv_m = 1.0 / M  # fp32 (M may arrive as a constexpr when it is 1)
        mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
        delta = tl.load(delta_ptr + offs_k, mask=mask_k, other=0.0)
        mean_g = tl.load(sum_g_ptr + offs_k, mask=mask_k, other=0.0) * inv_m
        # ŷ·Σgŷ/M = (y − mean)·invstd·Σgŷ/M: fold invstd into the per-channel factor
        c = tl.load(sum_gyhat_ptr + offs_k, mask=mask_k, other=0.0) * (invstd * inv_m)
    else:
        mean = tl.zeros_like(a)
        delta = mean
        mean_g = mean
        c = mean
    return a, mean_g, c, mean, delta


@triton.jit
def _dy_from_g(g, y_ptr, idx, mask, a, mean_g, c, mean, delta, BATCH_STATS: tl.constexpr):
    """dy from g and the constants of ``_dy_coefs`` (broadcast to idx's shape); 0 where masked.

    The one place the dy formula lives on the GPU side: BN's own dx pass and the convolution
    dgrad/wgrad kernels (conv_bwd.py), which form dy while loading it, all call this.
    """
    if BATCH_STATS:
        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        d = (y - mean) - delta  # centred on the stored y (see δ in _bn_bwd_sum_kernel)
        dy = a * (g - mean_g - d * c)
    else:
        dy = a * g
    return tl.where(mask, dy, 0.0)


def _dx_spills(block_m: int, warps: int, block_k: int, dtype: torch.dtype | None,
               cc: int | None) -> str | None:
    """Why a _bn_bwd_dx_kernel tile is not offered: in fp32 on sm_80 and sm_89, tiles of 8
    elements per thread spill 8 bytes (kernel report); None where it is offered."""
    if dtype == torch.float32 and cc in (80, 89) and block_m * block_k == 8 * 32 * warps:
        return f"8 elements per thread spill registers in float32 on sm_{cc}"
    return None


def _prune_bwd_dx(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Drop the tiles that spill for this dtype, target and (launcher-chosen) BLOCK_K."""
    dz = nargs["dz_ptr"]
    problem = (kwargs["BLOCK_K"], dz.dtype, _tuning.target(dz))
    kept = [c for c in configs
            if _dx_spills(c.kwargs["BLOCK_M"], c.num_warps, *problem) is None]
    return kept or configs


@_tuning.autotune(
    _configs(_ELEMENTWISE_BLOCKS),
    key=["M", "K", "BLOCK_K", "RELU", "BATCH_STATS", "HAS_GAMMA", "WRITE_DY", "WRITE_DRES",
         "HAS_ADD"],
    prune=_prune_bwd_dx,
)
@triton.jit
def _bn_bwd_dx_kernel(
    dz_ptr,  # (M, K) x dtype: gradient of z
    z_ptr,  # (M, K) x dtype: forward output (read only if RELU)
    y_ptr,  # (M, K) x dtype: raw conv output (read only if BATCH_STATS)
    mean_ptr,  # (K,) fp32: mean used to normalise (read only if BATCH_STATS)
    var_ptr,  # (K,) fp32: variance used to normalise
    gamma_ptr,  # (K,) any float: BN weight (read only if HAS_GAMMA)
    sum_g_ptr,  # (K,) fp32: Σg (read only if BATCH_STATS)
    sum_gyhat_ptr,  # (K,) fp32: Σg·ŷ (read only if BATCH_STATS)
    delta_ptr,  # (K,) fp32: centring correction δ of _bn_bwd_sum_kernel (read only if BATCH_STATS)
    dy_ptr,  # (M, K) x dtype out: gradient of y (written only if WRITE_DY)
    dres_ptr,  # (M, K) x dtype out: gradient of the residual, g (written only if WRITE_DRES)
    add_ptr,  # (M, K) x dtype: added to dy before it is stored (read only if HAS_ADD)
    M,  # rows (pixels); also the BN count
    K,  # channels
    eps,  # BN epsilon
    RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr,  # mean/var came from this batch (their gradient flows)
    HAS_GAMMA: tl.constexpr,
    WRITE_DY: tl.constexpr,
    WRITE_DRES: tl.constexpr,
    HAS_ADD: tl.constexpr,  # dy + add: a pre-activation block's entry BN joins the shortcut
    BLOCK_K: tl.constexpr,  # channels per tile (launcher's choice)
    BLOCK_M: tl.constexpr,  # rows per tile (autotuned)
):
    idx, offs_k, mask_k, mask = _tile(M, K, BLOCK_M, BLOCK_K)
    g = _grad_g(dz_ptr, z_ptr, idx, mask, RELU)
    if WRITE_DRES:
        tl.store(dres_ptr + idx, _cast_out(g, dres_ptr), mask=mask)
    if WRITE_DY:
        a, mean_g, c, mean, delta = _dy_coefs(
            offs_k, mask_k, mean_ptr, var_ptr, gamma_ptr, sum_g_ptr, sum_gyhat_ptr, delta_ptr,
            M, eps, HAS_GAMMA, BATCH_STATS,
        )
        dy = _dy_from_g(
            g, y_ptr, idx, mask, a[None, :], mean_g[None, :], c[None, :], mean[None, :],
            delta[None, :], BATCH_STATS,
        )
        if HAS_ADD:  # fp32 sum, one rounding
            dy += tl.load(add_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + idx, _cast_out(dy, dy_ptr), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _rows(t: Tensor) -> tuple[int, int]:
    """(M, K) of an NHWC activation; checks the layout the kernels index by."""
    assert t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last), (
        f"expected a channels_last contiguous 4-d tensor, got shape {tuple(t.shape)}, "
        f"strides {t.stride()}"
    )
    n, k, h, w = t.shape
    return n * h * w, k


def _vec(k: int, like: Tensor) -> Tensor:
    return _alloc.empty(k, dtype=torch.float32, device=like.device)


def finalize(
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
    *,
    affine: bool = True,
    group: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Batch statistics from per-tile partials: ``(mean, var, scale, shift)``, all (K,) fp32.

    ``count`` (T,), ``mean``/``m2`` (T, K) fp32 as the conv epilogue writes them. ``var`` is the
    biased variance. ``scale``/``shift`` are None unless ``affine``. ``group`` forces the two-level
    merge with that many tiles per first-level group (chosen automatically when None).
    """
    t, k = mean.shape
    assert count.shape == (t,) and m2.shape == (t, k)
    assert count.dtype == mean.dtype == m2.dtype == torch.float32
    count, mean, m2 = count.contiguous(), mean.contiguous(), m2.contiguous()
    shift_ref = mean[0]  # tile 0's means, a per-channel estimate of the batch mean
    if group is None and t > _MERGE_THRESHOLD:
        group = _MERGE_GROUP
    if group is not None:
        g = triton.cdiv(t, group)
        g_count = _alloc.empty(g, dtype=torch.float32, device=mean.device)
        g_mean = _alloc.empty(g, k, dtype=torch.float32, device=mean.device)
        g_m2 = _alloc.empty(g, k, dtype=torch.float32, device=mean.device)
        _bn_merge_kernel[(g, triton.cdiv(k, _BLOCK_K_STATS))](
            count, mean, m2, g_count, g_mean, g_m2, t, k, group,
            BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K_STATS,
        )
        count, mean, m2, t = g_count, g_mean, g_m2, g
    out_mean, out_var = _vec(k, mean), _vec(k, mean)
    scale = _vec(k, mean) if affine else None
    shift = _vec(k, mean) if affine else None
    _bn_finalize_kernel[(triton.cdiv(k, _BLOCK_K_STATS),)](
        count, mean, m2, shift_ref,
        bn_weight.contiguous() if bn_weight is not None else out_mean,  # dummies: never read
        bn_bias.contiguous() if bn_bias is not None else out_mean,
        out_mean, out_var,
        scale if affine else out_mean, shift if affine else out_var,
        t, k, eps,
        INPUT_SHIFTED=group is not None, HAS_GAMMA=bn_weight is not None,
        HAS_BETA=bn_bias is not None, AFFINE=affine,
        BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K_STATS,
    )
    return out_mean, out_var, scale, shift


def running_affine(
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eval: ``(mean, var, scale, shift)`` (K,) fp32 from the running statistics (fresh copies)."""
    k = running_mean.shape[0]
    mean, var, scale, shift = (_vec(k, running_mean) for _ in range(4))
    _bn_running_kernel[(triton.cdiv(k, _BLOCK_K_STATS),)](
        running_mean.contiguous(), running_var.contiguous(),
        bn_weight.contiguous() if bn_weight is not None else mean,  # dummies are never read
        bn_bias.contiguous() if bn_bias is not None else mean,
        mean, var, scale, shift, k, eps,
        HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None,
        BLOCK_K=_BLOCK_K_STATS,
    )
    return mean, var, scale, shift


def _grid(m: int, k: int, block_k: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, block_k))


def apply(
    y: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, relu: bool, *,
    res_scale: Tensor | None = None, res_shift: Tensor | None = None, silu: bool = False,
    branch_scale: Tensor | None = None,
) -> Tensor:
    """``relu(y·scale + shift (+ residual))`` in y's dtype, channels_last; fp32 math. With
    ``silu`` (and ``relu`` False) SiLU in place of the ReLU.

    With ``res_scale``/``res_shift`` ((K,) fp32, both or neither; needs ``residual``) the
    residual is normalised in the same pass: ``relu(y·scale + shift + residual·res_scale +
    res_shift)``, the block output with the projection shortcut's BN folded in.
    ``branch_scale`` (fp32; (N,) drop path, or (N, K) any strides, a channel gate times it):
    ``relu((y·scale + shift)·branch_scale[n(, k)] + ...)``.
    """
    m, k = _rows(y)
    res_affine = res_scale is not None
    assert res_affine == (res_shift is not None), "res_scale and res_shift come together"
    assert residual is not None or not res_affine, "res_scale/res_shift need a residual"
    assert not (relu and silu), "one activation: ReLU or SiLU"
    if residual is not None:
        assert residual.shape == y.shape and residual.dtype == y.dtype
        _rows(residual)
    z = _alloc.empty(*y.shape, dtype=y.dtype, device=y.device, channels_last=True)
    block_k = _block_k(k)
    _bn_apply_kernel[_grid(m, k, block_k)](
        y, scale, shift, residual if residual is not None else y,
        res_scale if res_affine else scale, res_shift if res_affine else shift,  # dummies
        z, m, k,
        HAS_RES=residual is not None, RES_AFFINE=res_affine, RELU=relu, SILU=silu,
        BLOCK_K=block_k, **_branch_args(branch_scale, y, scale),
    )
    return z


def _branch_args(branch_scale: Tensor | None, y: Tensor, dummy: Tensor, **out) -> dict:
    """The BRANCH_SCALE keywords of the apply / reduce kernels for a per-sample (N,) or
    per-(sample, channel) (N, K) scale of the BN output of ``y`` (without one, never read:
    ``dummy`` (fp32) for the scale, ``y`` for the ``out`` pointers, the dtypes the compiled
    variants declare). A scale constant over channels (k-stride 0: drop path) compiles to one
    load per row, not per element."""
    if branch_scale is None:
        return dict(branch_scale_ptr=dummy, HW=1, BRANCH_SCALE=False, bs_stride_n=1,
                    bs_stride_k=0, PER_CHANNEL_SCALE=False, **{k: y for k in out})
    n, k = y.shape[:2]
    assert branch_scale.dtype == torch.float32
    if branch_scale.dim() == 1:
        assert branch_scale.shape == (n,) and branch_scale.is_contiguous()
        strides = (1, 0)
    else:
        assert branch_scale.shape == (n, k), (tuple(branch_scale.shape), (n, k))
        strides = branch_scale.stride()
    assert y.numel() // y.shape[1] < 2**31, "the branch scale's sample index is int32"
    assert n * k < 2**31, "the branch scale's index is int32"
    return dict(branch_scale_ptr=branch_scale, HW=y.shape[2] * y.shape[3], BRANCH_SCALE=True,
                bs_stride_n=strides[0], bs_stride_k=strides[1],
                PER_CHANNEL_SCALE=strides[1] != 0, **out)


_SAMPLE_SUMS_BLOCK_M = 32
# 8 warps: 16 elements per thread and accumulator at BLOCK_K = 128 (4 warps spill on sm_100 in
# bf16, and the (N, channel blocks) grid is small at small batches: more threads per program)
_SAMPLE_SUMS_WARPS = 8


def sample_sums(y: Tensor, mean: Tensor, dz: Tensor | None = None,
                z: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-(sample, channel) spatial sums of an NHWC ``y`` centred on ``mean`` ((K,) fp32), for
    a channel gate: ``(Σ_hw (y − mean), None)``, or with ``dz`` and ``z`` (the block output's
    gradient and the output, for its ReLU mask) ``(Σ_hw g·(y − mean), Σ_hw g)``, g = dz·[z >
    0]; (N, K) fp32 each."""
    _rows(y)
    if dz is not None:
        assert dz.shape == y.shape and z is not None and z.shape == y.shape
        _rows(dz), _rows(z)
    return _sample_sums(y, dz, mean=mean, z=z)


def activation_sums(y: Tensor, scale: Tensor, shift: Tensor,
                    dz: Tensor | None = None) -> Tensor:
    """Per-(sample, channel) spatial sums of the activation ``a = relu(y·scale + shift)`` that a
    conv reads through its prologue (never stored; computed as the prologue does, in fp32 and
    rounded to y's dtype), for a channel gate on it: ``Σ_hw a`` (the gate's pooled input times
    H·W), or with ``dz`` (the gradient of the gated input a·gate; y's shape and dtype,
    channels_last) ``Σ_hw dz·a`` (the gate's gradient); (N, K) fp32. ``y`` is NHWC
    (channels_last), ``scale``/``shift`` its BN's (K,) fp32 map."""
    _, k = _rows(y)
    for name, t in (("scale", scale), ("shift", shift)):
        assert t.shape == (k,) and t.dtype == torch.float32, (
            f"activation_sums: {name} must be a ({k},) fp32 tensor, got {tuple(t.shape)} "
            f"{t.dtype}"
        )
    if dz is not None:
        assert dz.shape == y.shape and dz.dtype == y.dtype, (
            f"activation_sums: dz must be like y {tuple(y.shape)} {y.dtype}, got "
            f"{tuple(dz.shape)} {dz.dtype}"
        )
        _rows(dz)
    return _sample_sums(y, dz, act=(scale.contiguous(), shift.contiguous()))[0]


def _sample_sums(y: Tensor, dz: Tensor | None, *, mean: Tensor | None = None,
                 z: Tensor | None = None,
                 act: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """Launch ``_sample_sums_kernel`` on checked arguments: of y − mean, or with ``act`` of
    relu(y·scale + shift); ``(sum_a, sum_g)``, sum_g None unless dz is given without act."""
    m, k = _rows(y)
    n = y.shape[0]
    grad = dz is not None
    block_k = _block_k(k)
    sum_a = _alloc.empty(n, k, dtype=torch.float32, device=y.device)
    sum_g = (_alloc.empty(n, k, dtype=torch.float32, device=y.device)
             if grad and act is None else None)
    scale, shift = act if act is not None else (mean, mean)  # dummies: never read without ACT
    _sample_sums_kernel[(n, triton.cdiv(k, block_k))](
        y, scale if act is not None else mean,  # dummy: the mean is never read with ACT
        dz if grad else y, z if grad and act is None else y,  # dummies: never read
        sum_a, sum_g if sum_g is not None else sum_a, m // n, k,
        GRAD=grad, BLOCK_M=_SAMPLE_SUMS_BLOCK_M, BLOCK_K=block_k,
        scale_ptr=scale, shift_ptr=shift, ACT=act is not None, num_warps=_SAMPLE_SUMS_WARPS,
    )
    return sum_a, sum_g


def batch_stats(x: Tensor, *, rows_per_prog: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tile ``(count (T,), mean (T, K), M2 (T, K))`` fp32 partials of an NHWC tensor, the
    format the conv epilogue writes, so :func:`finalize` gives its batch statistics (for a BN
    whose input is not a conv output of this package, e.g. a pre-activation block's entry BN).
    ``rows_per_prog`` overrides the rows per tile (tests)."""
    m, k = _rows(x)
    block_k = _block_k(k)
    rows = rows_per_prog or _rows_per_prog(m)
    t = triton.cdiv(m, rows)
    count = _alloc.empty(t, dtype=torch.float32, device=x.device)
    mean = _alloc.empty(t, k, dtype=torch.float32, device=x.device)
    m2 = _alloc.empty(t, k, dtype=torch.float32, device=x.device)
    _bn_stats_kernel[(t, triton.cdiv(k, block_k))](
        x, count, mean, m2, m, k, rows, BLOCK_K=block_k,
    )
    return count, mean, m2


def _rows_per_prog(m: int) -> int:
    """Rows each backward-reduction program covers: at most ~1024 programs per channel block
    (a cheap second pass), at least 256 rows each (enough work per program)."""
    return max(256, triton.cdiv(m, 1024))


@dataclasses.dataclass(frozen=True)
class SiluInput:
    """What a SiLU's backward recomputes its pre-activation v = (y − mean)·γ·invstd + β
    (+ residual) from, besides the raw y and the statistics: the BN weight and bias ((K,), any
    float dtype; ones and zeros without affine) and the residual (like y, or None)."""

    gamma: Tensor
    beta: Tensor
    residual: Tensor | None


def reductions(
    dz: Tensor,
    y: Tensor,
    z: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    batch_stats: bool,
    eps: float,
    relu: bool,
    dres: Tensor | None = None,
    rows_per_prog: int | None = None,
    second: tuple[Tensor, Tensor, Tensor] | None = None,
    silu: SiluInput | None = None,
    branch_scale: Tensor | None = None,
    g_branch: Tensor | None = None,
    branch_add: Tensor | None = None,
    act_mask: tuple[Tensor, Tensor] | None = None,
):
    """The per-channel sums of the backward: ``(Σg, Σg·ŷ, δ)``, (K,) fp32 each.

    ``δ`` (the centring correction of ``_bn_bwd_sum_kernel``) only with ``batch_stats``, else
    None. Σg is dβ, Σg·ŷ is dγ; with the mean and variance they are all dy needs besides dz, z and
    y (see ``_dy_coefs``). Two launches: per-program partials, then a fixed-order sum.
    ``dres`` (like dz, channels_last), when given, receives g = dz·[z > 0] from the same pass.
    ``rows_per_prog`` overrides how many rows each reduction program sums (tests).

    ``second = (y2, mean2, var2)``: a second BN fed by the same g (a projection shortcut's BN
    sees the g of the block output, like the last conv's BN); its sums come from the same pass
    over dz and z, and the result is ``(sums, sums2)``, each a triple as above (the two Σg are
    the same values, in separate tensors). ``y2`` is like y, with the same statistics mode.

    ``silu`` (with ``relu`` False, ``z`` unread): the output was SiLU of v = (y − mean)·γ·invstd
    + β (+ residual), and g = dz·silu'(v) from v recomputed here; ``dres`` is then required and
    receives g, rounded to dz's dtype, which the sums are taken from: the conv backward reads it
    as its dz, without activation.
    ``branch_scale`` ((N,) fp32, drop path: the output was relu(BN(y)·branch_scale[n] + ...)):
    the sums are of the BN's g, g·branch_scale[n], which is stored into ``g_branch`` (like dz)
    for the dy operand; not with ``second`` (that BN sees the unscaled g). A (N, K)
    ``branch_scale`` (any strides) scales per (sample, channel): a channel gate (times the drop
    path's scale), whose pooled-mean gradient ``branch_add`` ((N, K) fp32, dpooled/(H·W); needs
    ``branch_scale``) is added to that g in the same pass: g·branch_scale[n, k] + branch_add[n, k].
    ``act_mask = (scale, shift)`` ((K,) fp32, y's own BN map; needs ``branch_scale``, ``relu``
    False, no ``second`` or ``silu``): a gate between that BN + ReLU and the next conv, which
    read a·gate, a = relu(y·scale + shift) never stored; dz is the conv's input gradient, and the
    BN's g, ``(dz·branch_scale[n, k] + branch_add[n, k])·[y·scale + shift > 0]``, is stored into
    ``g_branch`` and summed.
    """
    m, k = _rows(dz)
    if silu is not None:
        assert not relu, "one activation: ReLU or SiLU"
        assert dres is not None, "SiLU's g is stored for the conv backward: pass dres"
        _check_silu_input(silu, y)
    _rows(y)
    if second is not None:
        y2, mean2, var2 = second
        assert y2.shape == y.shape
        _rows(y2)
    if dres is not None:
        assert dres.shape == dz.shape and dres.dtype == dz.dtype
        _rows(dres)
    if relu:
        assert z.shape == dz.shape
        _rows(z)
    if act_mask is not None:
        assert branch_scale is not None, "act_mask masks the gated g: pass branch_scale (the gate)"
        assert not relu and silu is None, "act_mask is the activation's ReLU: relu False, no silu"
        assert second is None, "act_mask: no second BN (the gate's BN is fed by its g alone)"
        assert len(act_mask) == 2, "act_mask is (scale, shift)"
        for name, t in zip(("scale", "shift"), act_mask):
            assert t.shape == (k,) and t.dtype == torch.float32, (
                f"act_mask {name} must be ({k},) fp32, got {tuple(t.shape)} {t.dtype}")
        act_mask = tuple(t.contiguous() for t in act_mask)
    assert (branch_scale is None) == (g_branch is None), "branch_scale needs g_branch"
    assert branch_scale is None or second is None, "the second BN sees the unscaled g"
    if g_branch is not None:
        assert g_branch.shape == dz.shape and g_branch.dtype == dz.dtype
        _rows(g_branch)
    if branch_add is not None:
        assert branch_scale is not None, "branch_add is added to the scaled g: pass branch_scale"
        assert branch_add.shape == (dz.shape[0], k) and branch_add.dtype == torch.float32
        branch_add = branch_add.contiguous()
    block_k = _block_k(k)
    rows = rows_per_prog or _rows_per_prog(m)
    p = triton.cdiv(m, rows)
    part_g = _alloc.empty(p, k, dtype=torch.float32, device=dz.device)
    part_gy = _alloc.empty(p, k, dtype=torch.float32, device=dz.device)
    new_part = lambda: _alloc.empty(p, k, dtype=torch.float32, device=dz.device)
    part_y = new_part() if batch_stats else None
    part_gy2 = new_part() if second is not None else None
    part_y2 = new_part() if second is not None and batch_stats else None
    _bn_bwd_reduce_kernel[(p, triton.cdiv(k, block_k))](
        dz, z if relu else dz, y, mean, part_g, part_gy,
        part_y if batch_stats else part_g,  # dummy: never written without CENTER
        dres if dres is not None else dz,  # dummy: never written without WRITE_DRES
        *((y2, mean2, part_gy2, part_y2 if batch_stats else part_gy2) if second is not None
          else (y, mean, part_g, part_g)),  # dummies: never read or written without SECOND
        *((var, silu.gamma.contiguous(), silu.beta.contiguous(),
           silu.residual if silu.residual is not None else y)
          if silu is not None else (mean, mean, mean, y)),  # dummies: never read without SILU
        m, k, rows, eps, RELU=relu, CENTER=batch_stats, WRITE_DRES=dres is not None,
        SECOND=second is not None, SILU=silu is not None,
        HAS_RES=silu is not None and silu.residual is not None, BLOCK_K=block_k,
        **_branch_args(branch_scale, dz, part_g, g_branch_ptr=g_branch),
        branch_add_ptr=branch_add if branch_add is not None else part_g,  # dummy: never read
        BRANCH_ADD=branch_add is not None,
        y_scale_ptr=act_mask[0] if act_mask is not None else mean,  # dummies: never read
        y_shift_ptr=act_mask[1] if act_mask is not None else mean,  # without ACT_MASK
        ACT_MASK=act_mask is not None,
    )
    sums = _finish_sums(part_g, part_gy, part_y, var, m, eps, batch_stats)
    if second is None:
        return sums
    return sums, _finish_sums(part_g, part_gy2, part_y2, var2, m, eps, batch_stats)


def _check_silu_input(silu: SiluInput, y: Tensor) -> None:
    k = y.shape[1]
    for t in (silu.gamma, silu.beta):
        assert t.shape == (k,) and t.is_floating_point()
    if silu.residual is not None:
        assert silu.residual.shape == y.shape and silu.residual.dtype == y.dtype
        _rows(silu.residual)


def _finish_sums(
    part_g: Tensor, part_gy: Tensor, part_y: Tensor | None, var: Tensor, m: int, eps: float,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Σg, Σg·ŷ, δ)`` from (P, K) per-program partials (``_bn_bwd_sum_kernel``, fixed order);
    ``m`` is the BN count, ``part_y`` (needed with ``batch_stats``) Σ(y − mean). Above
    ``_MERGE_THRESHOLD`` rows, groups of ``_MERGE_GROUP`` rows are summed first (fixed order)."""
    p, k = part_g.shape
    if p > _MERGE_THRESHOLD:
        groups = triton.cdiv(p, _MERGE_GROUP)
        outs = [_alloc.empty(groups, k, dtype=torch.float32, device=part_g.device)
                for _ in range(3 if batch_stats else 2)]
        _bn_bwd_group_sum_kernel[(groups, triton.cdiv(k, _BLOCK_K_STATS))](
            part_g, part_gy, part_y if batch_stats else part_g, outs[0], outs[1],
            outs[2] if batch_stats else outs[0], p, k, _MERGE_GROUP,
            CENTER=batch_stats, BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K_STATS,
        )
        part_g, part_gy = outs[0], outs[1]
        part_y = outs[2] if batch_stats else None
        p = groups
    sum_g, sum_gyhat = _vec(k, part_g), _vec(k, part_g)
    delta = _vec(k, part_g) if batch_stats else None
    _bn_bwd_sum_kernel[(triton.cdiv(k, _BLOCK_K_STATS),)](
        part_g, part_gy, part_y if batch_stats else part_g, var, sum_g, sum_gyhat,
        delta if batch_stats else sum_g, p, k, m, eps,
        CENTER=batch_stats, BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K_STATS,
    )
    return sum_g, sum_gyhat, delta


def backward(
    dz: Tensor,
    y: Tensor,
    z: Tensor,
    mean: Tensor,
    var: Tensor,
    bn_weight: Tensor | None,
    *,
    batch_stats: bool,
    eps: float,
    relu: bool,
    need_dy: bool = True,
    need_stats_grad: bool = True,
    need_dres: bool = False,
    sums: tuple[Tensor, Tensor, Tensor | None] | None = None,
    rows_per_prog: int | None = None,
    add: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """dReLU + dBN: ``(dy, dgamma, dbeta, dresidual)``.

    ``add`` (like dz, channels_last; needs ``need_dy``): returned dy is ``dBN(g) + add``, summed
    in fp32 in the same pass (a pre-activation block's input gradient: its entry BN's backward
    joined with the shortcut's gradient, no separate add pass).

    ``dy``/``dresidual`` are in dz's dtype, channels_last; ``dgamma`` (Σg·ŷ) and ``dbeta`` (Σg)
    fp32 (K,). Entries not asked for are None (``need_stats_grad`` covers dgamma and dbeta).
    ``y`` is only read with batch statistics or ``need_stats_grad``; ``z`` only with ``relu``.
    ``sums``: the result of :func:`reductions` when the caller already has it.
    ``rows_per_prog`` overrides how many rows each reduction program sums (tests).
    """
    m, k = _rows(dz)
    if relu:
        assert z.shape == dz.shape
        _rows(z)
    if add is not None:
        assert need_dy, "add joins dy: it needs need_dy"
        assert add.shape == dz.shape and add.dtype == dz.dtype
        _rows(add)
    block_k = _block_k(k)
    new = lambda: _alloc.empty(*dz.shape, dtype=dz.dtype, device=dz.device, channels_last=True)
    dres = new() if need_dres else None
    dres_pending = need_dres  # not yet written: the reduction pass writes it when it runs here
    dgamma = dbeta = delta = None
    if sums is None and (batch_stats or need_stats_grad):
        sums = reductions(
            dz, y, z, mean, var, batch_stats=batch_stats, eps=eps, relu=relu, dres=dres,
            rows_per_prog=rows_per_prog,
        )
        dres_pending = False
    if sums is not None:
        dbeta, dgamma, delta = sums
    dy = None
    if need_dy or dres_pending:
        dy = new() if need_dy else None
        _bn_bwd_dx_kernel[_grid(m, k, block_k)](
            dz, z if relu else dz, y if batch_stats else dz, mean, var,
            bn_weight.contiguous() if bn_weight is not None else var,  # dummies are never read
            dbeta if batch_stats else var, dgamma if batch_stats else var,
            delta if batch_stats else var,
            dy if need_dy else dz, dres if dres_pending else dz,
            add if add is not None else dz,  # dummy: never read without HAS_ADD
            m, k, eps,
            RELU=relu, BATCH_STATS=batch_stats, HAS_GAMMA=bn_weight is not None,
            WRITE_DY=need_dy, WRITE_DRES=dres_pending, HAS_ADD=add is not None, BLOCK_K=block_k,
        )
    if not need_stats_grad:
        dgamma = dbeta = None
    return dy, dgamma, dbeta, dres


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m fastres.analysis.kernel_report)
# ---------------------------------------------------------------------------------------------

_PTR_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}  # activation pointers
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Integer arguments of a ResNet-shaped launch: channel counts and the merge group are multiples
# of 16, row counts (N·H·W with 7x7 or 14x14 maps) and tile counts not; backward programs cover
# 256 rows each up to 2^18 rows. A launch specialises on these (see launch_source).
_RESNET_INTS = dict(M=3 * 7 * 7, K=256, T=37, P=37, group=_MERGE_GROUP, rows_per_prog=256,
                    HW=7 * 7, bs_stride_n=256, bs_stride_k=1)


def compile_specs() -> list[CompileSpec]:
    """Every kernel in this module: each flag combination and activation dtype with one block
    config, plus each autotune config (and BLOCK_K of 16/64/128) for one flag combination."""
    specs: list[CompileSpec] = []
    f32 = "*fp32"
    stats = dict(BLOCK_T=_BLOCK_T, BLOCK_K=_BLOCK_K_STATS)
    specs.append(CompileSpec(
        "bn_merge", _bn_merge_kernel,
        dict(count_ptr=f32, mean_ptr=f32, m2_ptr=f32, out_count_ptr=f32, out_mean_ptr=f32,
             out_m2_ptr=f32, T="i32", K="i32", group="i32"),
        stats,
    ))
    for has_gamma in (False, True):
        for affine in (False, True):
            for shifted in (False, True):
                specs.append(CompileSpec(
                    f"bn_finalize[gamma={has_gamma},affine={affine},shifted={shifted}]",
                    _bn_finalize_kernel,
                    dict(count_ptr=f32, mean_ptr=f32, m2_ptr=f32, shift_ref_ptr=f32,
                         gamma_ptr=f32, beta_ptr=f32, out_mean_ptr=f32, out_var_ptr=f32,
                         scale_ptr=f32, shift_ptr=f32, T="i32", K="i32", eps="fp32"),
                    dict(INPUT_SHIFTED=shifted, HAS_GAMMA=has_gamma, HAS_BETA=has_gamma,
                         AFFINE=affine, **stats),
                ))
        specs.append(CompileSpec(
            f"bn_running[gamma={has_gamma}]", _bn_running_kernel,
            dict(rmean_ptr=f32, rvar_ptr=f32, gamma_ptr=f32, beta_ptr=f32, out_mean_ptr=f32,
                 out_var_ptr=f32, scale_ptr=f32, shift_ptr=f32, K="i32", eps="fp32"),
            dict(HAS_GAMMA=has_gamma, HAS_BETA=has_gamma, BLOCK_K=_BLOCK_K_STATS),
        ))
    # of y − mean (both BLOCK_K extremes), and of a gated conv input's activation (ACT: the
    # widest BLOCK_K only, the most elements per thread)
    sample_sums_tiles = [(False, 16), (False, 128), (True, 128)]
    for t, ptr in _PTR_TYPES.items():
        for grad in (False, True):
            for act, bk in sample_sums_tiles:
                specs.append(CompileSpec(
                    f"sample_sums[{t},grad={grad},{'act=True,' * act}BLOCK_K={bk}]",
                    _sample_sums_kernel,
                    dict(y_ptr=ptr, mean_ptr=f32, dz_ptr=ptr, z_ptr=ptr, sum_a_ptr=f32,
                         sum_g_ptr=f32, HW="i32", K="i32", scale_ptr=f32, shift_ptr=f32),
                    dict(GRAD=grad, ACT=act, BLOCK_M=_SAMPLE_SUMS_BLOCK_M, BLOCK_K=bk),
                    num_warps=_SAMPLE_SUMS_WARPS,
                ))
    for center in (False, True):
        specs.append(CompileSpec(
            f"bn_bwd_group_sum[center={center}]", _bn_bwd_group_sum_kernel,
            dict(g_ptr=f32, gy_ptr=f32, y_ptr=f32, g_out_ptr=f32, gy_out_ptr=f32,
                 y_out_ptr=f32, P="i32", K="i32", group="i32"),
            dict(CENTER=center, **stats),
        ))
        specs.append(CompileSpec(
            f"bn_bwd_sum[center={center}]", _bn_bwd_sum_kernel,
            dict(part_g_ptr=f32, part_gy_ptr=f32, part_y_ptr=f32, var_ptr=f32, dbeta_ptr=f32,
                 dgamma_ptr=f32, delta_ptr=f32, P="i32", K="i32", M="i32", eps="fp32"),
            dict(CENTER=center, **stats),
        ))

    # autotuned kernels: (name, kernel, signature(dtype), flag sets, blocks)
    def apply_sig(t: str) -> dict[str, str]:
        return dict(y_ptr=t, scale_ptr=f32, shift_ptr=f32, res_ptr=t, res_scale_ptr=f32,
                    res_shift_ptr=f32, z_ptr=t, M="i32", K="i32", branch_scale_ptr=f32,
                    HW="i32", bs_stride_n="i32", bs_stride_k="i32")

    def reduce_sig(t: str) -> dict[str, str]:
        return dict(dz_ptr=t, z_ptr=t, y_ptr=t, mean_ptr=f32, part_g_ptr=f32, part_gy_ptr=f32,
                    part_y_ptr=f32, dres_ptr=t, y2_ptr=t, mean2_ptr=f32, part_gy2_ptr=f32,
                    part_y2_ptr=f32, var_ptr=f32, gamma_ptr=f32, beta_ptr=f32, res_ptr=t,
                    M="i32", K="i32", rows_per_prog="i32", eps="fp32",
                    branch_scale_ptr=f32, g_branch_ptr=t, HW="i32", bs_stride_n="i32",
                    bs_stride_k="i32", branch_add_ptr=f32, y_scale_ptr=f32, y_shift_ptr=f32)

    def dx_sig(t: str) -> dict[str, str]:
        return dict(dz_ptr=t, z_ptr=t, y_ptr=t, mean_ptr=f32, var_ptr=f32, gamma_ptr=f32,
                    sum_g_ptr=f32, sum_gyhat_ptr=f32, delta_ptr=f32, dy_ptr=t, dres_ptr=t,
                    add_ptr=t, M="i32", K="i32", eps="fp32")

    def stats_sig(t: str) -> dict[str, str]:
        return dict(x_ptr=t, count_ptr=f32, mean_ptr=f32, m2_ptr=f32, M="i32", K="i32",
                    rows_per_prog="i32")

    # The block-fusion joins (RES_AFFINE, SECOND, HAS_ADD) are the last flag set of each kernel,
    # with every other feature on too: the heaviest, compiled with every block config.
    tuned = [
        ("bn_apply", _bn_apply_kernel, apply_sig, _ELEMENTWISE_BLOCKS,
         [dict(HAS_RES=r, RES_AFFINE=False, RELU=u, BRANCH_SCALE=False)
          for r in (False, True) for u in (False, True)]
         + [dict(HAS_RES=True, RES_AFFINE=True, RELU=True, BRANCH_SCALE=False),
            # a channel gate (times the drop path), then drop path alone (one scale per row)
            dict(HAS_RES=True, RES_AFFINE=True, RELU=True, BRANCH_SCALE=True,
                 PER_CHANNEL_SCALE=True),
            dict(HAS_RES=True, RES_AFFINE=True, RELU=True, BRANCH_SCALE=True)]),
        ("bn_bwd_reduce", _bn_bwd_reduce_kernel, reduce_sig, _REDUCE_BLOCKS,
         [dict(RELU=u, CENTER=c, WRITE_DRES=False, SECOND=False, BRANCH_SCALE=False)
          for u in (False, True) for c in (False, True)]
         + [dict(RELU=True, CENTER=True, WRITE_DRES=True, SECOND=False, BRANCH_SCALE=False),
            dict(RELU=True, CENTER=True, WRITE_DRES=True, SECOND=True, BRANCH_SCALE=False),
            # drop path (never with SECOND: the shortcut BN's sums come from their own pass)
            dict(RELU=True, CENTER=True, WRITE_DRES=True, SECOND=False, BRANCH_SCALE=True),
            # a channel gate: its pooled-mean gradient added to the scaled g
            dict(RELU=True, CENTER=True, WRITE_DRES=True, SECOND=False, BRANCH_SCALE=True,
                 BRANCH_ADD=True, PER_CHANNEL_SCALE=True),
            # a gate on a conv's input: g of the BN before it, times its activation's ReLU mask
            dict(RELU=False, CENTER=True, WRITE_DRES=False, SECOND=False, BRANCH_SCALE=True,
                 BRANCH_ADD=True, PER_CHANNEL_SCALE=True, ACT_MASK=True)]),
        ("bn_bwd_dx", _bn_bwd_dx_kernel, dx_sig, _ELEMENTWISE_BLOCKS,
         [dict(RELU=u, BATCH_STATS=b, HAS_GAMMA=True, WRITE_DY=True, WRITE_DRES=d, HAS_ADD=False)
          for u in (False, True) for b in (False, True) for d in (False, True)]
         + [dict(RELU=True, BATCH_STATS=True, HAS_GAMMA=False, WRITE_DY=False, WRITE_DRES=True,
                 HAS_ADD=False),
            dict(RELU=False, BATCH_STATS=True, HAS_GAMMA=True, WRITE_DY=True, WRITE_DRES=False,
                 HAS_ADD=True),
            dict(RELU=True, BATCH_STATS=True, HAS_GAMMA=True, WRITE_DY=True, WRITE_DRES=True,
                 HAS_ADD=True)]),
        ("bn_stats", _bn_stats_kernel, stats_sig, _REDUCE_BLOCKS, [{}]),
    ]
    # SiLU: off (and out of the names) in the flag sets above; one flag set per kernel with it,
    # the heaviest it runs with, compiled like those and with every block config at the widest
    # BLOCK_K (the most elements per thread)
    # (and drop path's BRANCH_SCALE off where a flag set does not name it)
    silu_off = {"bn_apply": dict(SILU=False, BRANCH_SCALE=False, PER_CHANNEL_SCALE=False),
                "bn_bwd_reduce": dict(SILU=False, HAS_RES=False, BRANCH_SCALE=False,
                                      BRANCH_ADD=False, PER_CHANNEL_SCALE=False, ACT_MASK=False)}
    silu_sets = {
        "bn_apply": dict(HAS_RES=True, RES_AFFINE=False, RELU=False, SILU=True),
        "bn_bwd_reduce": dict(RELU=False, CENTER=True, WRITE_DRES=True, SECOND=False, SILU=True,
                              HAS_RES=True),
    }
    def pruned(name: str, bm: int, w: int, bk: int, dtype: torch.dtype,
               flags: dict[str, bool]) -> dict[int, str]:
        if name == "bn_bwd_reduce":
            key = tuple(flags.get(f, False) for f in _REDUCE_SPILL_FLAGS)
            return {cc: why for cc in TARGETS
                    if (why := _reduce_spills(bm, w, bk, flags["SECOND"], flags.get("SILU", False),
                                              dtype, cc, key, flags.get("BRANCH_SCALE", False)))}
        if name != "bn_bwd_dx":
            return {}
        return {cc: why for cc in TARGETS if (why := _dx_spills(bm, w, bk, dtype, cc))}

    for name, kernel, sig, blocks, flag_sets in tuned:
        fn = kernel.fn  # the @triton.jit function under the autotuner
        bm0, w0 = blocks[0]
        off = silu_off.get(name, {})
        with_silu = [silu_sets[name]] if name in silu_sets else []
        for t, ptr in _PTR_TYPES.items():
            for flags in flag_sets + with_silu:
                label = "".join(f"{k}={int(v)}," for k, v in flags.items())
                specs.append(CompileSpec(
                    f"{name}[{t},{label}BLOCK_M={bm0},BLOCK_K=64]", fn, sig(ptr),
                    dict(off, **flags, BLOCK_K=64, BLOCK_M=bm0), num_warps=w0,
                    pruned=pruned(name, bm0, w0, 64, _DTYPES[t], flags),
                ))
        # every block config with the most features on, in fp32 (the most registers); a gate's
        # BRANCH_ADD, PER_CHANNEL_SCALE and ACT_MASK not counted: its tiles are those of drop
        # path's BRANCH_SCALE (pruned alike); of equals the first listed (bn_apply: the gate's)
        flags = max(flag_sets, key=lambda f: sum(f.values()) - f.get("BRANCH_ADD", False)
                    - f.get("PER_CHANNEL_SCALE", False) - f.get("ACT_MASK", False))
        heaviest = [(flags, bk) for bk in (16, 64, 128)] + [(f, 128) for f in with_silu]
        for bm, w in blocks:
            for flags, bk in heaviest:
                label = "".join(f"{k}={int(v)}," for k, v in flags.items())
                specs.append(CompileSpec(
                    f"{name}[fp32,{label}BLOCK_M={bm},BLOCK_K={bk},warps={w}]", fn, sig("*fp32"),
                    dict(off, **flags, BLOCK_K=bk, BLOCK_M=bm), num_warps=w,
                    pruned=pruned(name, bm, w, bk, torch.float32, flags),
                ))
    # Each compiled as a launch on ResNet shapes specialises it; each kernel's first entry also
    # unspecialised (odd channel counts, unaligned pointers).
    first = {}
    for spec in specs:
        first.setdefault(spec.kernel, spec)
    return [
        *(dataclasses.replace(s, ints=_RESNET_INTS, shape_class="resnet") for s in specs),
        *(dataclasses.replace(s, name=f"{s.name}-{UNSPECIALISED}") for s in first.values()),
    ]


__all__ = [
    "activation_sums", "apply", "backward", "batch_stats", "compile_specs", "finalize",
    "reductions", "running_affine", "sample_sums",
]
