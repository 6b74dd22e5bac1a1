"""SyncBatchNorm's two exchanges, shared by the backends that serve it (triton, reference).

A BatchNorm synchronised over a process group needs, per step, exactly two collectives:

* forward, :func:`gather_triples`: every process merges its own batch to one per-channel
  ``(count, mean, M2)`` triple (the backend's business: the Triton backend merges the conv
  epilogue's per-tile partials with its merge kernel), and one ``all_gather`` of those
  ``1 + 2·K`` floats gives every process all of them, in rank order. Merging them with Chan's
  formula in that order (the backend's finalize) gives every process bitwise the same statistics;
  shards may have different sizes (the counts travel with the triples, as tensors: no host sync).
* backward, :func:`reduce_sums`: one ``all_reduce`` of the per-channel ``(Σg, Σg·ŷ)`` of this
  process (the Triton backend adds Σ(y − mean), see ``triton/sync.py``) with its value count
  appended, so that the dy formula's means over the whole batch come out without anything
  saved from the forward.

The process group travels by its c10d name (``ProcessGroup.group_name``): a process group can not
be an argument of a ``torch.library`` custom op, a string can, and c10d resolves the name of
every group it created (:func:`process_group`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def group_name(group: object | None) -> str:
    """The c10d name of ``group`` (None: the default group), as the ops take it."""
    if group is None:
        group = dist.group.WORLD
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a torch.distributed ProcessGroup, got {type(group).__name__}")
    return name


def process_group(name: str) -> dist.ProcessGroup:
    """The process group c10d registered under ``name``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("SyncBatchNorm across processes needs an initialised "
                           "torch.distributed process group")
    return dist.distributed_c10d._resolve_process_group(name)


def _all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup) -> None:
    # all_gather_single is all_gather_into_tensor's newer name (the old one warns from torch 2.12)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def gather_triples(packed: Tensor, group: str) -> tuple[Tensor, Tensor, Tensor]:
    """All processes' per-channel triples from this process' ``packed`` = ``[count, mean (K),
    M2 (K)]`` (1 + 2·K floats, one dtype): ``(counts (P,), means (P, K), M2s (P, K))`` in rank
    order, contiguous. One collective."""
    pg = process_group(group)
    k = (packed.numel() - 1) // 2
    gathered = packed.new_empty(dist.get_world_size(pg) * packed.numel())
    _all_gather(gathered, packed.contiguous(), pg)  # concatenated (gloo takes no stacked form)
    gathered = gathered.view(-1, packed.numel())
    return (gathered[:, 0].contiguous(), gathered[:, 1:1 + k].contiguous(),
            gathered[:, 1 + k:].contiguous())


def chan_merge(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count (1,), mean (K,), M2 (K,))`` of the union of the rows ``(counts (P,), means (P, K),
    M2s (P, K))`` (Chan et al.: M2 = Σ M2_p + n_p·(mean_p − mean)², deviations from the merged
    mean, so no large nearly equal sums cancel); in the inputs' dtype, fixed order."""
    count = counts.sum(0, keepdim=True)
    n = counts[:, None]
    mean = (n * means).sum(0) / count
    m2 = (m2s + n * (means - mean) ** 2).sum(0)
    return count, mean, m2


def reduce_sums(sums: Sequence[Tensor], count: int, group: str) -> tuple[list[Tensor], Tensor]:
    """The per-channel backward ``sums`` ((K,) each, e.g. Σg and Σg·ŷ) of this process over
    its ``count`` values per channel, summed over the process group: ``(sums, total count
    (1,))``. One ``all_reduce`` of ``[*sums, count]``. (Callers keep their own sums for dγ and
    dβ: each process' share, summed by DDP, as with PyTorch's SyncBatchNorm.)"""
    k = sums[0].numel()
    dtype = sums[0].dtype
    packed = torch.cat([*(t.reshape(k).to(dtype) for t in sums),
                        sums[0].new_full((1,), float(count), dtype=dtype)])
    dist.all_reduce(packed, group=process_group(group))
    return [packed[i * k:(i + 1) * k] for i in range(len(sums))], packed[len(sums) * k:]


__all__ = ["chan_merge", "gather_triples", "group_name", "process_group", "reduce_sums"]
