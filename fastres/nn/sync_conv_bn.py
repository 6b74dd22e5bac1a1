"""Which process group a SyncBatchNorm synchronises over in a call.

A fused pair or block with an ``nn.SyncBatchNorm`` that synchronises (training, a process group
of more than one) runs the same fused ops as one process, given that group
(``process_group=`` of :func:`fastres.ops.conv_bn_relu` and :func:`fastres.ops.block
.residual_block`): each BN's per-channel ``(count, mean, M2)`` is exchanged in one all_gather
forward, its ``(Σg, Σg·ŷ)`` in one all_reduce backward (:mod:`fastres.backends.sync`). It runs
wherever ``torch.distributed`` does, on CPU with gloo too (where PyTorch's own SyncBatchNorm
refuses to train).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def sync_group(bn: nn.Module):
    """The process group ``bn`` synchronises over in this call, or None when PyTorch's
    SyncBatchNorm would not synchronise (eval, no process group, a group of one)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


__all__ = ["sync_group"]
