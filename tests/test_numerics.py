"""The test helpers themselves: the TF32 baseline is a conv of TF32 operands in both passes."""

import torch
import torch.nn.functional as F

from tests.numerics import _TF32Conv2d, to_tf32


def test_to_tf32_rounds_to_ten_mantissa_bits():
    x = torch.tensor([1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-11), -3.0, 1e-3], dtype=torch.float32)
    cut = to_tf32(x)
    # ties away from zero, below half an ulp down, negative values by magnitude
    assert cut[:4].tolist() == [1 + 2**-10, 1.0, -(1 + 2**-9), -3.0]
    assert (cut.view(torch.int32) & 0x1FFF == 0).all()
    assert abs(cut[4] - x[4]) <= 2**-11 * abs(x[4])


def test_tf32_conv_forward_and_backward_use_tf32_operands():
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    dy = torch.randn(2, 8, 4, 3)
    y = _TF32Conv2d.apply(x, w, b, (2, 2), (1, 1), (1, 1), 2)
    y.backward(dy)
    # float64 reference on the cut operands
    x64, w64 = (to_tf32(t.detach()).double().requires_grad_() for t in (x, w))
    y64 = F.conv2d(x64, w64, b.detach().double(), 2, 1, 1, 2)
    gx, gw = torch.autograd.grad(y64, (x64, w64), to_tf32(dy).double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum((0, 2, 3)))
    assert not torch.equal(to_tf32(x.detach()), x.detach())  # the cut did something
