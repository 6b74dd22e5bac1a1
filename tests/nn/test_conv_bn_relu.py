"""ConvBNReLU behaves as nn.Conv2d → nn.BatchNorm2d → ReLU, state and all."""

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres.nn import ConvBNReLU
from tests.numerics import assert_close_ratio


def _eager(m: ConvBNReLU) -> nn.Sequential:
    layers = [m.conv, m.bn] + ([nn.ReLU()] if m.relu else [])
    return nn.Sequential(*layers)


def _clone_pair(m: ConvBNReLU, dtype=torch.float64) -> ConvBNReLU:
    twin = ConvBNReLU.from_modules(
        nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                  m.conv.padding, m.conv.dilation, m.conv.groups, m.conv.bias is not None),
        nn.BatchNorm2d(m.bn.num_features, m.bn.eps, m.bn.momentum, m.bn.affine,
                       m.bn.track_running_stats),
        relu=m.relu,
    )
    twin.load_state_dict(m.state_dict())
    return twin.to(dtype)


def test_state_dict_keys_are_those_of_conv_and_bn():
    m = ConvBNReLU(4, 8, 3, padding=1, bias=True)
    assert set(m.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert isinstance(m.conv, nn.Conv2d)
    assert isinstance(m.bn, nn.BatchNorm2d)


def test_from_modules_shares_parameters_and_buffers():
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    m = ConvBNReLU.from_modules(conv, bn)
    assert m.conv.weight is conv.weight and m.bn.running_mean is bn.running_mean
    m(torch.randn(2, 4, 5, 5))
    assert int(bn.num_batches_tracked) == 1  # the shared buffer moved
    assert not torch.equal(bn.running_mean, torch.zeros(8))


def test_from_modules_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        ConvBNReLU.from_modules(nn.Conv2d(4, 8, 3, padding_mode="reflect"), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="BatchNorm1d is not a plain nn.BatchNorm2d"):
        ConvBNReLU.from_modules(nn.Conv2d(4, 8, 3), nn.BatchNorm1d(8))


@pytest.mark.parametrize(
    "momentum, affine, track", [(0.1, True, True), (None, True, True), (0.3, False, True),
                                (0.1, True, False)],
)
@pytest.mark.parametrize("relu", [True, False])
def test_matches_eager_modules_over_train_and_eval_steps(momentum, affine, track, relu):
    m = ConvBNReLU(6, 12, 3, stride=2, padding=1, momentum=momentum, relu=relu)
    m.bn = nn.BatchNorm2d(12, momentum=momentum, affine=affine, track_running_stats=track)
    base = _eager(_clone_pair(m, torch.float32))
    ref = _eager(_clone_pair(m, torch.float64))
    for step, training in enumerate([True, True, True, False]):
        for mod in (m, base, ref):
            mod.train(training)
        x = torch.randn(3, 6, 9, 9) + step
        z = m(x)
        assert_close_ratio(f"step {step}", z, ref(x.double()), base(x))
    if track:
        assert int(m.bn.num_batches_tracked) == 3
        assert_close_ratio("running_var", m.bn.running_var, ref[1].running_var, base[1].running_var)
        assert_close_ratio("running_mean", m.bn.running_mean, ref[1].running_mean,
                           base[1].running_mean)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("residual", [False, True])
def test_silu_module_matches_conv_bn_silu(backend: str, residual: bool):
    """ConvBNReLU(act="silu") against nn.Conv2d → nn.BatchNorm2d (→ + residual) → nn.SiLU:
    outputs and every gradient over train and eval steps, then the running statistics."""
    m = ConvBNReLU(6, 12, 3, stride=2, padding=1, act="silu")
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
    assert m.act == "silu" and not m.relu and "act=silu" in repr(m)
    twins = [_clone_pair(m, dt) for dt in (torch.float32, torch.float64)]
    base, ref = (nn.ModuleDict({"pair": nn.Sequential(t.conv, t.bn), "act": nn.SiLU()})
                 for t in twins)
    params = {"conv.weight": lambda mod: mod.conv.weight, "bn.weight": lambda mod: mod.bn.weight,
              "bn.bias": lambda mod: mod.bn.bias}
    for step, training in enumerate([True, True, False]):
        x64 = torch.randn(3, 6, 9, 9, dtype=torch.float64) + step
        r64 = torch.randn(3, 12, 5, 5, dtype=torch.float64) if residual else None
        dz64 = torch.randn(3, 12, 5, 5, dtype=torch.float64)
        outs, grads = [], []
        for mod, dt in ((m, torch.float32), (base, torch.float32), (ref, torch.float64)):
            mod.train(training)
            for p in mod.parameters():
                p.grad = None
            x = x64.to(dt).requires_grad_()
            r = None if r64 is None else r64.to(dt).requires_grad_()
            if mod is m:
                with fastres.use_backend(backend), fastres.backends.record_calls() as served:
                    z = m(x, r)
                    z.backward(dz64.to(dt))
                assert {c.backend for c in served} == {backend}
                pair = m
            else:
                v = mod["pair"](x)
                z = mod["act"](v if r is None else v + r)
                z.backward(dz64.to(dt))
                pair = twins[0] if mod is base else twins[1]
            outs.append(z)
            grads.append({"x": x.grad, **({"residual": r.grad} if r is not None else {}),
                          **{name: get(pair).grad for name, get in params.items()}})
        assert_close_ratio(f"step {step} output", outs[0], outs[2], outs[1])
        for name in grads[0]:
            assert_close_ratio(f"step {step} grad {name}", grads[0][name], grads[2][name],
                               grads[1][name])
    assert int(m.bn.num_batches_tracked) == 2
    for name in ("running_mean", "running_var"):
        assert_close_ratio(name, getattr(m.bn, name), getattr(twins[1].bn, name),
                           getattr(twins[0].bn, name))


class _SiluStem(nn.Module):
    """A model's stem as timm builds it with ``act_layer=nn.SiLU``: three children called in
    turn."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.SiLU()

    def forward(self, x):
        return self.act1(self.bn1(self.conv1(x)))


def test_stem_folds_silu():
    from fastres.nn.stem import StemConv2d, fold_stem

    m = _SiluStem()
    with torch.no_grad():
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.normal_()
    base, ref = copy.deepcopy(m), copy.deepcopy(m).double()
    fold_stem(m, "conv1", "bn1", "act1")
    assert type(m.conv1) is StemConv2d and isinstance(m.act1, nn.SiLU)
    for step, training in enumerate([True, False]):
        x = torch.randn(2, 3, 15, 13) + step
        outs = []
        for mod, dt in ((m, torch.float32), (base, torch.float32), (ref, torch.float64)):
            mod.train(training)
            mod.conv1.weight.grad = None
            with fastres.backends.record_calls() as served:
                z = mod(x.to(dt))
                z.square().sum().backward()
            assert bool(served) == (mod is m)  # only the folded stem runs the fused op
            outs.append((z, mod.conv1.weight.grad))
        assert_close_ratio(f"step {step} output", outs[0][0], outs[2][0], outs[1][0])
        assert_close_ratio(f"step {step} grad", outs[0][1], outs[2][1], outs[1][1])


class _WithResidual(nn.Module):
    def __init__(self, inner: nn.Module, residual: torch.Tensor | None) -> None:
        super().__init__()
        self.inner, self.residual = inner, residual

    def forward(self, x):
        return self.inner(x, self.residual) if self.residual is not None else self.inner(x)


@pytest.mark.parametrize("residual", [False, True])
def test_silu_saves_y_and_the_residual_not_z(residual: bool):
    """SiLU's backward recomputes its input from the raw y (and the residual): it saves the
    residual instead of z. Without a residual that is one activation less than ReLU's (x, y, z)
    and than eager conv → BN → SiLU (x, y and SiLU's input); with one, as many."""
    from fastres.benchmark.memory import saved_bytes

    x = torch.randn(4, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    act = 4 * 16 * 10 * 10 * 4  # one fp32 activation
    r = torch.randn(4, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    r = r if residual else None
    saved = {}
    for name in ("relu", "silu"):
        m = ConvBNReLU(8, 16, 3, padding=1, act=name).train()
        saved[name] = saved_bytes(_WithResidual(m, r), x)
    eager = nn.Sequential(m.conv, m.bn, nn.SiLU()).train()
    vectors = 2 * 16 * 4  # the fp32 batch mean and variance
    assert saved["silu"] == x.nbytes + act * (1 + residual) + vectors
    assert saved["relu"] - saved["silu"] == (0 if residual else act)
    if not residual:
        assert saved_bytes(eager, x) - saved["silu"] == act


def test_bad_activation_names_raise():
    with pytest.raises(ValueError, match="unsupported activation 'gelu'.*relu, silu or none"):
        ConvBNReLU(4, 8, 3, act="gelu")
    with pytest.raises(TypeError, match="act must be a str or None, got Tanh"):
        ConvBNReLU.from_modules(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), act=nn.Tanh())
    m = ConvBNReLU(4, 8, 3, act="none")
    assert m.act is None and not m.relu


def test_residual_input_and_channels_last_output():
    m = ConvBNReLU(4, 8, 1).eval()
    m.bn.running_mean.normal_()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5)
    z = m(x, r)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, torch.relu(m.bn(m.conv(x)) + r))


def test_backend_context_is_used():
    m = ConvBNReLU(4, 8, 3, padding=1)
    with fastres.use_backend("reference"):
        assert fastres.get_backend() == "reference"
        m(torch.randn(2, 4, 5, 5))
    assert fastres.get_backend() == "auto"
