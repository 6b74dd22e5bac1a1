"""SyncBatchNorm on the Triton kernels: the statistics exchange between the conv epilogue's
per-tile partials and the finalize, and the backward sums' exchange (:mod:`..sync`).

Forward: the per-tile ``(count, mean, M2)`` partials are merged to one per-channel triple by
``bn._bn_merge_kernel`` (one group of all tiles), written straight into the buffer that crosses
processes; the gathered triples, one per process, are then exactly the partials
:func:`bn.finalize` merges (Chan's formula in rank order), so the rest of the op runs as in one
process. Backward: each BN's ``(Σg, Σg·ŷ)``, right after a reduction kernel or a dgrad epilogue
produced them, are all-reduced before the dy operand reads them.
"""

from __future__ import annotations

import torch
import triton

from .. import _alloc
from .. import sync as _sync
from . import bn

Tensor = torch.Tensor


def local_triple(count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """``[count, mean (K), M2 (K)]`` fp32 of this process' whole batch from per-tile partials
    (count (T,), mean/M2 (T, K)), one merge launch."""
    t, k = mean.shape
    mean = mean.contiguous()
    packed = _alloc.empty(1 + 2 * k, dtype=torch.float32, device=mean.device)
    bn._bn_merge_kernel[(1, triton.cdiv(k, bn._BLOCK_K_STATS))](
        count.contiguous(), mean, m2.contiguous(), packed[:1], packed[1:1 + k], packed[1 + k:],
        t, k, t, BLOCK_T=bn._BLOCK_T, BLOCK_K=bn._BLOCK_K_STATS,
    )
    packed[1:1 + k] += mean[0]  # the merge writes means relative to tile 0's
    return packed


def finalize(count: Tensor, mean: Tensor, m2: Tensor, bn_weight: Tensor | None,
             bn_bias: Tensor | None, eps: float,
             group: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`bn.finalize` over the whole batch of the process group: ``(mean, var, scale,
    shift, count)``, count (1,) fp32 the values per channel of all processes together."""
    counts, means, m2s = _sync.gather_triples(local_triple(count, mean, m2), group)
    stats = bn.finalize(counts, means, m2s, bn_weight, bn_bias, eps)
    return (*stats, counts.sum(0, keepdim=True))


def synced_sums(sums: tuple, count: int, group: str) -> tuple:
    """``(Σg, Σg·ŷ, δ)`` with the first two over the whole batch, in the form the dy kernels
    read (see :func:`fastres.backends.sync.reduce_sums`); δ, the centring correction of this
    process' stored y, stays local (each process' Σ(y − mean − δ) is 0, so is the whole
    batch's)."""
    sum_g, sum_gyhat = _sync.reduce_sums(sums[0], sums[1], count, group)
    return (sum_g, sum_gyhat, *sums[2:])


__all__ = ["finalize", "local_triple", "synced_sums"]
