"""The op layer checks arguments once per call signature (issue 11, point 7): a call that differs
in anything the checks depend on must miss that cache, compute the right result, and raise the
same errors as a first call would; the backend is still chosen per call."""

import sys

import pytest
import torch

import fastres
from fastres.backends import record_calls
from fastres.backends.reference import ReferenceBackend
from fastres.ops import conv_bn_relu
from tests.numerics import eager_conv_bn_relu


def _inputs(n=2, c=8, h=6, w=6, k=8, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(
        x=torch.randn(n, c, h, w, dtype=dtype),
        weight=torch.randn(k, c, 3, 3, dtype=dtype) / 8,
        bn_weight=torch.rand(k, dtype=dtype) + 0.5,
        bn_bias=torch.randn(k, dtype=dtype),
        running_mean=torch.randn(k, dtype=dtype),
        running_var=torch.rand(k, dtype=dtype) + 0.5,
    )


def _run(fn, a, **kw):
    kw.setdefault("training", True)
    kw.setdefault("padding", 1)
    return fn(a["x"], a["weight"], a["bn_weight"], a["bn_bias"], a["running_mean"],
              a["running_var"], **kw)


def _check(a, **kw):
    """The fused op against eager on copies of the running statistics (both updated)."""
    ref = {name: t if t is None else t.clone() for name, t in a.items()}
    z = _run(conv_bn_relu, a, **kw)
    z_ref = _run(eager_conv_bn_relu, ref, **kw)
    tol = {"atol": 1e-4, "rtol": 1e-4} if a["x"].dtype == torch.float32 else {}
    torch.testing.assert_close(z, z_ref, **tol)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(a[name], ref[name], **tol)


def test_dtype_shape_and_flags_changes_between_calls_give_right_results():
    with fastres.use_backend("reference"):
        for _ in range(2):  # second round: every signature is now cached
            _check(_inputs())
            _check(_inputs(dtype=torch.float64))
            _check(_inputs(n=3, h=5, w=7))
            _check(_inputs(), training=False)
            _check(_inputs(), stride=2)
            _check(_inputs(), relu=False)
            a = _inputs()
            _check(a, residual=torch.randn(2, 8, 6, 6))
            _check({**a, "running_mean": None, "running_var": None}, training=False)


def test_bad_input_after_a_cached_good_call_still_raises():
    a = _inputs()
    _run(conv_bn_relu, a)  # caches this signature
    with pytest.raises(ValueError, match=r"bn_weight must have shape"):
        _run(conv_bn_relu, {**a, "bn_weight": torch.ones(5)})
    with pytest.raises(TypeError, match="bn_bias must be a Tensor or None"):
        _run(conv_bn_relu, {**a, "bn_bias": [0.0] * 8})
    with pytest.raises(TypeError, match="weight dtype"):
        _run(conv_bn_relu, {**a, "weight": a["weight"].double()})
    with pytest.raises(ValueError, match=r"residual has shape \(2, 8, 3, 3\)"):
        _run(conv_bn_relu, a, residual=torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="groups must be a positive int"):
        _run(conv_bn_relu, a, groups=True)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        _run(conv_bn_relu, a, stride=(1.0, 1.0))
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        _run(conv_bn_relu, {**a, "running_var": None})
    one = _inputs(n=1, h=1, w=1)
    _run(conv_bn_relu, one, training=False, padding=1, stride=3)  # eval: one value is fine
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _run(conv_bn_relu, one, training=True, padding=1, stride=3)


def test_backend_changes_between_calls_miss_the_cache():
    a = _inputs(dtype=torch.float64)
    with fastres.use_backend("reference"):
        _run(conv_bn_relu, a)
    # same signature, other backend setting: asked backends that cannot serve still say why
    with pytest.raises(fastres.BackendUnavailableError, match="cuda"):
        _run(conv_bn_relu, a, backend="cuda")
    with fastres.use_backend("cuda"), pytest.raises(fastres.BackendUnavailableError):
        _run(conv_bn_relu, a)
    with pytest.raises(ValueError, match="unknown fastres backend 'cudnn'"):
        _run(conv_bn_relu, a, backend="cudnn")
    with record_calls() as calls, fastres.use_backend("reference"):
        _run(conv_bn_relu, a)
    assert [c.backend for c in calls] == ["reference"]


@pytest.mark.skipif(fastres.backends.load("triton") is None, reason="triton not importable")
def test_same_signature_goes_where_the_setting_says():
    """A cached reference call, then the triton backend (the interpreter on CPU), then back."""
    a = _inputs(h=4, w=4)
    served = []
    for name in ("reference", "triton", "reference"):
        with record_calls() as calls, fastres.use_backend(name):
            _check(a, training=False)
        served += [c.backend for c in calls]
    assert served == ["reference", "triton", "reference"]


def test_backend_is_chosen_per_call_even_for_a_kept_signature(monkeypatch):
    """Checks are kept per signature; availability is asked on every call (a backend that stops
    serving, here a patched reference backend, is noticed at once)."""
    checked = sys.modules["fastres.ops.conv_bn_relu"]._checked_calls
    a = _inputs(k=16)
    with fastres.use_backend("reference"):
        _run(conv_bn_relu, a)
        size = len(checked)
        _run(conv_bn_relu, a)
        assert len(checked) == size  # the same signature: kept once
        monkeypatch.setattr(ReferenceBackend, "unsupported_reason", lambda self, call: "patched")
        with pytest.raises(fastres.BackendUnavailableError, match="patched"):
            _run(conv_bn_relu, a)


def test_block_op_checks_once_per_signature_and_still_raises_after_a_kept_call():
    """The block op keeps its checks per call signature as conv_bn_relu does: a good call is
    kept; a call that differs in a checked property misses and raises; a differing good call
    computes its own result (eval against the running statistics, float64 eager)."""
    from fastres.ops.block import ConvArgs, NormArgs, residual_block

    kept = sys.modules["fastres.ops.block"]._checked_blocks
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 8, 3, 3) / 8, torch.randn(8, 8, 3, 3) / 8

    def norms(k=8):
        return [NormArgs(torch.rand(k) + 0.5, torch.randn(k), torch.randn(k), torch.rand(k) + 0.5)
                for _ in range(2)]

    def run(x, convs, nrm, training=False):
        with fastres.use_backend("reference"):
            return residual_block(x, convs, nrm, training=training)

    def eager(x, convs, nrm):
        out = x.double()
        for i, (c, n) in enumerate(zip(convs, nrm)):
            out = torch.nn.functional.conv2d(out, c.weight.double(), None, c.stride, c.padding)
            out = torch.nn.functional.batch_norm(
                out, n.running_mean.double(), n.running_var.double(), n.weight.double(),
                n.bias.double(), False, 0.0, n.eps)
            out = torch.relu(out + x.double() if i == len(convs) - 1 else out)
        return out

    convs, nrm, x = [ConvArgs(w1, padding=1), ConvArgs(w2, padding=1)], norms(), None
    kept.clear()
    for shape, size in (((2, 8, 6, 6), 1), ((2, 8, 6, 6), 1), ((3, 8, 5, 7), 2)):
        x = torch.randn(shape)
        got = run(x, convs, nrm)
        assert len(kept) == size  # the second call's signature was kept by the first
        torch.testing.assert_close(got.double(), eager(x, convs, nrm), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"BatchNorm 1 weight must have shape \(8,\)"):
        run(x, convs, [nrm[0], NormArgs(torch.ones(5), None, None, None)])
    with pytest.raises(ValueError, match="conv2: channel mismatch"):
        run(x, [convs[0], ConvArgs(torch.randn(8, 4, 3, 3), padding=1)], nrm)
    with pytest.raises(TypeError, match="conv1 weight dtype"):
        run(x, [ConvArgs(w1.half(), padding=1), convs[1]], nrm)
    with pytest.raises(ValueError, match="eval mode needs every BatchNorm's running"):
        run(x, convs, [NormArgs(None, None, None, None)] * 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run(torch.randn(1, 8, 1, 1), convs, nrm, training=True)
    run(torch.randn(1, 8, 1, 1), convs, nrm)  # eval: one value per channel is fine
