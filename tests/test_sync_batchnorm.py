"""SyncBatchNorm through the fused kernels: the per-layer op and whole blocks (post-activation
with a projection, pre-activation with the entry BN) on the triton backend (Triton interpreter
on CPU) and the reference backend, over 2 and 3 gloo processes with unequal batch shards.

Every rank runs its shard; the truth is the plain block (``nn.BatchNorm2d``) on the whole batch
in float64, the baseline the same in fp32 (PyTorch's own ``nn.SyncBatchNorm`` refuses to train on
CPU, and on the whole batch it is this same function). Checked by the error-ratio rule for two
steps: the rank's output and input gradient against the whole batch's rows, the parameter
gradients summed over the ranks (what DDP's average is, times the world size), the running
statistics after both steps. The collectives of each step are counted: one all_gather per
BatchNorm forward, one all_reduce per BatchNorm backward, nothing else.
"""

from __future__ import annotations

import copy
import socket
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres
from fastres.nn import BasicBlock, ConvBNReLU, PreActBasicBlock
from tests.backends.test_triton_conv_bwd import FORBIDDEN
from tests.models._util import randomize_bn
from tests.numerics import assert_close_ratio

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

CL = torch.channels_last
SHARDS = {2: (2, 3), 3: (3, 2, 2)}  # samples per rank: unequal shards
STEPS = 2
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor", "all_to_all_single", "gather", "reduce")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountCollectives:
    """Counts calls of torch.distributed's collectives inside the ``with`` block (patched on
    the module, where fastres looks them up at call time)."""

    def __enter__(self) -> Counter:
        self.counts: Counter = Counter()
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.counts[_name] += 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counted)
        return self.counts

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


class Layer(nn.Module):
    """conv → BN (+ residual) → ReLU; ``fused`` runs it as ConvBNReLU (the per-layer op)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x[:, :2].repeat(1, 3, 1, 1) * 0.5
        if getattr(self, "fused_view", None) is not None:
            return self.fused_view(x, residual)
        return torch.relu(self.bn(self.conv(x)) + residual)


def build(case: str) -> tuple[nn.Module, int, int]:
    """``(module with plain BatchNorm2d, input channels, input size)``, the same on every rank."""
    torch.manual_seed(0)
    if case == "layer":
        module, cin, hw = Layer(), 4, 5
    elif case == "post-proj":
        module, cin, hw = BasicBlock(4, 6, stride=2, downsample=True), 4, 5
    else:  # pre-activation, entry BN + ReLU, projection on the activated input
        module, cin, hw = PreActBasicBlock(4, 6, stride=2, downsample=True), 4, 5
    return randomize_bn(module), cin, hw


def norms_of(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def make_fused(plain: nn.Module, case: str) -> nn.Module:
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    if case == "layer":
        fused.fused_view = ConvBNReLU.from_modules(fused.conv, fused.bn)
    else:
        fused.set_fused(True)
        assert fused.block_reason() is None, fused.block_reason()
    return fused.train()


def plain_run(model: nn.Module, x: torch.Tensor, dz: torch.Tensor):
    if hasattr(model, "set_fused"):
        model.set_fused(False)  # plain PyTorch modules, layer by layer
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(dz.to(out.dtype))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return out.detach(), x.grad, grads


def sync_worker(rank: int, world: int, port: int, case: str, backend: str,
                dtype: torch.dtype = torch.float32) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        sizes = SHARDS[world]
        begin = sum(sizes[:rank])
        shard = slice(begin, begin + sizes[rank])
        plain, cin, hw = build(case)
        fused = make_fused(plain, case).to(dtype)
        base = copy.deepcopy(plain).to(dtype).train()
        ref = copy.deepcopy(plain).double().train()
        n_bn = len(norms_of(plain))
        op = "conv_bn_relu" if case == "layer" else "residual_block"
        for step in range(STEPS):
            g = torch.Generator().manual_seed(10 + step)  # the whole batch, on every rank
            x = (torch.randn(sum(sizes), cin, hw, hw, generator=g) + 0.5).contiguous(
                memory_format=CL)
            with torch.no_grad():
                out_shape = plain.eval()(x[:1]).shape[1:]
            dz = torch.randn(sum(sizes), *out_shape, generator=g)
            base_out, base_dx, base_grads = plain_run(base, x.to(dtype), dz)
            ref_out, ref_dx, ref_grads = plain_run(ref, x.double(), dz)
            xs = x[shard].to(dtype).requires_grad_()
            with fastres.use_backend(backend), fastres.backends.record_calls() as served, \
                    CountCollectives() as forward_calls:
                out = fused(xs)
            with fastres.use_backend(backend), fastres.backends.record_calls() as served_bwd, \
                    CountCollectives() as backward_calls:
                out.backward(dz[shard].to(dtype).contiguous(memory_format=CL))
            assert [(c.op, c.backend) for c in served + served_bwd] == \
                [(op, backend)] * 2, served + served_bwd
            assert forward_calls == Counter(all_gather_single=n_bn) or \
                forward_calls == Counter(all_gather_into_tensor=n_bn), forward_calls
            assert backward_calls == Counter(all_reduce=n_bn), backward_calls
            where = f"{case} {backend} {dtype} world {world} rank {rank} step {step}"
            assert_close_ratio(f"{where} output", out, ref_out[shard], base_out[shard])
            assert_close_ratio(f"{where} x.grad", xs.grad, ref_dx[shard], base_dx[shard])
            for name, p in fused.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)  # each rank holds its shard's share of the sum
                p.grad = None
                assert_close_ratio(f"{where} {name}.grad", grad, ref_grads[name],
                                   base_grads[name])
        # running statistics after both steps, bitwise the same on every rank (rank order)
        for mine, b, r in zip(norms_of(fused), norms_of(base), norms_of(ref), strict=True):
            assert int(mine.num_batches_tracked) == STEPS
            for name in ("running_mean", "running_var"):
                assert_close_ratio(f"{case} {backend} rank {rank} {name}", getattr(mine, name),
                                   getattr(r, name), getattr(b, name))
                everywhere = [torch.empty_like(getattr(mine, name)) for _ in range(world)]
                dist.all_gather(everywhere, getattr(mine, name))
                assert all(torch.equal(t, everywhere[0]) for t in everywhere), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", ["layer", "post-proj", "pre-act"])
@pytest.mark.parametrize("world", [2, 3])
def test_fused_sync_batchnorm_matches_the_whole_batch(world: int, case: str,
                                                      backend: str) -> None:
    mp.spawn(sync_worker, args=(world, free_port(), case, backend), nprocs=world, join=True)


@pytest.mark.parametrize("case", ["layer", "post-proj"])
def test_fused_sync_batchnorm_in_fp16(case: str) -> None:
    """fp16 activations and parameters (the stored y rounded to fp16, statistics in fp32),
    against plain fp16 BN on the whole batch."""
    mp.spawn(sync_worker, args=(2, free_port(), case, "triton", torch.float16), nprocs=2,
             join=True)


def profiler_worker(rank: int, world: int, port: int) -> None:
    """A training step of fused SyncBatchNorm blocks (post-activation with a projection, then
    pre-activation) on the triton backend, seen by the profiler: no PyTorch conv or BN op."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        post, _, _ = build("post-proj")
        pre = PreActBasicBlock(6, 6)  # an identity shortcut, on the post block's output
        model = nn.Sequential(make_fused(post, "post-proj"), make_fused(randomize_bn(pre),
                                                                          "pre-act"))
        x = torch.randn(SHARDS[world][rank], 4, 5, 5).contiguous(memory_format=CL)
        from torch.profiler import ProfilerActivity, profile

        with fastres.use_backend("triton"), fastres.backends.record_calls() as served, \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x.requires_grad_()).square().mean().backward()
        assert {(c.op, c.backend) for c in served} == {("residual_block", "triton")}, served
        names = {e.name for e in prof.events()}
        hit = sorted(n for n in names if any(f in n for f in FORBIDDEN))
        assert not hit, f"PyTorch ran {hit}"
        assert x.grad is not None and torch.isfinite(x.grad).all()
        # one block op takes one process group: a block whose BNs do not share it runs its
        # pairs fused one by one (each with its own group), and says why
        block = model[0]
        block.bn2 = nn.BatchNorm2d(6)
        assert "different process groups" in block.block_reason()
        with pytest.raises(TypeError, match="ProcessGroup"):
            fastres.ops.conv_bn_relu(x.detach(), block.conv1.weight, None, None, None, None,
                                     training=True, padding=1, process_group=object())
    finally:
        dist.destroy_process_group()


def test_fused_sync_batchnorm_step_runs_no_pytorch_conv_or_bn() -> None:
    mp.spawn(profiler_worker, args=(2, free_port()), nprocs=2, join=True)


def custom_op_worker(rank: int, world: int, port: int) -> None:
    """The ops with a process group name: opcheck (schema, fake kernels, autograd registration)
    and ``torch.compile(fullgraph=True)`` of a SyncBatchNorm pair and block, forward and
    backward, giving the eager result (reference backend)."""
    from fastres.backends.sync import group_name
    from fastres.ops.conv_bn_relu import conv_bn_relu_bwd, conv_bn_relu_fwd

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(rank)
        group = group_name(None)
        x = torch.randn(2 + rank, 4, 5, 5).contiguous(memory_format=CL).requires_grad_()
        w = torch.randn(6, 4, 3, 3, requires_grad=True)
        gamma, beta = (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6, requires_grad=True)
        fwd = (x, w, None, gamma, beta, None, None, None, [1, 1], [1, 1], [1, 1], 1, True, 1e-5,
               "relu", True, "reference", group)
        torch.library.opcheck(conv_bn_relu_fwd, fwd)
        z, y, mean, var, count = (t.detach() for t in conv_bn_relu_fwd(*fwd))
        assert count.tolist() == [float(sum(2 + r for r in range(world)) * 25)]
        torch.library.opcheck(conv_bn_relu_bwd, (
            torch.randn_like(z), x.detach(), w.detach(), y, z, mean, var, gamma.detach(), None,
            None, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, "relu", False,
            [True, True, False, True, True, False], "reference", group))

        from fastres.ops.block import residual_block_fwd

        w4 = [torch.randn(4, 4, 3, 3, requires_grad=True) for _ in range(2)]
        gammas = [(torch.rand(4) + 0.5).requires_grad_() for _ in range(2)]
        betas = [torch.randn(4, requires_grad=True) for _ in range(2)]
        torch.library.opcheck(residual_block_fwd, (
            x, w4, gammas, betas, [torch.zeros(4)] * 2, [torch.ones(4)] * 2, [1] * 14, False,
            False, False, [1e-5, 1e-5], True, True, "reference", None, None, group))

        torch.manual_seed(0)
        pair = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.SyncBatchNorm(6))
        pair = ConvBNReLU.from_modules(*pair).train()
        block = make_fused(BasicBlock(4, 6, downsample=True), "post-proj")
        for fused in (pair, block):
            twin = copy.deepcopy(fused)
            torch._dynamo.reset()
            compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
            results = []
            for module in (fused, compiled):
                xs = x.detach().clone().requires_grad_()
                with fastres.use_backend("reference"):
                    out = module(xs)
                    out.square().sum().backward()
                results.append((out, xs.grad))
            (eager_out, eager_dx), (compiled_out, compiled_dx) = results
            torch.testing.assert_close(compiled_out, eager_out)
            torch.testing.assert_close(compiled_dx, eager_dx)
            for mine, theirs in zip(norms_of(twin), norms_of(fused), strict=True):
                torch.testing.assert_close(mine.running_var, theirs.running_var)
    finally:
        dist.destroy_process_group()


def test_ops_with_a_process_group_pass_opcheck_and_compile() -> None:
    mp.spawn(custom_op_worker, args=(2, free_port()), nprocs=2, join=True)


def test_local_triple_merges_many_tiles_in_two_levels() -> None:
    """The forward exchange's local merge of more tiles than the finalize merges in one level
    (a stem BN has thousands): the triple equals the float64 merge of the same partials, by the
    error-ratio rule against PyTorch's fp32 merge. Tiles of unequal size, one empty, channel
    means far from 0 (mean ≫ spread, where a naive E[y²] − E[y]² merge loses its digits)."""
    from fastres.backends.triton import bn
    from fastres.backends.triton.sync import local_triple
    from tests.numerics import merge_partials

    tiles, k = 1100, 5
    assert tiles > bn._MERGE_THRESHOLD  # the two-level path
    g = torch.Generator().manual_seed(3)
    count = torch.randint(1, 65, (tiles,), generator=g).double()
    count[7] = 0.0  # a tile with no rows: its slots hold garbage that must not count
    mean = 40.0 + torch.randn(k, dtype=torch.float64) * 5 \
        + torch.randn(tiles, k, generator=g, dtype=torch.float64) * 0.3
    m2 = count[:, None] * (torch.rand(tiles, k, generator=g, dtype=torch.float64) + 0.1)
    mean[7], m2[7] = 1e6, 1e6

    def triple(mu: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        total = n.sum(0, keepdim=True)
        return torch.cat([total, mu, var * total])

    c32, mean32, m2_32 = count.float(), mean.float(), m2.float()
    rows = count > 0  # the references leave the empty tile out; the kernel must ignore it
    # the truth and the baseline see the fp32-rounded partials the kernel reads
    truth = triple(*merge_partials(c32[rows].double(), mean32[rows].double(),
                                   m2_32[rows].double()), count)
    plain = triple(*merge_partials(c32[rows], mean32[rows], m2_32[rows]), c32)
    got = local_triple(c32, mean32, m2_32)
    assert got.dtype == torch.float32 and got.shape == (1 + 2 * k,)
    assert got[0].item() == count.sum().item()
    assert_close_ratio("local triple mean", got[1:1 + k], truth[1:1 + k], plain[1:1 + k])
    assert_close_ratio("local triple M2", got[1 + k:], truth[1 + k:], plain[1 + k:])
