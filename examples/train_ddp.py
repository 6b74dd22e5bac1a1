"""Train a fused ResNet with DistributedDataParallel under torchrun, checkpoint, and resume.

    torchrun --nproc_per_node=2 examples/train_ddp.py --model resnet18 --sync-bn \
        --steps 20 --checkpoint ckpt.pt --save-every 10
    torchrun --nproc_per_node=2 examples/train_ddp.py --model resnet18 --sync-bn \
        --steps 20 --checkpoint ckpt.pt --resume          # continues from step 10

NCCL with one GPU per process where CUDA is present, gloo on CPU otherwise. The data is
synthetic (a batch drawn from a generator seeded by step and rank), so a resumed run sees the
same batches as an uninterrupted one and its steps are bitwise the same on the same backend.
A checkpoint holds the model's state_dict (the plain model's keys: it loads into the unfused
model too), the optimizer's, the step and every RNG state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastres


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="a torchvision model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="images per process and step")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per step (DDP no_sync on all but the last)")
    p.add_argument("--static-graph", action="store_true",
                   help="DDP static_graph=True (PyTorch: not with --accumulate)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm over all processes")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--checkpoint", help="checkpoint file (written by rank 0)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-log", help="rank 0 writes each step's loss here (JSON lines)")
    return p.parse_args(argv)


def batch(step: int, micro: int, rank: int, args: argparse.Namespace, device: torch.device):
    """The (images, labels) of one micro-batch: a function of (seed, step, micro, rank) only."""
    g = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, DDP]:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = torchvision.models.get_model(args.model, num_classes=args.num_classes)
    on_gpu = device.type == "cuda"
    if args.sync_bn and on_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = fastres.fuse(model, inplace=True).to(device, memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[device.index] if on_gpu else None, static_graph=args.static_graph)
    if args.sync_bn and not on_gpu:
        # DDP refuses SyncBatchNorm in CPU modules (PyTorch's own cannot train on CPU); fastres'
        # fused SyncBatchNorm can, and converting after wrapping keeps the same parameters and
        # buffers, which is all DDP holds
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, ddp


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    model, ddp = build(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    start = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        set_rng_state(ckpt["rng"][rank], device)
    log = open(args.loss_log, "a") if args.loss_log and rank == 0 else None  # noqa: SIM115
    for step in range(start, args.steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(args.accumulate):
            x, y = batch(step, micro, rank, args, device)
            last = micro == args.accumulate - 1
            with ddp.no_sync() if not last else contextlib.nullcontext(), torch.autocast(
                    device.type, torch.bfloat16, enabled=args.bf16 and on_gpu):
                loss = nn.functional.cross_entropy(ddp(x), y) / args.accumulate
            loss.backward()
        opt.step()
        if log is not None:
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
        if args.checkpoint and args.save_every and (step + 1) % args.save_every == 0:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "step": step + 1, "rng": rngs}, args.checkpoint)
            dist.barrier()
    if log is not None:
        log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
