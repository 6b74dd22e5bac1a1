"""The block op with a channel gate (SE, ECA) before the residual add (issue 18), on timm's
own SE/ECA blocks.

Each case is a timm ``Bottleneck`` / ``BasicBlock`` with an attention child ``se`` (timm's
``SEModule`` or ``EcaModule``; ``attn_layer=``), served by fastres's block adopting the timm
block's children (:func:`tests.ops.test_block_modern.fused_block`, as ``fastres.fuse`` swaps a
block in), run three ways: the block op on the backend under test, the timm block in float64 (the
truth) and in the test's dtype (the baseline of the error-ratio rule); forward, every gradient
(input, convs, BNs, the gate's own parameters) and the running statistics, over two steps, then
eval. The gate's draws are its own module's (fc1 with bias, ReLU, fc2, sigmoid; ECA's conv1d).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import fastres
from fastres.nn.gate import gate_function, gate_reason
from fastres.ops.block import ConvArgs, NormArgs, residual_block
from tests.models._util import randomize_bn
from tests.ops.test_block_modern import check_case as check_block_case
from tests.ops.test_block_modern import (
    compare_float64_steps,
    fused_block,
    seeded_saved_bytes,
    timm_block,
)

timm = pytest.importorskip("timm")
tv_ops = pytest.importorskip("torchvision.ops")
from timm.layers import DropPath, EcaModule, EffectiveSEModule, SEModule

CL = torch.channels_last
N = 3


@dataclasses.dataclass(frozen=True)
class GateCase:
    name: str
    cin: int
    planes: int
    attn: str = "se"  # timm attn_layer: "se", "eca"
    stride: int = 1
    basic: bool = False
    avg_down: bool = False
    drop: bool = False  # timm DropPath(0.4)
    cardinality: int = 1
    base_width: int = 64
    hw: int = 5

    def build(self) -> nn.Module:
        block = timm_block(self, attn_layer=self.attn,
                           drop_path=DropPath(0.4) if self.drop else None)
        with torch.no_grad():
            for p in block.se.parameters():  # a gate that varies over samples and channels
                p.mul_(3.0)
        return block


CASES = [
    GateCase("bottleneck-se-identity", 16, 4),
    GateCase("bottleneck-se-avgdown-droppath-s2", 8, 4, stride=2, avg_down=True, drop=True,
             hw=6),
    GateCase("basic-eca-proj", 8, 16, attn="eca", basic=True),
    GateCase("resnext-eca-avgdown-s2-droppath", 16, 4, attn="eca", stride=2, avg_down=True,
             drop=True, cardinality=2, base_width=32, hw=6),
]
BY_NAME = {c.name: c for c in CASES}
QUICK_LOW = {("bottleneck-se-avgdown-droppath-s2", torch.bfloat16)}


def _grid() -> list:
    params = []
    for backend in ("reference", "triton"):
        for case in CASES:
            for dtype in (torch.float32, torch.bfloat16):
                quick = dtype == torch.float32 or (case.name, dtype) in QUICK_LOW
                params.append(pytest.param(
                    backend, case, dtype, marks=() if quick else (pytest.mark.slow,),
                    id=f"{backend}-{case.name}-{str(dtype)[6:]}"))
    return params


def check_case(case: GateCase, dtype: torch.dtype, backend: str, steps: int = 2, n: int = N,
               device: str = "cpu") -> None:
    """tests/ops/test_block_modern.py's check of a block through the block op (truth in
    float64, baseline in ``dtype``, all on ``device``), for a gated block."""
    want = check_block_case(case, dtype, backend, steps, device=device, n=n)
    assert any(k.startswith("se.") for k in want[0][0][2]), "the gate has no parameters"


@pytest.mark.parametrize(("backend", "case", "dtype"), _grid())
def test_gated_block_matches_timm_block(backend: str, case: GateCase, dtype: torch.dtype) -> None:
    check_case(case, dtype, backend)


GPU_CASES = [  # ImageNet sizes: tiles of N·H·W rows cross image (gate) boundaries
    (GateCase("seresnet50-layer1.1", 256, 64, hw=56), torch.bfloat16),
    (GateCase("ecaresnext-layer3.1-droppath", 1024, 256, attn="eca", drop=True, cardinality=32,
              base_width=4, hw=14), torch.float16),
    (GateCase("seresnet50d-layer2.0", 256, 128, stride=2, avg_down=True, hw=56),
     torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), GPU_CASES,
                         ids=[f"{c.name}-{str(d)[6:]}" for c, d in GPU_CASES])
def test_gated_block_op_on_cuda(case: GateCase, dtype: torch.dtype) -> None:
    """SE / ECA blocks at ImageNet sizes on the GPU's compiled Triton kernels: the gate's
    per-sample sums, (N, K) branch scale and its gradient over real tiles, one training step and
    an eval forward."""
    check_case(case, dtype, "triton", steps=1, n=4, device="cuda")


@pytest.mark.parametrize("module", [
    SEModule(16), SEModule(16, gate_layer="hard_sigmoid"), EcaModule(16), EffectiveSEModule(16),
    tv_ops.SqueezeExcitation(16, 4),
], ids=["se", "se-hardsigmoid", "eca", "effective-se", "tv-squeeze-excitation"])
def test_gate_function_is_the_modules_own_gate(module: nn.Module) -> None:
    """x * f(mean(x)) is the module's output exactly, and f's parameters are the module's."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5, 4)
    assert gate_reason(module) is None
    f = gate_function(module)
    gate = f(x.mean((2, 3), keepdim=True))
    assert gate.shape == (3, 16, 1, 1)
    assert torch.equal(x * gate, module(x))
    gate.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_gate_function_runs_the_live_module() -> None:
    """f is compiled once per module but reads the module as it is now: a child swapped after
    the first call and eval mode are what the next call computes."""
    torch.manual_seed(0)
    module = SEModule(16, act_layer=nn.ReLU)
    x = torch.randn(3, 16, 5, 4)
    pooled = x.mean((2, 3), keepdim=True)
    before = gate_function(module)(pooled)
    module.fc2 = nn.Conv2d(module.fc2.in_channels, 16, 1)
    module.bn = nn.BatchNorm2d(module.fc1.out_channels).eval()
    module.bn.running_mean.normal_()
    after = gate_function(module)(pooled)
    assert not torch.allclose(after, before)
    assert torch.equal(x * after, module(x))


def test_a_used_gate_module_is_freed_with_its_block() -> None:
    """The per-module cache of gate code does not keep its module (nor its block) alive."""
    case = BY_NAME["bottleneck-se-identity"]
    block = fused_block(case.build())
    assert block.block_reason() is None
    x = torch.randn(N, case.cin, case.hw, case.hw).contiguous(memory_format=CL)
    with fastres.use_backend("reference"), fastres.backends.record_calls() as served:
        block(x).square().sum().backward()
    assert [c.op for c in served] == ["residual_block"] * 2
    gate_module, block_ref = weakref.ref(block.se), weakref.ref(block)
    del block, served
    gc.collect()
    assert block_ref() is None and gate_module() is None, "the gate module was kept alive"


def test_modules_that_are_not_channel_gates_get_a_reason() -> None:
    from timm.layers.cbam import CbamModule

    assert "amax" in gate_reason(SEModule(16, add_maxpool=True))
    assert "does not end in x * gate" in gate_reason(CbamModule(16))

    class UsesHeight(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x.mean((2, 3), keepdim=True) * x.shape[2])

    assert "uses its input" in gate_reason(UsesHeight())

    class SpatialGate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x.mean(1, keepdim=True))

    assert "uses its input" in gate_reason(SpatialGate())


def test_gated_block_with_a_foreign_attention_runs_layer_by_layer() -> None:
    from timm.layers.cbam import CbamModule

    block = fused_block(BY_NAME["bottleneck-se-identity"].build())
    block.se = CbamModule(16)
    assert "CbamModule does not end in x * gate" in block.block_reason()
    x = torch.randn(N, 16, 5, 5)
    with fastres.use_backend("reference"), fastres.backends.record_calls() as served:
        out = block(x)
    assert {c.op for c in served} == {"conv_bn_relu"}
    assert out.shape == (N, 16, 5, 5)


def _op_args(k: int = 8):
    w1, w2 = torch.randn(k, k, 3, 3), torch.randn(k, k, 3, 3)
    convs = [ConvArgs(w1, padding=1), ConvArgs(w2, padding=1)]
    norms = [NormArgs(None, None, torch.zeros(k), torch.ones(k)) for _ in range(2)]
    return torch.randn(2, k, 5, 5), convs, norms


def test_op_errors_name_the_problem() -> None:
    x, convs, norms = _op_args()
    with pytest.raises(ValueError, match=r"the gate must return shape \(2, 8, 1, 1\)"):
        residual_block(x, convs, norms, training=True, backend="reference",
                       gate=lambda p: p.mean(1, keepdim=True))
    with pytest.raises(TypeError, match="gate must return a float Tensor"):
        residual_block(x, convs, norms, training=True, backend="reference",
                       gate=lambda p: (p > 0))
    with pytest.raises(TypeError, match="gate must be callable"):
        residual_block(x, convs, norms, training=True, gate=3)
    with pytest.raises(ValueError, match="gate is supported on post-activation blocks only"):
        residual_block(x, convs, norms[:1], training=True, preact=True, gate=torch.sigmoid)
    for bad in (0, 2, 1.0):
        with pytest.raises(ValueError, match=r"gate_before_conv must be an int in \[1, 1\]"):
            residual_block(x, convs, norms, training=True, gate=torch.sigmoid,
                           gate_before_conv=bad)
    with pytest.raises(ValueError, match="gate_before_conv without a gate"):
        residual_block(x, convs, norms, training=True, gate_before_conv=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("before_conv", [None, 1], ids=["before-add", "between-convs"])
def test_op_gate_params_take_gradients(backend: str, before_conv: int | None) -> None:
    """A gate given as a plain callable with its parameter passed in gate_params: its gradient
    is eager's (fp32, x·σ(w·pooled) before the add, or on conv 2's input), also when nothing
    else needs one; the gate's w has both signs, so the gate between convs scales a ReLU output
    by values of both signs (the op multiplies after the ReLU)."""
    torch.manual_seed(3)
    x, convs, norms = _op_args()
    w = torch.randn(8, 1, 1, requires_grad=True)
    gate = lambda p: torch.tanh(p * w.to(p.dtype)) if before_conv else torch.sigmoid(
        p * w.to(p.dtype))
    gated = lambda a: a * gate(a.mean((2, 3), keepdim=True))

    def eager(x):
        conv = lambda t, i: nn.functional.conv2d(t, convs[i].weight.to(t.dtype), padding=1)
        bn = lambda t: nn.functional.batch_norm(t, None, None, training=True)
        h = nn.functional.relu(bn(conv(x, 0)))
        a = bn(conv(gated(h) if before_conv else h, 1))
        return nn.functional.relu((a if before_conv else gated(a)) + x)

    want = eager(x.double())
    (dw_want,) = torch.autograd.grad(want.square().sum(), w)
    out = residual_block(x.contiguous(memory_format=CL), convs, norms, training=True,
                         backend=backend, gate=gate, gate_params=[w],
                         gate_before_conv=before_conv)
    (dw,) = torch.autograd.grad(out.square().sum(), w)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.double(), dw_want.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_second_backward_with_retain_graph_repeats_the_first(backend: str) -> None:
    """retain_graph=True keeps the gate's own graph too: a second backward gives the same input
    and gate-parameter gradients; a third without it is refused by PyTorch, as for any op."""
    torch.manual_seed(3)
    x, convs, norms = _op_args()
    x = x.contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(8, 1, 1, requires_grad=True)
    out = residual_block(x, convs, norms, training=True, backend=backend,
                         gate=lambda p: torch.sigmoid(p * w), gate_params=[w])
    loss = out.square().sum()
    first = torch.autograd.grad(loss, [x, w], retain_graph=True)
    second = torch.autograd.grad(loss, [x, w], retain_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[1].abs().sum() > 0
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, [x, w])


def test_a_constant_gate_scales_the_branch() -> None:
    """A gate that ignores its input and has no parameters (no graph to differentiate): the
    branch is scaled, the gradients are those of the scaled block."""
    x, convs, norms = _op_args()
    x.requires_grad_()
    half = lambda p: torch.full_like(p, 0.5)
    out = residual_block(x.contiguous(memory_format=CL), convs, norms, training=True,
                         backend="reference", gate=half)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    want = residual_block(x.contiguous(memory_format=CL), convs, norms, training=True,
                          backend="reference", branch_scale=torch.full((2,), 0.5))
    (dx_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dx, dx_want)


def test_gated_block_under_torch_compile_runs_layer_by_layer() -> None:
    """The gate is Python the custom op cannot carry: a compiled model runs the gated block
    per layer (its pairs still fused), with eager's output."""
    case = BY_NAME["bottleneck-se-identity"]
    eager = case.build().train()
    fused = fused_block(copy.deepcopy(eager))
    x = torch.randn(N, case.cin, case.hw, case.hw, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with fastres.use_backend("reference"):
        out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "gated"), [
    ("seresnext26d_32x4d", 8), ("ecaresnet26t", 8),
    pytest.param("resnetrs50", 16, marks=pytest.mark.slow)])
def test_gated_model_trains_as_block_ops_like_eager(name: str, gated: int) -> None:
    """timm SE / ECA ResNets with drop_path_rate=0.2 through ``fastres.fuse``, every residual
    block one block op with its gate: two seeded SGD steps in float64 (the maths of a whole
    model, DESIGN §4) give eager's loss, every gradient (the gates' included) and the running
    statistics; parameter names are timm's."""
    eager = randomize_bn(timm.create_model(name, pretrained=False, num_classes=5,
                                           drop_path_rate=0.2)).double().train()
    fused = fastres.fuse(copy.deepcopy(eager))
    assert [k for k, _ in fused.named_parameters()] == [k for k, _ in eager.named_parameters()]
    blocks = [m for m in fused.modules() if isinstance(m, fastres.nn.FusedBlock)
              and getattr(m, "se", None) is not None]
    assert len(blocks) == gated and all(b.block_reason() is None for b in blocks)
    grads = compare_float64_steps(fused, eager, blocks=gated)
    assert any(".se." in k for k in grads)


def test_op_with_a_gate_under_torch_compile_says_it_is_eager_only() -> None:
    """The op itself refuses a gate while dynamo traces (the gate is a Python callable the
    custom op cannot carry), naming why; fastres's blocks do not call it so (above)."""
    x, convs, norms = _op_args()

    def gated(x):
        return residual_block(x, convs, norms, training=True, backend="reference",
                              gate=torch.sigmoid)

    with pytest.raises(Exception, match="a gated block is eager only"):
        torch.compile(gated, backend="aot_eager", fullgraph=True)(x)


def test_gated_training_step_runs_only_the_gates_own_pytorch_ops(monkeypatch) -> None:
    """Triton backend, seen by the profiler: the block's convs and BNs run in its kernels; the
    only PyTorch convolutions are the SE gate's two 1×1 convs on (N, K, 1, 1) (forward and
    backward). Launches: forward one per-sample sums pass and the join pass; backward the
    per-sample sums of the gate's gradient and the join's reduction pass."""

    from tests.backends.test_triton_block import _standalone

    case = BY_NAME["bottleneck-se-identity"]
    fused = fused_block(case.build()).train()
    x = torch.randn(N, case.cin, case.hw, case.hw).contiguous(memory_format=CL)
    x.requires_grad_()
    hooked = []  # what DDP's gradient hooks see: the gate's grads accumulate like any other
    for name, p in fused.se.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: hooked.append(name))
    _, backward = profiled_gated_step(fused, x, monkeypatch)
    assert _standalone(backward) == {"_bn_bwd_reduce_kernel": 1}, backward
    assert sorted(hooked) == sorted(n for n, _ in fused.se.named_parameters())


def profiled_gated_step(fused: nn.Module, x: torch.Tensor, monkeypatch) -> tuple:
    """A training step of a block with an SE gate on the triton backend, seen by the profiler:
    its convs and BNs run in fastres's kernels, the only PyTorch convolutions are the gate's fc1
    and fc2 on (N, C, 1, 1); one per-sample sums pass each way and the join's apply pass.
    Returns the Triton launches ``(forward, backward)`` (name → count)."""
    from torch.profiler import ProfilerActivity, profile

    from tests.backends.test_triton_block import _Launches, _standalone

    launches = _Launches(monkeypatch)
    with fastres.use_backend("triton"), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fused(x)
        forward = launches.take()
        out.float().square().mean().backward()
        backward = launches.take()
    events = [e.name for e in prof.events()]
    assert not [n for n in events if "batch_norm" in n]
    assert events.count("aten::convolution") == 2  # fc1, fc2 of the gate
    assert events.count("aten::convolution_backward") == 2
    assert forward["_sample_sums_kernel"] == 1 and backward["_sample_sums_kernel"] == 1
    assert _standalone(forward) == {"_bn_apply_kernel": 1}, forward
    return forward, backward


@pytest.mark.parametrize("name", ["bottleneck-se-identity", "resnext-eca-avgdown-s2-droppath"])
def test_saved_bytes_no_worse_than_eager(name: str) -> None:
    case = BY_NAME[name]
    eager = case.build().train()
    fused = fused_block(copy.deepcopy(eager))
    x = torch.randn(N, case.cin, case.hw, case.hw).contiguous(memory_format=CL)
    fused_bytes, eager_bytes = seeded_saved_bytes(fused, eager, x, "reference")
    assert fused_bytes < eager_bytes, (fused_bytes, eager_bytes)
