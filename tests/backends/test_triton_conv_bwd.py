"""The Triton convolution backward (``fastres.backends.triton.conv_bwd``) against float64.

dgrad and wgrad are checked alone: they form dy = dBN(dReLU(dz)) from (dz, z, y) and the BN
sums while loading it, so the truth is PyTorch's convolution backward in float64 of the float64
dy computed from the same stored tensors, and the base is plain PyTorch in the test dtype (dy
in fp32 rounded to the dtype, then ``aten.convolution_backward``), compared with the
error-ratio rule of ``tests.numerics``. Then the whole op's gradients on the triton backend,
determinism, a profiled training step of fused models (no PyTorch convolution or BN runs), and
the number of kernel launches per layer backward. Outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastres
from fastres.backends import ConvParams, devices
from fastres.backends.reference import bn_relu_backward
from fastres.backends.triton import bn, conv_bwd
from tests.numerics import assert_close_ratio
from tests.ops.cases import Case, run_case

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int = 2
    c: int = 16
    h: int = 9
    w: int = 9
    k: int = 16
    r: int = 3
    s: int = 3
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def conv(self) -> ConvParams:
        return ConvParams(self.stride, self.padding, self.dilation, self.groups)

    @property
    def id(self) -> str:
        d, default = dataclasses.asdict(self), dataclasses.asdict(Shape())
        return "-".join(f"{k}{v}" for k, v in d.items() if v != default[k]) or "default"


SHAPES = [
    Shape(),  # 3x3: tensor-core dgrad, per-tap wgrad tiles
    Shape(c=32, k=24, r=1, s=1, padding=(0, 0), stride=(2, 2), h=9, w=8),  # projection: odd
    # pixels are reached by no tap
    Shape(c=3, k=16, r=7, s=7, stride=(2, 2), padding=(3, 3), h=11, w=9),  # stem: flat wgrad
    Shape(c=16, k=20, r=3, s=1, stride=(2, 1), padding=(1, 0), h=8, w=7),  # rectangular, asym.
    Shape(c=32, k=32, groups=2, stride=(2, 2), h=8, w=9),  # 16 per group: group axis
    Shape(c=32, k=32, groups=8, stride=(2, 2), h=7, w=6),  # 4 per group (ResNeXt 32x4d): direct
    Shape(c=16, k=24, groups=2, h=5, w=4),  # 8 in / 12 out per group, direct
    Shape(c=16, k=16, groups=16, h=7, w=8),  # depthwise
    Shape(dilation=(2, 2), padding=(2, 2), h=10, w=9),
    Shape(n=1, c=5, k=7, h=6, w=5),  # odd everything, N=1 (few channels: flat wgrad)
]
SLOW_SHAPES = [
    Shape(c=40, k=48, h=7, w=6),  # channels past one slab
    Shape(c=16, k=16, r=7, s=7, padding=(3, 3), h=9, w=9),  # 7x7, not the stem
    Shape(c=16, k=16, stride=(3, 2), padding=(0, 1), h=11, w=8),  # stride 3: 3x2 phases
    Shape(c=16, k=16, stride=(2, 2), dilation=(2, 2), padding=(2, 2), h=9, w=10),  # gcd(2, 2)
    Shape(c=48, k=48, groups=3, h=6, w=7),  # 16 per group, 3 groups
    Shape(c=8, k=16, groups=8, r=5, s=5, padding=(2, 2), dilation=(2, 2), h=10, w=9),
    Shape(c=64, k=64, groups=8, stride=(2, 2), h=6, w=6),  # 8 per group, stride 2
    Shape(c=16, k=32, groups=2, h=7, w=6),  # 8 in / 16 out per group
    Shape(n=3, c=6, k=9, groups=3, h=6, w=5),  # 2 in / 3 out per group
    Shape(n=1, c=16, k=16, r=1, s=1, padding=(0, 0), h=1, w=1),  # one pixel
    Shape(c=16, k=16, stride=(3, 3), h=2, w=2),  # H, W < stride: an empty stride phase
]

# (batch statistics, ReLU, affine): the training case and the running-statistics one
DY_VARIANTS = {"train": (True, True, True), "running": (False, False, False)}


@dataclasses.dataclass
class Problem:
    op: conv_bwd.DyOperand
    x: torch.Tensor
    weight: torch.Tensor
    dy_ref: torch.Tensor  # float64
    dy_base: torch.Tensor  # the test dtype, as plain PyTorch would materialise it
    x64: torch.Tensor
    weight64: torch.Tensor


def _problem(shape: Shape, dtype: torch.dtype, variant: str) -> Problem:
    """Fresh random tensors as the forward leaves them (y, z stored in dtype), dz, BN sums."""
    batch_stats, relu, affine = DY_VARIANTS[variant]
    f64 = torch.float64
    cg = shape.c // shape.groups
    x64 = torch.randn(shape.n, shape.c, shape.h, shape.w, dtype=f64) + 0.5
    w64 = torch.randn(shape.k, cg, shape.r, shape.s, dtype=f64) / (cg * shape.r * shape.s) ** 0.5
    x = x64.to(DEVICE, dtype).contiguous(memory_format=CL)
    weight = w64.to(DEVICE, dtype)
    p = shape.conv
    y = F.conv2d(x, weight, None, p.stride, p.padding, p.dilation, p.groups).contiguous(
        memory_format=CL
    )
    if batch_stats:
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    else:
        mean = torch.randn(shape.k, device=DEVICE) * 0.3
        var = torch.rand(shape.k, device=DEVICE) + 0.5
    gamma = torch.rand(shape.k, device=DEVICE) + 0.5 if affine else None
    beta = torch.randn(shape.k, device=DEVICE) if affine else None
    z = F.batch_norm(y.float(), mean, var, gamma, beta, False, 0.0, 1e-5)
    z = (F.relu(z) if relu else z).to(dtype).contiguous(memory_format=CL)
    dz = torch.randn(z.shape, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    sums = None
    if batch_stats:
        sums = bn.reductions(dz, y, z, mean, var, batch_stats=True, eps=1e-5, relu=relu)
    op = conv_bwd.DyOperand(dz, z if relu else None, y, mean, var, gamma, sums, batch_stats, 1e-5)

    def dy_of(t: torch.Tensor, stat_dtype: torch.dtype) -> torch.Tensor:
        cpu = lambda v: None if v is None else v.detach().to("cpu", stat_dtype)
        m, v = cpu(mean), cpu(var)
        if batch_stats and stat_dtype == f64:  # the exact statistics of the stored y
            v, m = torch.var_mean(cpu(y), dim=(0, 2, 3), correction=0)
        return bn_relu_backward(
            cpu(dz), cpu(y), cpu(z), m, v, cpu(gamma),
            batch_stats=batch_stats, eps=1e-5, relu=relu, need_gamma=False,
        )[1]

    dy_base = dy_of(None, torch.float32).to(DEVICE, dtype).contiguous(memory_format=CL)
    return Problem(op, x, weight, dy_of(None, f64), dy_base, x64, w64)


def _conv_backward(dy, x, weight, shape: Shape, mask):
    p = shape.conv
    return torch.ops.aten.convolution_backward(
        dy, x, weight, None, list(p.stride), list(p.padding), list(p.dilation), False, [0, 0],
        p.groups, mask,
    )


def _check_dgrad_wgrad(shape: Shape, dtype: torch.dtype, variant: str, rows_per_chunk=None):
    pb = _problem(shape, dtype, variant)
    dx = conv_bwd.dgrad(pb.op, pb.weight, shape.conv, pb.x.shape)
    dw = conv_bwd.wgrad(pb.op, pb.x, pb.weight, shape.conv, rows_per_chunk=rows_per_chunk)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    assert dw.dtype == dtype and dw.shape == pb.weight.shape and dw.is_contiguous()
    dx_ref, dw_ref, _ = _conv_backward(pb.dy_ref, pb.x64, pb.weight64, shape, [True, True, False])
    # on the same device: on a GPU both sides use TF32 for fp32 (cuDNN's default in PyTorch)
    dx_base, dw_base, _ = _conv_backward(pb.dy_base, pb.x, pb.weight, shape, [True, True, False])
    assert_close_ratio("dx", dx, dx_ref, dx_base)
    assert_close_ratio("dW", dw, dw_ref, dw_base)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_dgrad_wgrad_fp32(shape: Shape) -> None:
    _check_dgrad_wgrad(shape, torch.float32, "train")


@pytest.mark.parametrize(
    "shape, dtype",
    [
        (SHAPES[0], torch.float16), (SHAPES[0], torch.bfloat16), (SHAPES[2], torch.bfloat16),
        (SHAPES[5], torch.float16),
    ],
    ids=lambda v: v.id if isinstance(v, Shape) else str(v),
)
def test_dgrad_wgrad_half(shape: Shape, dtype: torch.dtype) -> None:
    _check_dgrad_wgrad(shape, dtype, "train")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[6]], ids=lambda s: s.id)
def test_dgrad_wgrad_running_stats_no_relu_no_affine(shape: Shape) -> None:
    _check_dgrad_wgrad(shape, torch.float16, "running")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=lambda s: s.id)
def test_wgrad_sums_chunks_in_order(shape: Shape) -> None:
    """Several chunks of output pixels (one with a ragged end), summed by _wgrad_sum_kernel."""
    _check_dgrad_wgrad(shape, torch.float32, "train", rows_per_chunk=48)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DY_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + SLOW_SHAPES, ids=lambda s: s.id)
def test_dgrad_wgrad_grid(shape: Shape, dtype: torch.dtype, variant: str) -> None:
    _check_dgrad_wgrad(shape, dtype, variant, rows_per_chunk=64)


# ---------------------------------------------------------------------------------------------
# The bias gradient from the BN sums
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_grad_from_sums_needs_no_pass_over_dy(dtype: torch.dtype) -> None:
    """Σdy = a·(Σg − M·mean_g − c·Σd): Σd vanishes by δ's construction (checked here on a
    channel mean 1000x its std, where fp16 rounding of y moves its mean), so the bias gradient
    of a batch-statistics BN is zero up to rounding; with running statistics it is a·Σg."""
    shape = Shape(c=16, k=16, h=7, w=6)
    pb = _problem(shape, dtype, "train")
    op = pb.op
    y = (op.y.float() + 1000.0).to(dtype).contiguous(memory_format=CL)
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    sums = bn.reductions(op.dz, y, op.z, mean, var, batch_stats=True, eps=1e-5, relu=True)
    d = (y.double() - mean.double().view(1, -1, 1, 1)) - sums[2].double().view(1, -1, 1, 1)
    d_abs = d.abs().sum((0, 2, 3))
    assert (d.sum((0, 2, 3)).abs() <= 1e-5 * d_abs).all(), "Σ((y − mean) − δ) is not ~0"
    m = y.numel() // y.shape[1]
    big = conv_bwd.DyOperand(op.dz, op.z, y, mean, var, op.gamma, sums, True, 1e-5)
    db = conv_bwd.bias_grad(big, m, dtype)
    db_ref = pb.dy_ref.new_zeros(16)  # exactly 0 in exact arithmetic
    dy_base = bn_relu_backward(  # PyTorch's own dy (fp32, rounded to dtype), then summed
        op.dz, y, op.z, mean, var, op.gamma, batch_stats=True, eps=1e-5, relu=True,
        need_gamma=False,
    )[1].to(dtype)
    db_base = dy_base.double().sum((0, 2, 3))
    assert db.dtype == dtype
    assert_close_ratio("db (batch statistics)", db, db_ref, db_base)

    run = _problem(shape, dtype, "running").op
    run.sums = bn.reductions(run.dz, run.y, run.dz, run.mean, run.var, batch_stats=False,
                             eps=1e-5, relu=False)
    db = conv_bwd.bias_grad(run, m, dtype)
    dy64 = bn_relu_backward(
        run.dz.double().cpu(), run.y.double().cpu(), None, run.mean.double().cpu(),
        run.var.double().cpu(), None, batch_stats=False, eps=1e-5, relu=False, need_gamma=False,
    )[1]
    dy_base = (run.dz.float() * torch.rsqrt(run.var + 1e-5).view(1, -1, 1, 1)).to(dtype)
    assert_close_ratio("db (running statistics)", db, dy64.sum((0, 2, 3)),
                       dy_base.double().sum((0, 2, 3)))


# ---------------------------------------------------------------------------------------------
# The whole op on the triton backend
# ---------------------------------------------------------------------------------------------
# tests/backends/test_triton.py runs every case of tests/ops/cases.py through the triton backend
# (train and eval, fp32, a half-precision subset): those gradients now come from this module.
# Here: the paths of TritonBackend.backward that grid does not single out.


@pytest.mark.parametrize(
    "case, training",
    [
        (Case(bias=True, residual=True), False),  # running stats: db = a·Σg, dres from the sums
        (Case(affine=False, residual=True, relu=False), False),  # no sums at all: dres alone
        (Case(bias=True, residual=True, groups=8, c=32, k=32, stride=2), True),  # direct paths
    ],
    ids=["eval-bias-res", "eval-noaffine-res", "train-grouped"],
)
def test_whole_op_gradients(case: Case, training: bool) -> None:
    run_case(case, torch.float16, training, "triton")


def _op_inputs(case: Case, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    cg = case.c // case.groups
    x = torch.randn(case.n, case.c, case.h, case.w, generator=g).to(dtype)
    w = (torch.randn(case.k, cg, case.r, case.r, generator=g) / (cg * case.r**2) ** 0.5).to(dtype)
    gamma, beta = torch.rand(case.k, generator=g) + 0.5, torch.randn(case.k, generator=g)
    oh, ow = case.conv.out_hw(case.h, case.w, case.r, case.r)
    res = torch.randn(case.n, case.k, oh, ow, generator=g).to(dtype)
    bias = torch.randn(case.k, generator=g).to(dtype)
    dz = torch.randn(case.n, case.k, oh, ow, generator=g).to(dtype)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, bias, gamma, beta, res)]
    return leaves, dz.to(DEVICE)


def _op_backward(case: Case, leaves, dz, act: str = "relu") -> list[torch.Tensor]:
    x, w, bias, gamma, beta, res = leaves
    for t in leaves:
        t.grad = None
    z = fastres.ops.conv_bn_relu(
        x, w, gamma, beta, None, None, bias=bias, training=True, stride=case.stride,
        padding=case.padding, groups=case.groups, residual=res, act=act, backend="triton",
    )
    z.backward(dz)
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize(
    "case",
    [
        Case(c=32, k=32, h=8, w=7, stride=2),
        pytest.param(Case(groups=8, c=32, k=32, h=6, w=5), marks=pytest.mark.slow),
    ],
    ids=["dense", "direct"],
)
def test_backward_is_bitwise_deterministic(case: Case) -> None:
    leaves, dz = _op_inputs(case)
    first = _op_backward(case, leaves, dz)
    second = _op_backward(case, leaves, dz)
    for name, a, b in zip(("x", "w", "bias", "gamma", "beta", "residual"), first, second):
        assert torch.equal(a, b), f"grad {name} differs between two identical backward runs"


# ---------------------------------------------------------------------------------------------
# What runs: kernel launches per layer backward, and no PyTorch convolution or BN at all
# ---------------------------------------------------------------------------------------------


class _LaunchCounter:
    """Counts Triton kernel launches (interpreted or compiled) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._wrap(cls.run))

    def _wrap(self, run):
        def counted(fn_self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                self.count += 1
            return run(fn_self, *args, **kwargs)

        return counted


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_kernel_launches_per_layer_backward_are_bounded(monkeypatch, act: str) -> None:
    from fastres.backends.triton import MAX_BACKWARD_LAUNCHES

    case = Case(c=16, k=16, h=6, w=6)
    leaves, dz = _op_inputs(case)
    _op_backward(case, leaves, dz, act)  # warm up (a GPU autotunes on the first call)
    x, w, bias, gamma, beta, res = leaves
    z = fastres.ops.conv_bn_relu(
        x, w, gamma, beta, None, None, bias=bias, training=True, padding=1, residual=res,
        act=act, backend="triton",
    )
    counter = _LaunchCounter(monkeypatch)
    z.backward(dz)
    # reductions (2, also writing dres; SiLU: recomputing v and writing g) + dgrad (1) + wgrad
    # and its chunk sum (2)
    assert counter.count == 5 <= MAX_BACKWARD_LAUNCHES, f"{counter.count} launches"


FORBIDDEN = ("aten::convolution", "aten::_convolution", "aten::convolution_backward",
             "aten::cudnn_", "aten::mkldnn_convolution", "batch_norm")


def _profiled_training_step(model: torch.nn.Module, x: torch.Tensor) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with fastres.use_backend("triton"), profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = model(x).float().square().mean()
        loss.backward()
    return {e.name for e in prof.events()}


def _tiny_resnet() -> torch.nn.Module:
    """torchvision's own blocks at CPU-interpreter widths: the stem, a basic block, a stride-2
    basic block with its projection shortcut, and a ResNeXt bottleneck (4 groups of 2)."""
    import torchvision.models.resnet as tv
    from torch import nn

    def down(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    return nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        tv.BasicBlock(16, 16),
        tv.BasicBlock(16, 32, stride=2, downsample=down(16, 32)),
        tv.Bottleneck(32, 8, groups=4, base_width=16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _small_resnext() -> torch.nn.Module:
    import torchvision.models as tv

    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4)


MODELS = {
    "tiny": (_tiny_resnet, (2, 3, 16, 16)),
    "resnet18": (_resnet18, (2, 3, 32, 32)),
    "resnext": (_small_resnext, (2, 3, 32, 32)),
}


@pytest.mark.parametrize(
    "name",
    # the full models take minutes under the interpreter: slow (and GPU) runs only
    ["tiny", *(pytest.param(n, marks=pytest.mark.slow) for n in ("resnet18", "resnext"))],
)
def test_fused_training_step_runs_no_pytorch_convolution_or_batch_norm(name: str) -> None:
    """A forward + backward of a fused torchvision model records, through torch.profiler
    (which sees aten calls nested inside custom ops), no convolution, convolution backward,
    cuDNN or batch-norm op: every conv and BN ran in Triton. (This fails on a backward that
    calls PyTorch's convolution backward.)"""
    make, x_shape = MODELS[name]
    fused = fastres.fuse(make()).to(DEVICE).train()
    names = _profiled_training_step(fused, torch.randn(x_shape, device=DEVICE))
    assert any("fastres::conv_bn_relu_bwd" in n for n in names), "the fused backward did not run"
    bad = sorted(n for n in names if any(f in n for f in FORBIDDEN))
    assert not bad, f"PyTorch convolution / BN ran on the triton backend: {bad}"


def test_tiny_fused_model_sgd_steps_match_eager_on_triton() -> None:
    """Three SGD steps (momentum, weight decay) from the same weights: the fused tiny model on
    the triton backend, eager PyTorch (channels_last) and a float64 copy each take their own
    steps; the losses and the final parameters and BN buffers follow the error-ratio rule."""
    import copy

    from tests.models._util import randomize_bn

    original = randomize_bn(_tiny_resnet())
    models = [fastres.fuse(original), original.to(memory_format=CL), copy.deepcopy(original)]
    models[2].double()
    x, target = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    losses = []
    for model in models:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        inp = x.to(next(model.parameters()).dtype).contiguous(memory_format=CL)
        with fastres.use_backend("triton"):
            for _ in range(3):
                opt.zero_grad()
                loss = F.cross_entropy(model(inp), target)
                loss.backward()
                opt.step()
        losses.append(loss.detach())
    assert_close_ratio("loss after 3 steps", losses[0], losses[2], losses[1])
    fused, eager, ref = (m.state_dict() for m in models)
    assert list(fused) == list(eager)
    for key in fused:
        if not key.endswith("num_batches_tracked"):
            assert_close_ratio(f"{key} after 3 steps", fused[key], ref[key], eager[key])


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5]], ids=lambda s: s.id)
def test_dgrad_wgrad_cuda(shape: Shape, dtype: torch.dtype) -> None:
    _check_dgrad_wgrad(shape, dtype, "train", rows_per_chunk=128)


@pytest.mark.gpu
def test_backward_is_bitwise_deterministic_cuda() -> None:
    test_backward_is_bitwise_deterministic(Case(c=64, k=64, h=28, w=28, stride=2))


def _fake(dtype: torch.dtype) -> torch.Tensor:
    """A CUDA tensor needing no GPU: what a pruner sees of a launch's dz (devices.simulate
    gives it a class)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(1, dtype=dtype, device="cuda")


def test_pruning_keeps_tiles_that_fit_and_are_not_much_wider_than_the_channels():
    dgrad, wgrad = conv_bwd.GPU_DGRAD_GEMM_CONFIGS, conv_bwd.GPU_WGRAD_GEMM_CONFIGS
    tile = lambda c: tuple(c.kwargs.values())
    big = {"Cg": 256, "Kg": 256}
    for cc, dtype, over in ((80, torch.float32, True), (90, torch.float32, False),
                            (80, torch.bfloat16, False)):
        with devices.simulate(cc):
            dz = _fake(dtype)
            kept = {tile(c) for c in conv_bwd._prune_dgrad(dgrad, {**big, "dz_ptr": dz})}
            assert ((128, 64, 32) not in kept) == over and ((128, 32, 32) not in kept) == over
            kept = {tile(c) for c in conv_bwd._prune_wgrad(wgrad, {**big, "dz_ptr": dz})}
            assert ((64, 128, 32) not in kept) == over and (128, 128, 32) in kept
    # 16-32 channels per group: the narrowest tiles only (BLOCK_J 64 is the narrowest offered)
    narrow = conv_bwd._prune_wgrad(wgrad, {"Cg": 16, "Kg": 32, "dz_ptr": None})
    assert {tile(c) for c in narrow} == {(64, 32, 64), (64, 32, 32)}


# (kernel name, prune function, configurations, constexpr flags of a plain launch, the flag sets
# of _UNFIT_TILES and the launch flags that turn each on)
_PRUNED_KERNELS = {
    "dgrad_gemm": (conv_bwd._prune_dgrad, conv_bwd.GPU_DGRAD_GEMM_CONFIGS, {}),
    "dgrad_direct": (conv_bwd._prune_direct_dgrad, conv_bwd.GPU_DIRECT_CONFIGS, {}),
    "wgrad_gemm": (conv_bwd._prune_wgrad, conv_bwd.GPU_WGRAD_GEMM_CONFIGS, {"FLAT_K": False}),
    "wgrad_gemm_flat": (conv_bwd._prune_wgrad, conv_bwd.GPU_WGRAD_GEMM_CONFIGS,
                        {"FLAT_K": True}),
    "wgrad_direct": (conv_bwd._prune_direct_wgrad, conv_bwd.GPU_DIRECT_CONFIGS, {}),
}
_LAUNCH_FLAGS = {  # launch flag combinations -> the _UNFIT_TILES flag sets that apply
    "dgrad": [({"HAS_ADD": False, "ACT": False, "ACT_CENTER": False}, {""}),
              ({"HAS_ADD": False, "ACT": True, "ACT_CENTER": True}, {"", "act"}),
              ({"HAS_ADD": False, "ACT": True, "ACT_CENTER": False}, {"", "act"}),
              ({"HAS_ADD": True, "ACT": False, "ACT_CENTER": False}, {"", "add"}),
              ({"HAS_ADD": True, "ACT": True, "ACT_CENTER": False}, {"", "join"}),
              ({"HAS_ADD": True, "ACT": True, "ACT_CENTER": True}, {"", "join"})],
    "wgrad": [({"IN_AFFINE": False}, {""}), ({"IN_AFFINE": True}, {"", "prologue"})],
}


@pytest.mark.parametrize("kname", list(_PRUNED_KERNELS))
def test_pruner_drops_exactly_the_listed_tiles_for_their_flags_and_target(kname):
    """On wide layers (no tile too wide for the channels) the autotuner's prune function drops
    exactly the _UNFIT_TILES entries of this kernel, dtype and target whose flag set the launch's
    flags turn on (on sm_80 and sm_90 every tile within shared memory is listed or kept), and
    never everything."""
    prune, configs, fixed = _PRUNED_KERNELS[kname]
    tile = lambda c: tuple(c.kwargs.values())
    wide = {"C": 256, "K": 256, "Cg": 256, "Kg": 256}
    listed = 0
    for cc in (80, 90):
        for dtype in DTYPES:
            with devices.simulate(cc):
                dz = _fake(dtype)
                for flags, fsets in _LAUNCH_FLAGS[kname[:5]]:
                    kept = prune(configs, {**wide, "dz_ptr": dz}, **fixed, **flags)
                    dropped = {tile(c) for c in configs if c not in kept}
                    want = {t for (k, d, t, fset), ccs in conv_bwd._UNFIT_TILES.items()
                            if k == kname and d == dtype and cc in ccs and fset in fsets}
                    assert dropped == want, (cc, dtype, flags)
                    assert kept and all(c in configs for c in kept)
                    listed += len(want)
    assert bool(listed) == (kname != "wgrad_direct")  # the direct wgrad's tiles all fit
    assert prune(configs, {**wide, "dz_ptr": None}, **fixed) == configs  # off CUDA: all


def test_pruning_of_the_join_and_the_stem_examples():
    """Spot checks against the kernel report: fp32 dgrad with the join epilogue (a shortcut's
    gradient added and the act's dReLU + sums) on sm_80 keeps only its 64x64x32 tile (every
    wider one spills or does not fit), with the act alone it keeps 128x128 (clean there); bf16's
    128x64 tile spills on sm_80 with the add and the act together only; the stem's flat wgrad
    keeps its 64x32x32 tile alone."""
    tile = lambda cs: [tuple(c.kwargs.values()) for c in cs]
    dgrad, wgrad = conv_bwd.GPU_DGRAD_GEMM_CONFIGS, conv_bwd.GPU_WGRAD_GEMM_CONFIGS
    join = dict(HAS_ADD=True, ACT=True, ACT_CENTER=True)
    stem = {"Cg": 3, "Kg": 64}
    for cc in (80, 90):
        with devices.simulate(cc):
            f32 = {"Cg": 256, "Kg": 256, "dz_ptr": _fake(torch.float32)}
            bf16 = {**f32, "dz_ptr": _fake(torch.bfloat16)}
            if cc == 80:
                assert tile(conv_bwd._prune_dgrad(dgrad, f32, **join)) == [(64, 64, 32)]
                assert (128, 128, 32) in tile(conv_bwd._prune_dgrad(dgrad, f32, ACT=True))
                assert (128, 128, 32) in tile(conv_bwd._prune_dgrad(dgrad, f32))
                assert (128, 64, 32) not in tile(conv_bwd._prune_dgrad(dgrad, bf16, **join))
                assert (128, 64, 32) in tile(conv_bwd._prune_dgrad(dgrad, bf16, HAS_ADD=True))
                assert (128, 64, 32) in tile(conv_bwd._prune_dgrad(dgrad, bf16))
            else:
                assert (128, 64, 32) in tile(conv_bwd._prune_dgrad(dgrad, bf16, **join))
            for dz in (f32["dz_ptr"], bf16["dz_ptr"]):
                kept = conv_bwd._prune_wgrad(wgrad, {**stem, "dz_ptr": dz}, FLAT_K=True)
                assert tile(kept) == [(64, 32, 32)]


def _spec_config(spec, configs):
    """The autotuner configuration a compile spec was made from."""
    return next(c for c in configs
                if all(spec.constexprs[k] == v for k, v in c.kwargs.items())
                and (c.num_warps, c.num_stages) == (spec.num_warps, spec.num_stages))


def test_compile_specs_carry_the_pruners_verdict_and_keep_a_clean_tile():
    """Each specialised compile spec is pruned on exactly the targets where the autotuner's
    prune function, given the spec's shape class, dtype and flags, drops its configuration; and
    each (kernel, dtype, target, shape class, flag set) compiled with every configuration keeps
    at least one configuration offered (the report holds those to its rules)."""
    offered: dict[tuple, int] = {}
    specs = [s for s in conv_bwd.compile_specs() if s.ints is not None]
    assert {s.shape_class for s in specs} == {"3x3s2", "1x1", "stem", "grouped"}
    for cc in (80, 90):
        with devices.simulate(cc):
            fakes = {d: _fake(d) for d in DTYPES}
            for spec in specs:
                kname, dname, variant = spec.name.split("-")[:3]
                prune, configs, _ = _PRUNED_KERNELS[kname]
                cfg = _spec_config(spec, configs)
                dz = fakes[getattr(torch, dname)]
                kept = prune(configs, {**spec.ints, "dz_ptr": dz}, **spec.constexprs)
                assert (cfg not in kept) == (cc in spec.pruned), (spec.name, cc)
                key = (kname, dname, cc, spec.shape_class, variant)
                offered[key] = offered.get(key, 0) + (cc not in spec.pruned)
    assert offered and all(offered.values()), [k for k, n in offered.items() if not n]
    # the block-fusion variants are among them, for every dtype and target
    assert {(k[0], k[4]) for k in offered} >= {
        (k, v) for k in ("dgrad_gemm", "dgrad_direct") for v in ("join", "act", "add")
    } | {("wgrad_gemm", "prologue"), ("wgrad_direct", "prologue")}
