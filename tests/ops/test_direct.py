"""Eager calls run the custom ops' implementations without the dispatcher (issue 11, point 7);
anything that watches or reroutes dispatch still sees the ops, and both paths give the same
bits (see :mod:`fastres.ops.direct`)."""

import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.backends import record_calls
from fastres.ops.direct import can_skip_dispatcher

OPS = {  # module → the custom ops it calls, by attribute name
    "conv_bn_relu": ("fastres.ops.conv_bn_relu", ("conv_bn_relu_fwd", "conv_bn_relu_bwd")),
    "residual_block": ("fastres.ops.block", ("residual_block_fwd", "residual_block_bwd")),
}


def _model(op: str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    if op == "conv_bn_relu":
        conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        return fastres.nn.ConvBNReLU.from_modules(conv, bn).to(device)
    return fastres.fuse(nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8))).to(device)


def _step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input grad, parameter grads, running statistics after one training step."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


def _count_dispatches(monkeypatch, op: str) -> list[str]:
    """Replace the op layer's custom ops by wrappers that log each dispatched call."""
    module_name, names = OPS[op]
    module, calls = sys.modules[module_name], []
    for name in names:
        custom_op = getattr(module, name)

        def logged(*args, _op=custom_op, _name=name):
            calls.append(_name)
            return _op(*args)

        monkeypatch.setattr(module, name, logged)
    return calls


class _LogOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("device", "backend", "served_by"), [
    ("cpu", "reference", "reference"),
    ("cpu", "triton", "triton"),  # the Triton interpreter
    pytest.param("cuda", "auto", "triton", marks=pytest.mark.gpu),  # Triton on the GPU
])
@pytest.mark.parametrize("op", OPS)
def test_eager_training_step_skips_the_dispatcher_with_the_same_bits(monkeypatch, op, device,
                                                                     backend, served_by):
    """The same kernels either way, launched on x's device from inside the implementation."""
    if backend == "triton" and fastres.backends.load("triton") is None:
        pytest.skip("triton not importable")
    x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    calls = _count_dispatches(monkeypatch, op)
    with fastres.use_backend(backend), record_calls() as served:
        direct = _step(_model(op, device), x)
    assert calls == []
    assert {c.backend for c in served} == {served_by}
    with _LogOps(), fastres.use_backend(backend):  # a dispatch mode: every call dispatched
        dispatched = _step(_model(op, device), x)
    assert calls == list(OPS[op][1])
    for a, b in zip(direct, dispatched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_profiler_and_dispatch_modes_see_the_ops(op):
    x = torch.randn(2, 8, 6, 6)
    model = _model(op)
    fwd, bwd = (f"fastres::{name}" for name in OPS[op][1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(model, x)
    names = {e.name for e in prof.events()}
    assert {fwd, bwd} <= names
    with _LogOps() as mode:
        _step(model, x)
    assert {f"{fwd.replace('::', '.')}.default", f"{bwd.replace('::', '.')}.default"} <= set(
        mode.seen
    )


def test_fake_tensors_reach_the_fake_kernel():
    model = _model("conv_bn_relu").eval()
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        out = model(torch.empty(3, 8, 5, 7))
    assert isinstance(out, torch._subclasses.fake_tensor.FakeTensor)
    assert out.shape == (3, 8, 5, 7)


def test_what_makes_a_call_go_through_the_dispatcher():
    t, p = torch.randn(2), nn.Parameter(torch.randn(2))
    assert not can_skip_dispatcher((t, p, None))  # grad mode on and p requires grad
    with torch.no_grad():  # as inside an autograd.Function's forward
        assert can_skip_dispatcher((t, p, None))  # a Parameter is no intercepting subclass
    assert can_skip_dispatcher((t, p.detach(), None))

    class Logged(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Logged():
        assert not can_skip_dispatcher((t,))
    with torch.device("cpu"):  # a function mode too: factory calls inside would change
        assert not can_skip_dispatcher((t,))
    with _LogOps():
        assert not can_skip_dispatcher((t,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not can_skip_dispatcher((t,))
    assert not can_skip_dispatcher((t, t.as_subclass(_Subclass)))
    inside_trace = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        torch.jit.trace(lambda v: inside_trace.append(can_skip_dispatcher((v,))) or v * 2, t)
    assert False in inside_trace
    inside_vmap = []
    torch.func.vmap(lambda v: inside_vmap.append(can_skip_dispatcher((v,))) or v)(t)
    assert inside_vmap == [False]
    assert can_skip_dispatcher((t,))


class _Subclass(torch.Tensor):
    """A tensor subclass with the default ``__torch_function__`` (it can intercept calls)."""


def test_jit_trace_records_the_op():
    """The tracer records dispatched ops only: a direct call would leave the kernels out of the
    trace (on a GPU, a trace holding just the output's allocation)."""
    model = _model("conv_bn_relu").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer on the shape checks; its deprecation
        traced = torch.jit.trace(model, x)
    assert "fastres::conv_bn_relu_fwd" in {n.kind() for n in traced.graph.nodes()}
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_refused_not_wrong(op):
    """With create_graph=True the backward runs in grad mode on tensors that require grad: it
    goes through the dispatcher, whose backward op has no autograd formula, and the second
    backward raises (a direct call would differentiate the backward's arithmetic: wrong)."""
    model = _model(op).train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    weight = next(model.parameters())
    (grad,) = torch.autograd.grad(model(x).square().sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.sum().backward()
