"""The residual-block op (fastres.ops.block): the same function as the eager block, forward and
every gradient, running statistics over several steps; one op per block forward and backward.

Each case is a fastres block (post- or pre-activation) run three ways: through the block op on
the backend under test, as plain PyTorch in float64 on the CPU (the truth), and as plain PyTorch
in the test's dtype (the baseline of the error-ratio rule). BatchNorm shifts are drawn away from
zero, both signs, so that relu(shift) ≠ 0 where padding meets the image border: a padded element
that went through the activation shows. Outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fastres
from fastres.nn import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from fastres.nn.blocks import _PreActBlock
from fastres.ops.block import ConvArgs, NormArgs, residual_block
from tests.models._util import randomize_bn, tensors_by_key
from tests.numerics import assert_close_ratio

CL = torch.channels_last


@dataclasses.dataclass(frozen=True)
class Block:
    name: str
    cls: type
    cin: int
    channels: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    preact: bool = True  # pre-activation blocks: the entry BN + ReLU
    hw: int = 7  # odd: the stride-2 taps and the padding meet the border unevenly

    def build(self) -> nn.Module:
        kw = {}
        if self.cls in (Bottleneck, PreActBottleneck):
            kw = dict(groups=self.groups, base_width=self.base_width)
        if self.cls in (PreActBasicBlock, PreActBottleneck):
            kw["preact"] = self.preact
        block = self.cls(self.cin, self.channels, self.stride, **kw)
        return _shift_bn(randomize_bn(block))


def _shift_bn(block: nn.Module) -> nn.Module:
    """β of magnitude 0.5-1.5, both signs: relu(β) ≠ 0 at the border for half the channels."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                sign = torch.where(torch.rand(m.num_features, generator=g) < 0.5, -1.0, 1.0)
                m.bias.copy_(sign * (0.5 + torch.rand(m.num_features, generator=g)))
    return block


BLOCKS = [
    Block("basic-identity", BasicBlock, 16, 16),
    Block("basic-proj-s2", BasicBlock, 16, 32, stride=2, hw=9),
    Block("bottleneck-identity", Bottleneck, 64, 16),
    Block("bottleneck-proj-s2", Bottleneck, 32, 16, stride=2),
    Block("resnext-4pg", Bottleneck, 32, 16, groups=4, base_width=4),  # 4 channels per group
    Block("resnext-8pg-s2", Bottleneck, 32, 16, stride=2, groups=4, base_width=8),
    Block("wide", Bottleneck, 32, 8, base_width=128),
    Block("preact-basic", PreActBasicBlock, 16, 16),
    Block("preact-basic-noentry-proj-s2", PreActBasicBlock, 16, 32, stride=2, preact=False),
    Block("preact-bottleneck-proj-s2", PreActBottleneck, 16, 8, stride=2),
    Block("preact-bottleneck-identity", PreActBottleneck, 32, 8),
]
BY_NAME = {b.name: b for b in BLOCKS}
DEFAULT = ("basic-proj-s2", "bottleneck-identity", "resnext-8pg-s2", "preact-bottleneck-proj-s2",
           "preact-basic-noentry-proj-s2")


def _grid(backends: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> list:
    """(backend, block, dtype): the DEFAULT blocks in float32 on every backend and one low
    precision case each in the default run, the rest under ``slow``."""
    params = []
    for backend in backends:
        for b in BLOCKS:
            for dtype in dtypes:
                quick = b.name in DEFAULT and (
                    dtype == torch.float32 or (b.name, dtype) in (
                        ("bottleneck-identity", torch.bfloat16),
                        ("preact-bottleneck-proj-s2", torch.float16),
                        ("resnext-8pg-s2", torch.float16)))
                marks = () if quick else (pytest.mark.slow,)
                params.append(pytest.param(backend, b, dtype, marks=marks,
                                           id=f"{backend}-{b.name}-{str(dtype)[6:]}"))
    return params


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run_steps(block: nn.Module, x: torch.Tensor, upstream: torch.Tensor, steps: int,
               backend: str | None, seed: int | None = None):
    """``steps`` training steps (forward, backward, no update), then an eval forward. Returns
    per step (output, input grad, parameter grads), the running statistics at the end and the
    eval output. ``seed``: each step's forward seeded alike (the same drop-path draws)."""
    results = []
    ctx = fastres.use_backend(backend) if backend else _plain(block)
    with ctx:
        block.train()
        for _ in range(steps):
            block.zero_grad(set_to_none=True)
            inp = x.detach().clone().requires_grad_()
            if seed is not None:
                torch.manual_seed(seed)
            out = block(inp)
            out.backward(upstream.to(out.dtype))
            grads = {k: t.grad for k, t in tensors_by_key(block).items()
                     if isinstance(t, nn.Parameter)}
            results.append((out.detach(), inp.grad, grads))
        block.eval()
        with torch.no_grad():
            eval_out = block(x)
    stats = {k: t.detach().clone() for k, t in block.state_dict().items() if "running" in k}
    return results, stats, eval_out


def compare_steps(got, want, base, steps: int) -> None:
    """:func:`_run_steps` results of the fused block, the float64 truth and the plain baseline
    by the error-ratio rule: every step's output, input and parameter gradients, then the
    running statistics and the eval output."""
    for step, ((o, dx, gs), (o_t, dx_t, gs_t), (o_b, dx_b, gs_b)) in enumerate(
            zip(got[0], want[0], base[0])):
        assert_close_ratio(f"step {step} output", o, o_t, o_b)
        assert_close_ratio(f"step {step} input grad", dx, dx_t, dx_b)
        assert set(gs) == set(gs_t)
        for key in gs_t:
            assert gs[key] is not None, f"{key}: no gradient"
            assert_close_ratio(f"step {step} {key}.grad", gs[key], gs_t[key], gs_b[key])
    for key in want[1]:
        assert_close_ratio(f"{key} after {steps} steps", got[1][key], want[1][key], base[1][key])
    assert_close_ratio("eval output", got[2], want[2], base[2])


class _plain:
    """Runs a fastres block as plain PyTorch (its unfused forward) inside the ``with``; any other
    module as it is."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block if hasattr(block, "set_fused") else None

    def __enter__(self):
        if self.block is not None:
            self.block.set_fused(False)

    def __exit__(self, *exc):
        if self.block is not None:
            self.block.set_fused(True)


def _pre_activation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The post-activation block's output before its final ReLU (plain PyTorch, train mode, on
    a copy)."""
    block = copy.deepcopy(block).train().set_fused(False)
    convs, norms, proj = block.block_layout()[:3]
    seen = {}
    last, short = norms[len(convs) - 1], norms[-1] if proj is not None else None
    last.register_forward_hook(lambda m, i, o: seen.__setitem__("main", o))
    if short is not None:
        short.register_forward_hook(lambda m, i, o: seen.__setitem__("short", o))
    with torch.no_grad():
        block(x)
    return seen["main"] + (seen["short"] if short is not None else x)


def _ambiguous_relu(truth: nn.Module, baseline: nn.Module, x: torch.Tensor,
                    x_dev: torch.Tensor) -> torch.Tensor:
    """Outputs whose float64 pre-activation lies within rounding error of the final ReLU's 0
    (twice plain PyTorch's forward error plus a few ulps): in fp16/bf16 they may land on either
    side in PyTorch and in fastres alike, and each moves every gradient by about |dout|, so
    they get no upstream gradient (as tests/ops/cases.py does for the per-layer op)."""
    pre_ref = _pre_activation(truth, x.double())
    pre_base = _pre_activation(baseline, x_dev).double().cpu()
    band = 2 * (pre_base - pre_ref).abs().max().item()
    band += 4 * torch.finfo(x.dtype).eps * pre_ref.abs().max().item()
    return pre_ref.abs() <= band


def check_block(spec: Block, dtype: torch.dtype, backend: str, steps: int = 2,
                n: int = 2, device: str = "cpu") -> None:
    """``steps`` training steps and an eval forward of ``spec`` through the block op on
    ``backend`` (on ``device``), against float64 on the CPU, with plain PyTorch in ``dtype`` on
    the same device as the baseline."""
    block = spec.build()
    # the truth computes exactly, in float64, from the very inputs and parameters the dtype
    # runs see (rounded to the dtype): otherwise the rounding of a BN's β alone flips the ReLU
    # mask of pre-activations within an ulp of 0, which no kernel can be held to
    block.to(dtype)
    x = torch.randn(n, spec.cin, spec.hw, spec.hw).to(dtype)
    truth = copy.deepcopy(block).double()
    baseline, fused = (copy.deepcopy(block).to(device, dtype) for _ in range(2))
    x_dev = x.to(device).contiguous(memory_format=CL)
    baseline.to(memory_format=CL)  # eager in the layout fastres computes in (tests.models._util)
    out_shape = copy.deepcopy(truth).eval()(x.double()).shape
    upstream = torch.randn(out_shape).to(dtype).double()  # the same values for every run
    if dtype in (torch.float16, torch.bfloat16) and not isinstance(block, _PreActBlock):
        upstream[_ambiguous_relu(truth, baseline, x, x_dev)] = 0.0
    with fastres.backends.record_calls() as served:
        got = _run_steps(fused, x_dev, upstream.to(device), steps, backend)
    assert [(c.direction, c.op, c.backend) for c in served] == (
        [("forward", "residual_block", backend), ("backward", "residual_block", backend)] * steps
        + [("forward", "residual_block", backend)]), "the block did not run as one block op"
    want = _run_steps(truth, x.double(), upstream, steps, None)
    base = _run_steps(baseline, x_dev, upstream.to(device), steps, None)
    compare_steps(got, want, base, steps)
    for m_f, m_t in zip(fused.modules(), truth.modules()):
        if isinstance(m_f, nn.BatchNorm2d):
            assert int(m_f.num_batches_tracked) == int(m_t.num_batches_tracked) == steps


@pytest.mark.parametrize(("backend", "spec", "dtype"), _grid(("reference", "triton"), DTYPES))
def test_block_op_matches_eager_block(backend: str, spec: Block, dtype: torch.dtype) -> None:
    check_block(spec, dtype, backend)


def test_block_op_is_deterministic() -> None:
    """Two identical steps on the Triton kernels give bitwise the same output and gradients."""
    block = BY_NAME["bottleneck-proj-s2"].build()
    x = torch.randn(2, 32, 7, 7).contiguous(memory_format=CL)
    upstream = torch.randn(2, 64, 4, 4)
    runs = []
    for _ in range(2):
        b = copy.deepcopy(block)
        runs.append(_run_steps(b, x, upstream, 1, "triton")[0][0])
    (o1, dx1, g1), (o2, dx2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(dx1, dx2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_padding_is_applied_after_the_activation() -> None:
    """conv2 of a basic block reads relu(bn1(y1)) with zero padding: with every shift of bn1 > 0
    the wrong order (pad y1, then activate) puts relu(shift) > 0 on the border, which changes
    the output by far more than the tolerance. The block op must match the right order."""
    block = BY_NAME["basic-identity"].build()
    with torch.no_grad():
        block.bn1.bias.fill_(2.0)
    x = torch.randn(2, 16, 7, 7)
    plain = copy.deepcopy(block).double().set_fused(False)  # before any step moves the stats
    with torch.no_grad():
        want = plain.eval()(x.double())
        want_train = copy.deepcopy(plain).train()(x.double())
    with fastres.use_backend("triton"), torch.no_grad():
        got = block.eval()(x.contiguous(memory_format=CL))
        got_train = block.train()(x.contiguous(memory_format=CL))
    # the wrong order, in float64: pad y1 first, then BN + ReLU over the padded map
    with torch.no_grad():
        y1 = plain.bn1(plain.conv1(x.double()))
        z1 = torch.relu(nn.functional.pad(y1 - plain.bn1.bias.view(1, -1, 1, 1), (1, 1, 1, 1))
                        + plain.bn1.bias.view(1, -1, 1, 1))
        c2 = plain.conv2
        wrong = torch.relu(plain.bn2(nn.functional.conv2d(z1, c2.weight)) + x.double())
    assert (wrong - want).abs().max() > 0.1, "the test case does not tell the orders apart"
    assert (got.double() - want).abs().max() < 1e-3
    assert (got_train.double() - want_train).abs().max() < 1e-3


def test_functional_block_errors_name_the_problem() -> None:
    w1, w2 = torch.randn(8, 4, 3, 3), torch.randn(8, 8, 3, 3)
    norms = [NormArgs(None, None, torch.zeros(8), torch.ones(8)) for _ in range(2)]
    x = torch.randn(2, 4, 6, 6)
    convs = [ConvArgs(w1, padding=1), ConvArgs(w2, padding=1)]
    with pytest.raises(ValueError, match="identity shortcut needs equal shapes"):
        residual_block(x, convs, norms, training=True)
    with pytest.raises(ValueError, match="expected 3 BatchNorms"):
        residual_block(x, convs, norms, shortcut=ConvArgs(torch.randn(8, 4, 1, 1)),
                       training=True)
    with pytest.raises(ValueError, match="conv2: channel mismatch"):
        residual_block(x, [convs[0], ConvArgs(w1, padding=1)], norms, training=True)
    with pytest.raises(TypeError, match="conv1 weight dtype"):
        residual_block(x, [ConvArgs(w1.half(), padding=1), convs[1]], norms, training=True)
    with pytest.raises(ValueError, match=r"BatchNorm 1 weight must have shape \(8,\)"):
        bad = [norms[0], NormArgs(torch.ones(5), None, None, None)]
        residual_block(torch.randn(2, 8, 6, 6), [ConvArgs(w2, padding=1)] * 2, bad,
                       training=True)
    with pytest.raises(ValueError, match="eval mode needs every BatchNorm's running"):
        no_stats = [NormArgs(None, None, None, None)] * 2
        residual_block(torch.randn(2, 8, 6, 6), [ConvArgs(w2, padding=1)] * 2, no_stats,
                       training=False)


def test_block_op_traces_with_torch_compile() -> None:
    """fullgraph=True: the block op is one custom op with a fake kernel (reference backend)."""
    block = BY_NAME["bottleneck-proj-s2"].build().train()
    x = torch.randn(2, 32, 7, 7, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


GPU_BLOCKS = [  # ImageNet sizes; (block, dtype)
    # ResNet-50 layer1.0 exactly (the kernels the GPU check's block benchmark runs next)
    (Block("r50-layer1.0", Bottleneck, 64, 64, hw=56), torch.bfloat16),
    (Block("r50-layer2.0", Bottleneck, 256, 128, stride=2, hw=56), torch.bfloat16),
    (Block("r50-layer3.1", Bottleneck, 1024, 256, hw=14), torch.float16),
    (Block("rx50-layer2.0", Bottleneck, 256, 128, stride=2, groups=32, base_width=4, hw=56),
     torch.bfloat16),
    (Block("r18-layer2.0", BasicBlock, 64, 128, stride=2, hw=56), torch.bfloat16),
    (Block("preact-layer2.0", PreActBottleneck, 256, 128, stride=2, hw=56), torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("spec", "dtype"), GPU_BLOCKS,
                         ids=[f"{b.name}-{str(d)[6:]}" for b, d in GPU_BLOCKS])
def test_block_op_on_cuda(spec: Block, dtype: torch.dtype) -> None:
    """ResNet-50 / ResNeXt-50 / ResNet-18 / pre-activation blocks at ImageNet sizes on the GPU's
    Triton kernels (whichever configurations the run's autotuning setting gives), one training
    step and an eval forward, cuDNN as the same-dtype baseline, float64 on the CPU the truth."""
    check_block(spec, dtype, "triton", steps=1, n=4, device="cuda")


def test_block_op_under_autocast() -> None:
    """Under autocast the block op computes in the autocast dtype (activations and conv
    weights cast, BN parameters and statistics kept in fp32), returns that dtype, and gives
    fp32 gradients to fp32 parameters; eager PyTorch under the same autocast agrees."""
    block = BY_NAME["bottleneck-proj-s2"].build().train()
    plain = copy.deepcopy(block).set_fused(False)
    x = torch.randn(2, 32, 7, 7)
    outs = []
    for m in (block, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x.contiguous(memory_format=CL))
        out.float().square().mean().backward()
        outs.append(out)
    assert outs[0].dtype == torch.bfloat16
    assert (outs[0].float() - outs[1].float()).abs().max() < 0.1 * outs[1].float().abs().max()
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert (p.grad - q.grad).norm() < 0.1 * q.grad.norm(), name
    for m_f, m_p in zip(block.modules(), plain.modules()):
        if isinstance(m_f, nn.BatchNorm2d):
            torch.testing.assert_close(m_f.running_mean, m_p.running_mean, atol=2e-2, rtol=2e-2)
