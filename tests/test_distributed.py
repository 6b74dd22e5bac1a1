"""Fused models under DistributedDataParallel: two CPU processes on the gloo backend. Where
torchvision is absent (the GPU machines), the SyncBatchNorm tests use fastres' own ResNet."""

from __future__ import annotations

import copy
import socket
import warnings
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastres
from fastres.models.resnet import build_resnet
from fastres.nn import BasicBlock, FusedBlock
from fastres.nn.stem import FoldedSyncBatchNorm
from fastres.swap import fuse_report
from tests.models._util import randomize_bn
from tests.numerics import assert_close_ratio

WORLD = 2

try:
    import torchvision.models.resnet as tv
except ImportError:  # absent on the GPU machines: fastres' own ResNet stands in where it can
    tv = None
needs_torchvision = pytest.mark.skipif(tv is None, reason="needs torchvision")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank (DDP also broadcasts rank 0's)
    return randomize_bn(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=4))


def small_fastres_resnet(fused: bool) -> nn.Module:
    """fastres' ResNet of the same structure (torchvision's modules and keys): every block and
    the stem fused, or all plain PyTorch layer by layer."""
    torch.manual_seed(0)
    model = randomize_bn(build_resnet(BasicBlock, [1, 1, 1, 1], num_classes=4))
    for m in model.modules():
        if isinstance(m, FusedBlock):
            m.set_fused(fused)
    return model


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


SYNC_MODELS = {
    # converted before fusing: every pair (the stem too) fuses with its SyncBatchNorm
    "convert-then-fuse": lambda: fastres.fuse(
        nn.SyncBatchNorm.convert_sync_batchnorm(small_resnet())),
    # converted after fusing: the stem and the blocks pick the new SyncBatchNorms up
    "fuse-then-convert": lambda: nn.SyncBatchNorm.convert_sync_batchnorm(
        fastres.fuse(small_resnet())),
}


def fastres_sync_resnet() -> nn.Module:
    """fastres' ResNet with SyncBatchNorms, its fused views rebuilt over them."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small_fastres_resnet(False))
    for m in model.modules():
        if isinstance(m, FusedBlock):
            m.set_fused(True)
    return model


FASTRES_SYNC_MODELS = {"fastres-resnet": fastres_sync_resnet}  # needs no torchvision


def sync_bn_worker(rank: int, port: int, device: str = "cpu", backend: str = "gloo",
                   torchvision: bool = True) -> None:
    """Each rank trains on its half of one batch; the fused SyncBatchNorm model must give the
    plain BN model's result on the whole batch: outputs, averaged gradients, running statistics.
    (DDP refuses SyncBatchNorm in CPU modules, so the gradients are averaged by hand, as DDP
    would.) ``torchvision=False``: fastres' own ResNet instead of a fused torchvision one."""
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(7)  # the same whole batch on every rank
        x = torch.randn(2 * WORLD, 3, 48, 48, generator=g).to(device)
        target = torch.randint(0, 4, (2 * WORLD,), generator=g).to(device)
        shard = slice(2 * rank, 2 * rank + 2)
        original = (small_resnet() if torchvision else small_fastres_resnet(False))
        original.train().to(device)
        reference = copy.deepcopy(original).cpu().double()
        original.to(memory_format=torch.channels_last)
        results = []  # (output on this shard, {param: grad}, state_dict) for plain and truth
        for model, inp in ((original, x.contiguous(memory_format=torch.channels_last)),
                           (reference, x.cpu().double())):
            out = model(inp)
            nn.functional.cross_entropy(out, target.to(out.device)).backward()
            results.append((out[shard], tensors(model)))
        for name, make in (SYNC_MODELS if torchvision else FASTRES_SYNC_MODELS).items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing may be left unfused
                fused = make().train().to(device)
            with fastres.backends.record_calls() as served:
                out = fused(x[shard])
                nn.functional.cross_entropy(out, target[shard]).backward()
            # the fused path, not a layer-by-layer fallback: the stem's conv_bn_relu and one
            # residual_block per block, forward and backward, on the fused kernels on CUDA
            fused_backend = "triton" if device == "cuda" else "reference"
            n_blocks = sum(isinstance(m, BasicBlock) for m in fused.modules())
            expected = Counter({("conv_bn_relu", "forward"): 1, ("conv_bn_relu", "backward"): 1,
                                ("residual_block", "forward"): n_blocks,
                                ("residual_block", "backward"): n_blocks})
            assert n_blocks == 4 and Counter((c.op, c.direction) for c in served) == expected, \
                (name, served)
            assert {c.backend for c in served} == {fused_backend}, (name, served)
            assert type(fused.bn1) is (FoldedSyncBatchNorm if torchvision
                                       else nn.SyncBatchNorm), name
            assert all(type(v.bn) is nn.SyncBatchNorm
                       for m in fused.modules() if isinstance(m, FusedBlock)
                       for v in m._views.values()), name
            mine = tensors(fused)
            for t in mine.values():
                if isinstance(t, nn.Parameter):
                    dist.all_reduce(t.grad)
                    t.grad /= WORLD
            (base_out, base), (ref_out, ref) = results
            where = f"rank {rank} {name}"
            assert_close_ratio(f"{where} output", out, ref_out, base_out)
            assert list(mine) == list(base)
            for key, t in mine.items():
                if isinstance(t, nn.Parameter):
                    assert_close_ratio(f"{where} {key}.grad", t.grad, ref[key].grad,
                                       base[key].grad)
                elif key.endswith(("running_mean", "running_var")):
                    assert_close_ratio(f"{where} {key}", t, ref[key], base[key])
                elif key.endswith("num_batches_tracked"):
                    assert int(t) == int(base[key]) == 1, key
    finally:
        dist.destroy_process_group()


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


@needs_torchvision
def test_ddp_fused_matches_unfused_loss_and_grads():
    mp.spawn(ddp_step_worker, args=(free_port(),), nprocs=WORLD, join=True)


@needs_torchvision
def test_fused_sync_batchnorm_matches_plain_bn_on_the_whole_batch():
    mp.spawn(sync_bn_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_fused_sync_batchnorm_of_fastres_resnet_matches_plain_bn_on_the_whole_batch():
    """The same with fastres' own ResNet: what the GPU test runs where torchvision is absent."""
    mp.spawn(sync_bn_worker, args=(free_port(), "cpu", "gloo", False), nprocs=WORLD, join=True)


@pytest.mark.gpu
def test_fused_sync_batchnorm_on_cuda():
    """NCCL with a GPU per rank; on a one-GPU machine both ranks share it over gloo (NCCL
    refuses two ranks on one device), which still runs the CUDA path of every collective.
    fastres' own ResNet where torchvision is absent (the GPU machines)."""
    backend = "nccl" if torch.cuda.device_count() >= WORLD and dist.is_nccl_available() \
        else "gloo"
    mp.spawn(sync_bn_worker, args=(free_port(), "cuda", backend, tv is not None), nprocs=WORLD,
             join=True)


def sync_silu_worker(rank: int, port: int) -> None:
    """ConvBNReLU(act="silu") over a SyncBatchNorm, each rank on its half of one batch, with a
    residual: the plain conv → BatchNorm2d → + residual → SiLU on the whole batch, in fp32 and
    float64: outputs, input and residual gradients, summed parameter gradients, running
    statistics."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same modules and whole batch on every rank
        conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.SyncBatchNorm(8)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        plain = nn.BatchNorm2d(8)
        plain.load_state_dict(bn.state_dict())
        x, res = torch.randn(2 * WORLD, 3, 9, 9), torch.randn(2 * WORLD, 8, 9, 9)
        dz = torch.randn(2 * WORLD, 8, 9, 9)
        shard = slice(2 * rank, 2 * rank + 2)
        results = []
        for dt in (torch.float32, torch.float64):
            pair = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(plain)).to(dt).train()
            xs, rs = (t.to(dt, copy=True).requires_grad_() for t in (x, res))
            z = nn.functional.silu(pair(xs) + rs)
            z.backward(dz.to(dt))
            results.append((z[shard], xs.grad[shard], rs.grad[shard], pair))
        fused = fastres.nn.ConvBNReLU.from_modules(conv, bn, act="silu").train()
        xs, rs = x[shard].clone().requires_grad_(), res[shard].clone().requires_grad_()
        with fastres.backends.record_calls() as served:
            z = fused(xs, rs)
        assert [c.backend for c in served] == ["reference"]  # the op, over the process group
        z.backward(dz[shard])
        for p in (conv.weight, bn.weight, bn.bias):
            dist.all_reduce(p.grad)  # each rank's gradient is its shard's part of the sum
        (base_z, base_dx, base_dr, base), (ref_z, ref_dx, ref_dr, ref) = results
        where = f"rank {rank}"
        assert_close_ratio(f"{where} output", z, ref_z, base_z)
        assert_close_ratio(f"{where} x.grad", xs.grad, ref_dx, base_dx)
        assert_close_ratio(f"{where} residual.grad", rs.grad, ref_dr, base_dr)
        for name, mine in (("0.weight", conv.weight), ("1.weight", bn.weight),
                           ("1.bias", bn.bias)):
            assert_close_ratio(f"{where} {name}.grad", mine.grad, ref.get_parameter(name).grad,
                               base.get_parameter(name).grad)
        for name in ("running_mean", "running_var"):
            assert_close_ratio(f"{where} {name}", getattr(bn, name), getattr(ref[1], name),
                               getattr(base[1], name))
    finally:
        dist.destroy_process_group()


def test_fused_sync_batchnorm_with_silu_matches_plain_bn_on_the_whole_batch():
    mp.spawn(sync_silu_worker, args=(free_port(),), nprocs=WORLD, join=True)
