"""SyncBatchNorm over NCCL on the GPU's Triton kernels: one process, ``world_size=1``.

The ops do not look at the world size: with a group they gather the one per-channel triple and
all-reduce the backward sums through NCCL, so one GPU runs the whole NCCL path. The result must
be the same op's without a group (merge order aside): checked by the error-ratio rule, the
synced call's error against float64 (the reference backend on the CPU) at most ~2x the unsynced
fused call's, for the outputs, every gradient and the running statistics. The collectives are
counted, so a group that were silently ignored would fail here. (No torchvision: the GPU
machines lack it.)
"""

from __future__ import annotations

import datetime
import inspect
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastres
from fastres.ops.block import ConvArgs, NormArgs, residual_block
from tests.numerics import assert_close_ratio
from tests.test_sync_batchnorm import CountCollectives

CL = torch.channels_last
# Triton compilations of a cold cache included (~2 dtypes x a few dozen kernel variants); below
# the 170 s per-shard cap of bench/run_gpu_tests.py, so a hang fails here with its own message
SPAWN_TIMEOUT_S = 150
N, HW = 8, 28
# bottleneck with a projection: conv1 1x1 64→64, conv2 3x3 64→64, conv3 1x1 64→256, shortcut
# 1x1 64→256 (BNs of 64 and 256 channels); the per-layer op: 3x3 64→128
BLOCK_CONVS = ((64, 64, 1), (64, 64, 3), (256, 64, 1))
SHORTCUT = (256, 64, 1)
LAYER = (128, 64, 3)


def nccl_ready() -> bool:
    return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Every input of one block step and one layer step, float64 on the CPU (rounded to the
    dtype by the caller first, so all runs see the very same values)."""
    g = torch.Generator().manual_seed(seed)

    def conv_weight(k: int, c: int, r: int) -> torch.Tensor:
        return torch.randn(k, c, r, r, generator=g, dtype=torch.float64) / (c * r * r) ** 0.5

    inputs = {"x": torch.randn(N, 64, HW, HW, generator=g, dtype=torch.float64) + 0.3}
    for i, shape in enumerate((*BLOCK_CONVS, SHORTCUT, LAYER)):
        k = shape[0]
        inputs[f"w{i}"] = conv_weight(*shape)
        inputs[f"gamma{i}"] = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        inputs[f"beta{i}"] = torch.randn(k, generator=g, dtype=torch.float64) * 0.2
        inputs[f"mean{i}"] = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
        inputs[f"var{i}"] = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    inputs["dz_block"] = torch.randn(N, 256, HW, HW, generator=g, dtype=torch.float64)
    inputs["dz_layer"] = torch.randn(N, 128, HW, HW, generator=g, dtype=torch.float64)
    return inputs


def leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype,
           device: str) -> dict[str, torch.Tensor]:
    """Fresh copies of ``inputs`` in ``dtype`` on ``device``, those that take a gradient as
    leaves requiring it."""
    t = {k: v.to(device, dtype, copy=True) for k, v in inputs.items()}
    for k, v in t.items():
        if k.startswith(("x", "w", "gamma", "beta")):
            t[k] = (v.contiguous(memory_format=CL) if v.dim() == 4 else v).requires_grad_()
    return t


def run_step(inputs: dict[str, torch.Tensor], dtype: torch.dtype, device: str, backend: str,
             group: object | None) -> dict[str, torch.Tensor]:
    """One training step of the block op and of the per-layer op from fresh ``inputs``."""
    return step_on(leaves(inputs, dtype, device), backend, group)


def step_on(t: dict[str, torch.Tensor], backend: str,
            group: object | None) -> dict[str, torch.Tensor]:
    """One training step of the block op and of the per-layer op on the tensors ``t``: outputs,
    the gradients of every input that takes one, and the running statistics after the step."""
    convs = [ConvArgs(t["w0"]), ConvArgs(t["w1"], padding=1), ConvArgs(t["w2"])]
    norms = [NormArgs(t[f"gamma{i}"], t[f"beta{i}"], t[f"mean{i}"], t[f"var{i}"])
             for i in range(4)]
    out = residual_block(t["x"], convs, norms, shortcut=ConvArgs(t["w3"]), training=True,
                         backend=backend, process_group=group)
    out.backward(t["dz_block"].contiguous(memory_format=CL))
    x2 = t["x"].detach().clone().contiguous(memory_format=CL).requires_grad_()
    z = fastres.ops.conv_bn_relu(x2, t["w4"], t["gamma4"], t["beta4"], t["mean4"], t["var4"],
                                 training=True, padding=1, backend=backend,
                                 process_group=group)
    z.backward(t["dz_layer"].contiguous(memory_format=CL))
    results = {"block out": out.detach(), "layer out": z.detach(), "layer x.grad": x2.grad}
    for k, v in t.items():
        if v.requires_grad:
            results[f"{k}.grad"] = v.grad
        elif k.startswith(("mean", "var")):
            results[f"running {k}"] = v
    return results


def sync_worker(rank: int, init_file: str, comm: str, device: str, kernels: str,
                dtypes: tuple[torch.dtype, ...]) -> None:
    """One process on communication backend ``comm``: the ops on ``kernels`` (fastres backend)
    on ``device``, with the group and without, against float64 on the CPU."""
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(0)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = torch.device("cuda", 0)  # binds the communicator eagerly
    dist.init_process_group(comm, init_method=f"file://{init_file}", rank=rank, world_size=1,
                            timeout=datetime.timedelta(seconds=120), **kwargs)
    try:
        inputs = make_inputs(0)
        for dtype in dtypes:
            # every run sees the inputs rounded to the dtype; the truth computes exactly from them
            rounded = {k: v.to(dtype).double() for k, v in inputs.items()}
            truth = run_step(rounded, torch.float64, "cpu", "reference", None)
            unsynced = run_step(rounded, dtype, device, kernels, None)
            with fastres.backends.record_calls() as served, CountCollectives() as collectives:
                synced = run_step(rounded, dtype, device, kernels, dist.group.WORLD)
                if device == "cuda":
                    torch.cuda.synchronize()
            # the fused ops served both calls with the group, one collective per BN and pass
            assert Counter((c.op, c.direction, c.backend) for c in served) == Counter({
                (op, d, kernels): 1 for op in ("residual_block", "conv_bn_relu")
                for d in ("forward", "backward")}), served
            gathers = collectives["all_gather_single"] + collectives["all_gather_into_tensor"]
            assert gathers == 5 and collectives["all_reduce"] == 5, collectives
            assert list(synced) == list(unsynced) == list(truth)
            for name, got in synced.items():
                # world size 1: only the merge order of the statistics differs from the call
                # without a group, so its error may not exceed the unsynced call's (ratio rule)
                assert_close_ratio(f"{comm} {dtype} {name}", got, truth[name], unsynced[name])
        if device == "cuda":
            graph_replay_matches_eager(inputs, kernels, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def graph_replay_matches_eager(inputs: dict[str, torch.Tensor], backend: str,
                               group: object) -> None:
    """The synced training step (fp32) captured in a CUDA graph and replayed on a new input
    gives what the eager step gives from the same state. Capture fails on a host
    synchronisation in the capturing thread (a collective's work waited on by the host, a
    tensor read into Python), so this proves the NCCL path has none. ("thread_local": NCCL's
    watchdog thread may query its own events meanwhile, which "global" mode would refuse.)"""
    t = leaves(inputs, torch.float32, "cuda")

    def clear_grads() -> None:
        for v in t.values():
            v.grad = None

    side = torch.cuda.Stream()  # warm-up on a side stream (compilations, lazy allocations)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step_on(t, backend, group)
            clear_grads()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static = step_on(t, backend, group)
    with torch.no_grad():
        t["x"].copy_(torch.randn_like(t["x"]) + 0.3)
    state = {k: v.detach().double() for k, v in t.items()}  # running statistics included
    graph.replay()
    torch.cuda.synchronize()
    replayed = {k: v.clone() for k, v in static.items()}
    eager = run_step(state, torch.float32, "cuda", backend, group)
    assert list(replayed) == list(eager)
    for name, got in replayed.items():
        # the same kernels on the same values: equal up to rounding-order differences at most
        torch.testing.assert_close(got, eager[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"graph replay {name}: {m}")


def spawn_one(tmp_path, *args: object) -> None:
    """:func:`sync_worker` in one spawned process, failed after ``SPAWN_TIMEOUT_S``."""
    context = mp.spawn(sync_worker, args=(str(tmp_path / "init"), *args), nprocs=1, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):  # raises with the worker's traceback if it failed
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the sync worker did not finish within {SPAWN_TIMEOUT_S} s")


@pytest.mark.gpu
@pytest.mark.skipif(not nccl_ready(), reason="needs CUDA and torch.distributed with NCCL")
def test_sync_ops_over_nccl_match_the_ops_without_a_group(tmp_path) -> None:
    """residual_block and conv_bn_relu with ``process_group`` over a one-process NCCL group
    (N=8, 64-256 channels, 28x28, bf16 and fp32) on the Triton kernels: the same outputs,
    gradients and running statistics as without a group."""
    spawn_one(tmp_path, "nccl", "cuda", "triton", (torch.bfloat16, torch.float32))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_sync_ops_over_gloo_world_one_match_the_ops_without_a_group(tmp_path) -> None:
    """The same check on the CPU (gloo, reference backend, fp32): runs everywhere, so the GPU
    test's own logic is exercised before a GPU run."""
    spawn_one(tmp_path, "gloo", "cpu", "reference", (torch.float32,))
