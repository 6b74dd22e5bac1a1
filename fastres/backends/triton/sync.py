"""SyncBatchNorm on the Triton kernels: the statistics exchange between the conv epilogue's
per-tile partials and the finalize, and the backward sums' exchange (:mod:`..sync`).

Forward: the per-tile ``(count, mean, M2)`` partials are merged to one per-channel triple by
:func:`bn.finalize` (the one merge path, two-level for many tiles) and packed into the buffer
that crosses processes; the gathered triples, one per process, are then exactly the partials
:func:`bn.finalize` merges (Chan's formula in rank order), so the rest of the op runs as in one
process. Backward: each BN's ``(Σg, Σg·ŷ)`` (and Σ(y − mean)), right after a reduction kernel or
a dgrad epilogue produced them, are all-reduced before the dy operand reads them.
"""

from __future__ import annotations

import torch

from .. import sync as _sync
from . import bn

Tensor = torch.Tensor


def local_triple(count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """``[count, mean (K), M2 (K)]`` fp32 of this process' whole batch from per-tile partials
    (count (T,), mean/M2 (T, K)): merged by :func:`bn.finalize` without the affine map (in two
    levels above ``bn._MERGE_THRESHOLD`` tiles, so a stem BN's thousands of tiles are not
    looped over by a single group), then M2 = var·count (one fp32 rounding)."""
    batch_mean, var, _, _ = bn.finalize(count, mean, m2, None, None, 0.0, affine=False)
    total = count.sum(0, keepdim=True)
    return torch.cat([total, batch_mean, var * total])


def finalize(count: Tensor, mean: Tensor, m2: Tensor, bn_weight: Tensor | None,
             bn_bias: Tensor | None, eps: float,
             group: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`bn.finalize` over the whole batch of the process group: ``(mean, var, scale,
    shift, count)``, count (1,) fp32 the values per channel of all processes together."""
    counts, means, m2s = _sync.gather_triples(local_triple(count, mean, m2), group)
    stats = bn.finalize(counts, means, m2s, bn_weight, bn_bias, eps)
    return (*stats, counts.sum(0, keepdim=True))


def synced_sums(sums: tuple, count: int, var: Tensor, eps: float,
                group: str) -> tuple[tuple, tuple]:
    """``(dy sums, own sums)`` from this process' ``(Σg, Σg·ŷ, δ)`` of :func:`bn.reductions` (or
    a dgrad epilogue) over its ``count`` values per channel: one all_reduce.

    δ (the mean of the stored y minus the BN mean, a rounding correction in one process) is a
    shard's offset from the whole batch's mean here, so it is undone first: the exchanged sums
    are Σg, Σg·(y − mean)·invstd and Σ(y − mean), and δ becomes the whole batch's. The dy sums
    are the whole batch's, scaled by count / total count, the form the dy kernels read (they
    divide by this process' count); the own sums (Σg, Σg·ŷ: dβ, dγ) are this shard's, centred
    with the whole batch's δ, as PyTorch's SyncBatchNorm gives them.
    """
    sum_g, sum_gyhat, delta = sums
    invstd = torch.rsqrt(var + eps)
    raw_gy = sum_gyhat + delta * sum_g * invstd  # Σg·(y − mean)·invstd of this shard
    (all_g, all_gy, all_y), total = _sync.reduce_sums((sum_g, raw_gy, delta * count), count,
                                                      group)
    all_delta = all_y / total
    share = count / total
    dy_sums = (all_g * share, (all_gy - all_delta * all_g * invstd) * share, all_delta)
    own = (sum_g, raw_gy - all_delta * sum_g * invstd, all_delta)
    return dy_sums, own


__all__ = ["finalize", "local_triple", "synced_sums"]
