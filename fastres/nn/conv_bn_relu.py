"""``ConvBNReLU``: an ``nn.Conv2d`` + ``nn.BatchNorm2d`` (+ ReLU) pair run as one fused op."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import conv_bn_relu
from ..ops.conv_bn_relu import activation
from .sync_conv_bn import sync_group

Tensor = torch.Tensor


def bn_momentum(bn: nn.BatchNorm2d) -> tuple[bool, float | Tensor]:
    """``(use_batch_stats, momentum)`` as ``nn.BatchNorm2d.forward`` computes them.

    Also advances ``num_batches_tracked`` in training, exactly as BatchNorm does. With
    ``momentum=None`` (cumulative moving average) the factor 1 / num_batches_tracked stays a
    tensor on the module's device: BatchNorm2d's ``float(num_batches_tracked)`` would wait for the
    GPU on every step (and break CUDA-graph capture).
    """
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return use_batch_stats, bn_momenta([bn])[0]


def bn_momenta(bns: list[nn.BatchNorm2d]) -> list[float | Tensor]:
    """The momentum of each BatchNorm for this step, as :func:`bn_momentum`; the counters of
    all advance in one multi-tensor call (a block's three or four: one launch, not four)."""
    tracking = [bn.training and bn.track_running_stats for bn in bns]
    counters = [bn.num_batches_tracked for bn, t in zip(bns, tracking) if t]
    if counters:
        torch._foreach_add_(counters, 1)
    momenta: list[float | Tensor] = []
    for bn, t in zip(bns, tracking):
        if bn.momentum is not None:
            momenta.append(bn.momentum)
        else:  # cumulative moving average while tracking; unused otherwise
            momenta.append(bn.num_batches_tracked.reciprocal() if t else 0.0)
    return momenta


class ConvBNReLU(nn.Module):
    """Conv2d → BatchNorm2d → (+ residual) → (ReLU), fused.

    Holds ordinary ``conv`` (``nn.Conv2d``) and ``bn`` (``nn.BatchNorm2d``) children, so its
    state_dict has the keys of the unfused pair and loads their weights as is.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        relu: bool = True,
        *,
        act: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **kw
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kw)
        self.act = activation(relu, act)
        self.relu = self.act == "relu"

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, relu: bool = True,
                     act: str | None = None) -> ConvBNReLU:
        """Wrap existing modules (``bn`` a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d);
        parameters and buffers are shared, not copied. ``act`` names the activation (see
        :func:`activation`)."""
        name = activation(relu, act)
        check_fusable(conv, bn, name)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv = conv
        self.bn = bn
        self.act = name
        self.relu = name == "relu"
        return self

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return run_fused(self.conv, self.bn, x, residual, act=self.act or "none")

    def extra_repr(self) -> str:
        return f"act={self.act}"


def activation_of(module: nn.Module | None) -> tuple[str | None, str | None]:
    """``(activation name, None)`` for an activation module the fused ops apply exactly
    (``nn.ReLU``, ``nn.SiLU``; None or ``nn.Identity``: no activation), else ``(None, reason)``."""
    if module is None or type(module) is nn.Identity:
        return None, None
    if type(module) is nn.ReLU:
        return "relu", None
    if type(module) is nn.SiLU:
        return "silu", None
    return None, f"{type(module).__name__} is not an activation fastres fuses (ReLU, SiLU)"


def is_frozen_bn(bn: nn.Module) -> bool:
    """torchvision's or timm's ``FrozenBatchNorm2d``: a fixed per-channel affine from buffers
    (weight, bias, running_mean, running_var, eps), in training as in eval."""
    return any(cls.__name__ == "FrozenBatchNorm2d" and cls.__module__.startswith(
        ("torchvision.", "timm.")) for cls in type(bn).__mro__)


def run_fused(conv: nn.Conv2d, bn: nn.Module, x: Tensor, residual: Tensor | None = None,
              relu: bool = True, act: str | None = None) -> Tensor:
    """``act(bn(conv(x)) + residual)`` as one fused op over the modules' own parameters and
    buffers (running statistics and ``num_batches_tracked`` updated as BatchNorm does; a
    FrozenBatchNorm2d is a fixed affine: its buffers normalise, in training too, and get no
    gradient). ``act`` as in :func:`activation` (default: ReLU if ``relu``). A
    ``SyncBatchNorm`` that synchronises in this call (training, a process group of more than
    one) takes its statistics over that process group (``process_group=`` of the op: one
    all_gather forward, one all_reduce backward); otherwise it is BatchNorm, as in PyTorch.

    The modules must satisfy :func:`fusable_reason` up to their exact type (subclasses that keep
    the parent's attributes, such as the fused stem's, are served too).
    """
    name = activation(relu, act)
    act = name or "none"
    if is_frozen_bn(bn):
        return conv_bn_relu(
            x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bias=conv.bias,
            training=False, eps=bn.eps, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, residual=residual, act=act)
    use_batch_stats, momentum = bn_momentum(bn)
    track = not bn.training or bn.track_running_stats
    return conv_bn_relu(
        x,
        conv.weight,
        bn.weight,
        bn.bias,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bias=conv.bias,
        training=use_batch_stats,
        momentum=momentum,
        eps=bn.eps,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        residual=residual,
        act=act,
        process_group=sync_group(bn),  # SyncBatchNorm in training: over the process group
    )


def fusable_reason(conv: nn.Module, bn: nn.Module, act: str | None = "relu") -> str | None:
    """None if ``conv`` → ``bn`` (→ activation ``act``) can run as :class:`ConvBNReLU`
    exactly, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    frozen = is_frozen_bn(bn) and type(bn).__name__ == "FrozenBatchNorm2d"  # exact type
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and not frozen:
        return (f"{type(bn).__name__} is not a plain nn.BatchNorm2d, nn.SyncBatchNorm or "
                "FrozenBatchNorm2d")
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (only explicit padding is fused)"
    features = bn.weight.shape[0] if is_frozen_bn(bn) else bn.num_features
    if conv.out_channels != features:
        return f"conv has {conv.out_channels} outputs but bn has {features} features"
    return None


def check_fusable(conv: nn.Module, bn: nn.Module, act: str | None = "relu") -> None:
    reason = fusable_reason(conv, bn, act)
    if reason is not None:
        raise ValueError(f"cannot fuse {type(conv).__name__} + {type(bn).__name__}: {reason}")
