"""Fused models under DistributedDataParallel: two CPU processes on the gloo backend."""

from __future__ import annotations

import copy
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

tv = pytest.importorskip("torchvision.models.resnet")  # absent on the GPU machines

import fastres
from fastres.nn import BasicBlock, FusedBlock
from fastres.swap import fuse_report
from tests.models._util import randomize_bn
from tests.numerics import assert_close_ratio

WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank (DDP also broadcasts rank 0's)
    return randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4))


def ddp_step_worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        original = small_resnet()
        fused = fastres.fuse(original)
        assert fuse_report(fused) == [] and any(isinstance(m, BasicBlock) for m in fused.modules())
        reference = copy.deepcopy(original).double()
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the batch
        x = torch.randn(2, 3, 64, 64, generator=g)
        target = torch.randint(0, 4, (2,), generator=g)
        # the plain baseline runs channels_last, fastres' layout (see tests/models/_util.py)
        original.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        losses, grads = [], []
        for model, inp in ((fused, x), (original, x_cl), (reference, x.double())):
            ddp = DDP(model.train())
            loss = nn.functional.cross_entropy(ddp(inp), target)
            loss.backward()  # DDP all-reduces (averages) the gradients across the ranks
            losses.append(loss.detach())
            grads.append({k: t.grad for k, t in model.state_dict(keep_vars=True).items()
                          if isinstance(t, nn.Parameter)})
        assert_close_ratio(f"rank {rank} loss", *losses)
        for key in grads[0]:
            assert_close_ratio(f"rank {rank} {key}.grad", grads[0][key], grads[2][key],
                               grads[1][key])
        # the averaged gradients are the same on both ranks
        for key, grad in grads[0].items():
            gathered = [torch.empty_like(grad) for _ in range(WORLD)]
            dist.all_gather(gathered, grad.contiguous())
            assert torch.equal(gathered[0], gathered[1]), key
    finally:
        dist.destroy_process_group()


def sync_bn_worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # a torchvision model converted to SyncBatchNorm: every block is left as it was
        model = nn.SyncBatchNorm.convert_sync_batchnorm(small_resnet())
        with pytest.warns(UserWarning, match="SyncBatchNorm"):
            fused = fastres.fuse(model)
        reasons = fuse_report(fused)
        assert {p for p, _ in reasons} >= {"stem", "layer1.0", "layer4.0"}
        assert all("SyncBatchNorm is not a plain nn.BatchNorm2d" in why for _, why in reasons)
        assert not any(isinstance(m, FusedBlock) for m in fused.modules())

        # a native fastres model converted after construction: its SyncBatchNorm pairs run
        # unfused (through SyncBatchNorm itself), and fuse reports them
        native = randomize_bn(fastres.models.resnet18(num_classes=4, base_channels=8))
        plain = copy.deepcopy(native)
        for m in plain.modules():
            if isinstance(m, FusedBlock):
                m.set_fused(False)
        native = nn.SyncBatchNorm.convert_sync_batchnorm(native)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            native = fastres.fuse(native, inplace=True)
        assert any("SyncBatchNorm" in why for _, why in fuse_report(native))
        assert all(not m._views for m in native.modules() if isinstance(m, FusedBlock))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():  # eval: SyncBatchNorm does not communicate, so CPU can run it
            out = native.eval()(x)  # (DDP refuses SyncBatchNorm on CPU modules)
            base = plain.eval()(x)
            ref = copy.deepcopy(plain).double()(x.double())
        assert_close_ratio(f"rank {rank} sync-bn native", out, ref, base)
    finally:
        dist.destroy_process_group()


def test_ddp_fused_matches_unfused_loss_and_grads():
    mp.spawn(ddp_step_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_sync_batchnorm_left_unfused_with_reason():
    mp.spawn(sync_bn_worker, args=(free_port(),), nprocs=WORLD, join=True)
