"""NaN and Inf through the fused op: the same non-finite elements as eager PyTorch.

``torch.relu`` propagates NaN (``F.silu``: NaN for NaN and -Inf, +Inf for +Inf). A kernel whose
ReLU is ``max(v, 0)`` (``fmaxf``, PTX ``max.f32``) returns 0 for NaN instead: it hides invalid
results, and the NaN poisoning of unwritten outputs with them. Every kernel path is fed NaN and
±Inf (in eval through the convolution and the residual; in training through the residual only,
since a NaN in x makes every batch statistic NaN) and must give NaN, +Inf and -Inf exactly where
eager does.
"""

from __future__ import annotations

import torch

import fastres
from tests.numerics import eager_conv_bn_relu
from tests.ops.cases import ACT_ARGS, Case, make_inputs

NAN, INF = float("nan"), float("inf")


def _plant_nonfinite(inputs: dict, training: bool) -> None:
    res = inputs["residual"]
    res[0, 0, 0, 0], res[0, 1, 1, 1], res[1, 2, 2, 2] = NAN, INF, -INF
    if not training:
        x = inputs["x"]
        x[0, 0, 1, 2], x[1, 3, 4, 4] = NAN, INF


def check_nonfinite(
    case: Case, dtype: torch.dtype, training: bool, grad: bool, backend: str, device: str = "cpu"
) -> None:
    """``backend``'s output has NaN / +Inf / -Inf exactly where eager's has, and the element
    counts show the planted values reached the output (some NaN, some Inf, some zeros)."""
    assert case.residual and case.relu and case.running
    inputs = make_inputs(case, dtype, device)
    _plant_nonfinite(inputs, training)
    c = case.conv
    kw = dict(training=training, stride=c.stride, padding=c.padding, dilation=c.dilation,
              groups=c.groups, act=case.activation or "none")

    def call(fn):
        t = {}
        for name, v in inputs.items():
            dt = dtype if name in ACT_ARGS else torch.float32
            t[name] = None if v is None else v.to(device, dt)
            if grad and t[name] is not None and name not in ("running_mean", "running_var"):
                t[name].requires_grad_(True)
        with torch.set_grad_enabled(grad):
            return fn(t.pop("x"), t.pop("weight"), t.pop("bn_weight"), t.pop("bn_bias"),
                      t.pop("running_mean"), t.pop("running_var"), **t, **kw)

    eager = call(eager_conv_bn_relu).detach().cpu()
    with fastres.use_backend(backend), fastres.backends.record_calls() as served:
        z = call(fastres.ops.conv_bn_relu).detach().cpu()
    assert {s.backend for s in served} == {backend}, served
    assert eager.isnan().any() and eager.isposinf().any(), "the planted values did not reach z"
    for what, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = mask(z), mask(eager)
        assert torch.equal(got, want), (
            f"{what} at {int(got.sum())} elements, eager has {int(want.sum())}; first differing "
            f"index {tuple((got != want).nonzero()[0].tolist())}"
        )
