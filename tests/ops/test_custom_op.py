"""The custom ops: opcheck, torch.compile without graph breaks, autocast.

Host syncs on real tensors: tests/test_host_sync.py."""

import pytest
import torch

import fastres
from fastres.ops.conv_bn_relu import conv_bn_relu_bwd, conv_bn_relu_fwd
from tests.numerics import assert_close_ratio, eager_conv_bn_relu


def _fwd_args(batch_stats: bool, residual: bool, act: str | None = "relu"):
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    g = (torch.rand(16) + 0.5).requires_grad_()
    b = torch.randn(16, requires_grad=True)
    rm, rv = torch.randn(16), torch.rand(16) + 0.5
    res = torch.randn(2, 16, 7, 7).to(memory_format=torch.channels_last) if residual else None
    return (x.requires_grad_(), w, None, g, b, rm, rv, res,
            [1, 1], [1, 1], [1, 1], 1, batch_stats, 1e-5, act, True, "reference")


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_forward(batch_stats, residual):
    torch.library.opcheck(conv_bn_relu_fwd, _fwd_args(batch_stats, residual))


@pytest.mark.parametrize("act", ["silu", None])
def test_opcheck_forward_activations(act):
    torch.library.opcheck(conv_bn_relu_fwd, _fwd_args(True, True, act))


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_opcheck_backward(act):
    """ReLU's backward reads z; SiLU's reads β and the residual instead (z is None)."""
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3)
    b = torch.randn(16)
    res = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    z, y, mean, var, _ = conv_bn_relu_fwd(
        x, w, None, None, b, None, None, res,
        [1, 1], [1, 1], [1, 1], 1, True, 1e-5, act, True, "reference",
    )
    dz = torch.randn_like(z)
    saved = (None, b, res) if act == "silu" else (z, None, None)
    torch.library.opcheck(
        conv_bn_relu_bwd,
        (dz, x, w, y, saved[0], mean, var, None, *saved[1:], [1, 1], [1, 1], [1, 1], 1, True,
         1e-5, act, False, [True, True, False, False, False, True], "reference"),
    )


def test_compile_fullgraph_conv_bn_relu_module():
    torch._dynamo.reset()
    m = fastres.nn.ConvBNReLU(8, 16, 3, padding=1)
    ref = fastres.nn.ConvBNReLU(8, 16, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 6)
    r = torch.randn(2, 16, 6, 6)
    z = compiled(x, r)
    z.sum().backward()
    z_ref = ref(x, r)
    z_ref.sum().backward()
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(m.conv.weight.grad, ref.conv.weight.grad)
    torch.testing.assert_close(m.bn.running_mean, ref.bn.running_mean)
    assert int(m.bn.num_batches_tracked) == 1


def test_autocast_bf16_matches_eager_autocast():
    x = torch.randn(2, 8, 6, 6) + 0.5
    w = torch.randn(16, 8, 3, 3) / 8
    g, b = torch.rand(16) + 0.5, torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fastres.ops.conv_bn_relu(x, w, g, b, None, None, training=True, padding=1)
        z_base = eager_conv_bn_relu(x, w, g, b, None, None, training=True, padding=1)
    assert z.dtype == torch.bfloat16 == z_base.dtype
    z_ref = eager_conv_bn_relu(x.double(), w.double(), g.double(), b.double(), None, None,
                               training=True, padding=1)
    assert_close_ratio("autocast output", z, z_ref, z_base)

