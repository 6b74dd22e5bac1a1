"""Bad input gets a clear Python error naming the problem."""

import pytest
import torch

import fastres
from fastres.ops import conv_bn_relu


def _args(n=2, c=8, h=6, w=6, k=8, r=3, groups=1, dtype=torch.float32):
    return dict(
        x=torch.randn(n, c, h, w, dtype=dtype),
        weight=torch.randn(k, c // groups, r, r, dtype=dtype),
        bn_weight=torch.rand(k) + 0.5,
        bn_bias=torch.randn(k),
        running_mean=torch.randn(k),
        running_var=torch.rand(k) + 0.5,
    )


def _call(args, **kw):
    a = dict(args)
    kw.setdefault("training", True)
    kw.setdefault("padding", 1)
    return conv_bn_relu(
        a.pop("x"), a.pop("weight"), a.pop("bn_weight"), a.pop("bn_bias"),
        a.pop("running_mean"), a.pop("running_var"), **kw,
    )


def test_valid_call_runs():
    assert _call(_args()).shape == (2, 8, 6, 6)


@pytest.mark.parametrize(
    "mutate, kw, error, match",
    [
        (lambda a: a.update(x=a["x"][0]), {}, ValueError, r"x of rank 4.*got rank 3"),
        (lambda a: a.update(weight=a["weight"][0]), {}, ValueError, r"weight of rank 4"),
        (lambda a: a.update(x=torch.randn(2, 6, 6, 6)), {}, ValueError, "channel mismatch"),
        (lambda a: None, {"groups": 3}, ValueError, "groups=3 must divide"),
        (lambda a: None, {"groups": 0}, ValueError, "groups must be a positive int"),
        (lambda a: a.update(x=a["x"].to(torch.int64)), {}, TypeError, "x has unsupported dtype"),
        (
            lambda a: a.update(weight=a["weight"].to(torch.int32)),
            {}, TypeError, "weight has unsupported dtype",
        ),
        (lambda a: a.update(weight=a["weight"].half()), {}, TypeError, "weight dtype"),
        (lambda a: a.update(x=a["x"].to("meta")), {}, ValueError, "weight is on cpu but x is on"),
        (lambda a: None, {"padding": -1}, ValueError, "padding must be >= 0"),
        (lambda a: None, {"stride": 0}, ValueError, "stride must be >= 1"),
        (
            lambda a: None,
            {"residual": torch.randn(2, 8, 3, 3)}, ValueError, r"residual has shape \(2, 8, 3, 3\)",
        ),
        (
            lambda a: None,
            {"residual": torch.randn(2, 8, 6, 6).half()}, TypeError, "residual dtype",
        ),
        (lambda a: a.update(bn_weight=torch.ones(5)), {}, ValueError, r"bn_weight must have shape"),
        (lambda a: a.update(running_var=None), {}, ValueError, "both running_mean and running_var"),
        (lambda a: a.update(x=torch.randn(2, 8, 1, 1)), {"padding": 0}, ValueError, "empty"),
        (
            lambda a: a.update(x=torch.randn(1, 8, 1, 1), weight=torch.randn(8, 8, 1, 1)),
            {"padding": 0}, ValueError, "more than 1 value per channel",
        ),
        (lambda a: None, {"backend": "cudnn"}, ValueError, "unknown fastres backend 'cudnn'"),
        (
            lambda a: None,
            {"act": "gelu"}, ValueError, "unsupported activation 'gelu'; fastres fuses relu, silu",
        ),
        (lambda a: None, {"act": True}, TypeError, "act must be a str or None, got bool"),
    ],
)
def test_bad_input_raises_clear_error(mutate, kw, error, match):
    args = _args()
    mutate(args)
    with pytest.raises(error, match=match):
        _call(args, **kw)


def test_act_overrides_relu():
    args = _args()
    silu = _call(args, act="silu", relu=False)
    assert torch.equal(silu, _call(args, act="SiLU"))
    assert torch.equal(_call(args, relu=False), _call(args, act="none", relu=True))
    assert (silu < 0).any()  # SiLU, not ReLU, was applied


def test_backend_that_cannot_serve_says_why():
    args = _args(dtype=torch.float64)
    with pytest.raises(fastres.BackendUnavailableError, match="cuda"):
        _call(args, backend="cuda")


def test_unknown_backend_name_in_set_backend():
    with pytest.raises(ValueError, match="choose one of auto, reference, triton, cuda"):
        fastres.set_backend("fast")
