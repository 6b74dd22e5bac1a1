"""Residual blocks built on :class:`ConvBNReLU`, with torchvision's parameter names.

State-dict layout
-----------------
A block registers its ``nn.Conv2d`` / ``nn.BatchNorm2d`` children directly under torchvision's
names (``conv1``, ``bn1``, ..., ``downsample.0``, ``downsample.1``), so ``state_dict()``,
``named_parameters()`` and ``load_state_dict()`` are key for key those of
``torchvision.models.resnet.BasicBlock`` / ``Bottleneck`` with no renaming hooks, and
``block.conv1`` is an ``nn.Conv2d`` as torchvision users expect.

The fused execution goes through :class:`ConvBNReLU` *views*: ``ConvBNReLU.from_modules(conv, bn)``
objects that share those very modules (no parameter or buffer is duplicated). The views are kept
in a plain dict (``self._views``), not registered as children, so they add no state-dict keys and
``.to()``/``.train()`` reach the shared modules exactly once through the block's own children.

Each forward checks that a view still wraps the block's current children, so it is never silently
stale. If a child was replaced after construction (``nn.SyncBatchNorm.convert_sync_batchnorm``, a
user swapping ``bn1``), the new pair is fused in its place when it can be (a SyncBatchNorm can),
else it runs from then on unfused, through the replacement module's own forward.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.block import ConvArgs, NormArgs, block_backend, residual_block
from .conv_bn_relu import ConvBNReLU, bn_momenta, fusable_reason, is_frozen_bn
from .gate import gate_function, gate_reason
from .layout import match_input
from .sync_conv_bn import sync_group

Tensor = torch.Tensor


_switch = threading.local()


@contextlib.contextmanager
def layer_by_layer() -> Iterator[None]:
    """Inside the ``with`` block (this thread only), fused blocks run layer by layer (one
    :func:`fastres.ops.conv_bn_relu` per conv + BN pair) even where the block op could serve
    them: the per-layer baseline of the block-level benchmark, or a way to compare the two
    paths. Nests; what a forward records for backward decides how backward runs, so a graph
    built inside runs its backward layer by layer after the ``with`` block too."""
    _switch.depth = getattr(_switch, "depth", 0) + 1
    try:
        yield
    finally:
        _switch.depth -= 1


def forced_layer_by_layer() -> bool:
    """True inside :func:`layer_by_layer` (in this thread)."""
    return getattr(_switch, "depth", 0) > 0


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """torchvision's projection shortcut: 1×1 conv (stride) + BN, keys ``0.*`` and ``1.*``."""
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


def conv_bn_act(view: ConvBNReLU | None, conv: nn.Module, bn: nn.Module, x: Tensor,
                residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """``relu(bn(conv(x)) + residual)``: fused through ``view`` if it still wraps ``conv``/``bn``.

    Otherwise (no view, or a child replaced since) plain PyTorch through the modules themselves.
    """
    if view is not None and view.conv is conv and view.bn is bn:
        return view(x, residual)
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class BlockLayout(NamedTuple):
    """What a :class:`FusedBlock` hands the block op (:func:`fastres.ops.residual_block`): its
    modules in the op's roles. ``block_layout()`` returns one (a plain 4-tuple of the first
    four fields is accepted too, see :meth:`of`).

    - ``convs``: the main branch ``conv_1 .. conv_L`` (plain zero-padded ``nn.Conv2d``, no bias).
    - ``norms``: the BatchNorms in :class:`fastres.backends.base.BlockParams` order
      (post-activation ``bn_1 .. bn_L`` then the projection's; pre-activation the entry BN, if
      any, then ``bn_2 .. bn_L``).
    - ``projection``: the shortcut's conv (its BN is the last of ``norms``), None: identity.
    - ``preact``: the pre-activation structure.
    - ``shortcut_pool``: post-activation only, a module the shortcut applies to x before the
      projection conv (ResNet-D's ``nn.AvgPool2d(2, 2, ceil_mode=True,
      count_include_pad=False)``; only ``nn.AvgPool2d`` is taken); it runs in PyTorch, its
      output is the projection conv's input in the op (``shortcut_input``). None: none.
    - ``drop_path``: post-activation only, stochastic depth on the residual branch, applied to
      the last BN's output before the shortcut is added: timm ``DropPath`` or torchvision
      ``StochasticDepth`` (its draw: :func:`drop_path_scale`). None (or ``nn.Identity``): none.
    - ``gate``: post-activation only, a channel gate applied to the last BN's output before the
      drop path (timm's ``se`` child: ``SEModule``, ``EcaModule``, ...; any module of the form
      ``x * f(mean(x, (2, 3)))``, see :mod:`fastres.nn.gate`). None (or ``nn.Identity``): none.
    - ``gate_before_conv``: i puts ``gate`` on the input of ``convs[i]`` instead, the activation
      relu(bn(conv_{i−1})) it reads (RegNetY's SE before conv c). None: before the add.
    """

    convs: list[nn.Module]
    norms: list[nn.Module]
    projection: nn.Module | None
    preact: bool
    shortcut_pool: nn.Module | None = None
    drop_path: nn.Module | None = None
    gate: nn.Module | None = None
    gate_before_conv: int | None = None

    @classmethod
    def of(cls, layout: tuple) -> BlockLayout:
        """``layout`` as a BlockLayout (a 4-tuple ``(convs, norms, projection, preact)``, as
        ``block_layout`` returned before the optional pieces existed, gets none of them)."""
        return layout if isinstance(layout, cls) else cls(*layout)


def _optional_type(module: str, name: str) -> type | None:
    """A third-party class, if its module is loaded (no import: a block holding an instance
    has loaded it; and torch.compile traces no import)."""
    return getattr(sys.modules.get(module), name, None)


def drop_path_reason(module: nn.Module | None) -> str | None:
    """None if the block op can apply ``module`` as its per-sample branch scale (a timm
    ``DropPath``, a torchvision ``StochasticDepth``, ``nn.Identity`` or None), else why not."""
    if module is None or type(module) is nn.Identity:
        return None
    kinds = (_optional_type("timm.layers.drop", "DropPath"),
             _optional_type("torchvision.ops.stochastic_depth", "StochasticDepth"))
    if type(module) not in kinds:
        return f"drop path {type(module).__name__} is not timm's DropPath or torchvision's " \
               "StochasticDepth"
    return None


def drop_path_scale(module: nn.Module | None, n: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor | None:
    """The (N, 1, 1, 1) per-sample scale ``module`` (accepted by :func:`drop_path_reason`) would
    multiply a branch of ``n`` samples in ``dtype`` by, drawn from the same random stream with
    the same calls, so one seed gives the unfused module's draws; None where it is the identity
    (eval, probability 0, ``nn.Identity``). timm ``drop_path``: ``new_empty((N,1,1,1))
    .bernoulli_(keep)`` then ``div_(keep)`` if ``scale_by_keep`` and keep > 0; torchvision
    ``stochastic_depth``: ``empty([N,1,1,1])`` (mode "row") or ``[1,1,1,1]`` ("batch", then
    broadcast), ``bernoulli_(1 − p)``, ``div_`` if 1 − p > 0."""
    if module is None or type(module) is nn.Identity or not module.training:
        return None
    if hasattr(module, "drop_prob"):  # timm DropPath
        prob, row, scale = float(module.drop_prob), True, bool(module.scale_by_keep)
    else:  # torchvision StochasticDepth
        prob, row, scale = float(module.p), module.mode == "row", True
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {prob}")
        if module.mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {module.mode}")
    if prob == 0.0:
        return None
    keep = 1.0 - prob
    draw = torch.empty((n if row else 1, 1, 1, 1), dtype=dtype, device=device).bernoulli_(keep)
    if keep > 0.0 and scale:
        draw.div_(keep)
    return draw if row else draw.expand(n, 1, 1, 1)


def block_norm_reason(bn: nn.Module) -> str | None:
    """None if the block op takes ``bn`` as one of its norms: ``nn.BatchNorm2d``,
    ``nn.SyncBatchNorm`` or (a block of them only) torchvision's / timm's FrozenBatchNorm2d, a
    fixed affine from its buffers (the block then runs on those statistics, in training too,
    with gradients for the input and the convs), else why not."""
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None
    if is_frozen_bn(bn) and type(bn).__name__ == "FrozenBatchNorm2d":  # the exact class
        return None
    return f"{type(bn).__name__} is not a plain nn.BatchNorm2d, nn.SyncBatchNorm or " \
           "FrozenBatchNorm2d"


def layout_reason(layout: BlockLayout,
                  norm_reason: Callable[[nn.Module], str | None]) -> str | None:
    """None if the modules of ``layout`` can run as one block op now, else why not: the checks
    every block op caller makes (plain zero-padded bias-free convs, an avg-pool shortcut before a
    projection, a drop path the op can draw, a gate of the form ``x * f(mean(x))``, the norms
    ``norm_reason`` accepts, all in one train/eval mode, running statistics in eval, one process
    group for all SyncBatchNorms)."""
    convs, norms, proj, preact, pool, drop, gate, _ = layout
    frozen = [is_frozen_bn(bn) for bn in norms]
    if any(frozen) and not all(frozen):
        return "FrozenBatchNorm2d and BatchNorms mixed in one block"
    if all(frozen) and drop is not None and type(drop) is not nn.Identity:
        return "a drop path with FrozenBatchNorm2d (the block op draws drop paths only with " \
               "batch statistics)"
    if (pool is not None or drop is not None or gate is not None) and preact:
        return "a shortcut pool, drop path or gate on a pre-activation block"
    if gate is not None and (reason := gate_reason(gate)) is not None:
        return reason
    if pool is not None and (type(pool) is not nn.AvgPool2d or proj is None):
        return f"the shortcut's {type(pool).__name__} is not an nn.AvgPool2d before " \
               "a projection conv"
    reason = drop_path_reason(drop)
    if reason is None and drop is not None and drop.training != norms[0].training:
        reason = "the drop path and the BatchNorms are not in the same train/eval mode"
    if reason is not None:
        return reason
    for conv in (*convs, *([proj] if proj is not None else [])):
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(
                conv.padding, str):
            return f"{type(conv).__name__} is not a plain zero-padded nn.Conv2d"
        if conv.bias is not None:
            return "a convolution has a bias"
    for bn in norms:
        reason = norm_reason(bn)
        if reason is None and bn.training != norms[0].training:
            reason = "its BatchNorms are not all in the same train/eval mode"
        if reason is None and not bn.training and bn.running_mean is None:
            reason = "a BatchNorm without running statistics in eval"
        if reason is not None:
            return reason
    if len({id(sync_group(bn)) for bn in norms}) > 1:
        # the block op takes one process group for all its BatchNorms
        return "its BatchNorms synchronise over different process groups (or some are not " \
               "SyncBatchNorm): each pair fuses with its own"
    return None


def run_block_op(x: Tensor, layout: BlockLayout) -> Tensor | None:
    """The block of ``layout`` (accepted by :func:`layout_reason`) on ``x`` through the block op
    (:func:`fastres.ops.residual_block`), training or eval as its BatchNorms are (running
    statistics and ``num_batches_tracked`` advance as the modules' own forwards would advance
    them), in eager's layout for ``x``; None if the backend in force has no block kernels."""
    convs, norms, proj, preact, pool, drop, gate, gate_before_conv = layout
    if gate is not None and torch.compiler.is_compiling():
        return None  # a gate is Python the block op's custom op cannot carry: per layer
    frozen = is_frozen_bn(norms[0])  # a fixed affine from its buffers, in training too
    training = norms[0].training and not frozen
    args = [ConvArgs(c.weight, c.stride, c.padding, c.dilation, c.groups) for c in convs]
    name, _ = block_backend(x, args[0].weight, args[0].params(), training=training)
    if name is None:  # the backend in force has no block kernels
        return None
    if frozen:  # its buffers are the running statistics and affine, never updated
        norm_args = [NormArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.0, bn.eps)
                     for bn in norms]
    else:
        norm_args = []
        for bn, momentum in zip(norms, bn_momenta(norms)):  # advances num_batches_tracked
            track = not bn.training or bn.track_running_stats
            norm_args.append(NormArgs(
                bn.weight, bn.bias, bn.running_mean if track else None,
                bn.running_var if track else None, momentum, bn.eps))
    shortcut = None if proj is None else ConvArgs(
        proj.weight, proj.stride, proj.padding, proj.dilation, proj.groups)
    entry_norm = preact and len(norms) == len(convs)
    xs = None if pool is None else pool(x)  # ResNet-D: one small PyTorch op, autograd
    branch_dtype = x.dtype
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        branch_dtype = torch.get_autocast_dtype(x.device.type)  # the dtype eager draws in
    # drawn last, as the unfused block draws after its convs and BNs (which draw nothing)
    scale = drop_path_scale(drop, x.shape[0], branch_dtype, x.device)
    gate_args = {} if gate is None else dict(gate=gate_function(gate),
                                             gate_params=list(gate.parameters()),
                                             gate_before_conv=gate_before_conv)
    out = residual_block(x, args, norm_args, shortcut=shortcut, preact=preact,
                         entry_norm=entry_norm, training=training, backend=name,
                         shortcut_input=xs, branch_scale=scale,
                         process_group=sync_group(norms[0]), **gate_args)
    return match_input(out, x)  # eager's layout when called outside a fused model


def _no_op(module: nn.Module | None) -> nn.Module | None:
    return None if type(module) is nn.Identity else module


class FusedBlock(nn.Module):
    """Base of the fused blocks: holds the unregistered :class:`ConvBNReLU` views.

    Subclasses list their pairs in :meth:`fusion_pairs`. ``fused=False`` (see :meth:`set_fused`,
    used by :func:`fastres.unfuse`) runs every pair in plain PyTorch. ``unfused_reasons`` says
    why a pair that should be fused is not (e.g. its BN is a BatchNorm subclass).
    """

    fused: bool

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        """``{name: (conv, bn, relu)}`` for every conv → BN (→ ReLU) pair of the block."""
        raise NotImplementedError

    def pair_reason(self, conv: nn.Module, bn: nn.Module) -> str | None:
        """None if the pair can run fused exactly, else why not."""
        return fusable_reason(conv, bn)

    def make_view(self, conv: nn.Module, bn: nn.Module, relu: bool) -> ConvBNReLU:
        """The fused view of a pair :meth:`pair_reason` accepted (shares its modules)."""
        return ConvBNReLU.from_modules(conv, bn, relu=relu)

    def fusion_reasons(self) -> dict[str, str]:
        """``{pair: reason}`` for every pair of the block that cannot run fused."""
        pairs = self.fusion_pairs().items()
        reasons = {name: self.pair_reason(conv, bn) for name, (conv, bn, _) in pairs}
        return {name: r for name, r in reasons.items() if r is not None}

    def set_fused(self, fused: bool = True) -> FusedBlock:
        """(Re)build the fused views from the current children; ``False`` drops them."""
        reasons = self.fusion_reasons() if fused else {}
        views = {
            name: self.make_view(conv, bn, relu)
            for name, (conv, bn, relu) in self.fusion_pairs().items()
            if fused and name not in reasons
        }
        self.fused = fused
        # A plain dict is not registered by nn.Module.__setattr__: the views add no state.
        self._views = views
        self.unfused_reasons = reasons
        return self

    def _run(self, name: str, conv: nn.Module, bn: nn.Module, x: Tensor,
             residual: Tensor | None = None, relu: bool = True) -> Tensor:
        view = self._current_view(name, conv, bn)
        if view is not None and view.relu != relu:
            # the join changed since the views were built (a gate or drop path adopted after
            # from_modules, as fuse does): the pair's ReLU moves after them
            view = self._replace_view(name, conv, bn, relu)
        out = conv_bn_act(view, conv, bn, x, residual, relu)
        return match_input(out, x)  # eager's layout when called outside a fused model

    def _current_view(self, name: str, conv: nn.Module, bn: nn.Module) -> ConvBNReLU | None:
        """Pair ``name``'s view, rebuilt (or dropped) if a child was replaced since."""
        view = self._views.get(name)
        if view is not None and (view.conv is not conv or view.bn is not bn):
            view = self._replace_view(name, conv, bn, view.relu)
        return view

    def _replace_view(self, name: str, conv: nn.Module, bn: nn.Module,
                      relu: bool) -> ConvBNReLU | None:
        """A child of pair ``name`` was replaced since the views were built: fuse the new pair if
        it can be, else drop the view (and say why) so that it runs unfused from now on."""
        reason = self.pair_reason(conv, bn)
        if reason is not None:
            del self._views[name]
            self.unfused_reasons[name] = reason
            return None
        self._views[name] = view = self.make_view(conv, bn, relu)
        return view

    # -- the whole block as one op (block-fused training, fastres.ops.block) --------------------

    def block_layout(self) -> BlockLayout:
        """The block's modules in the block op's roles (:class:`BlockLayout`; a 4-tuple
        ``(convs, norms, projection, preact)`` is accepted too), or raise
        ``ValueError(reason)`` if the block's shape is not one."""
        raise ValueError("no block-op layout")  # e.g. a whole fastres ResNet (not a block)

    def block_reason(self) -> str | None:
        """None if the block can run as one block op now (see :mod:`fastres.ops.block`), else
        why it runs layer by layer (its pairs still fused as :class:`ConvBNReLU` where they can)."""
        return self._block_plan()[1]

    def _block_plan(self) -> tuple[BlockLayout | None, str | None]:
        """``(block_layout(), None)`` if the block can run as one block op now, else
        ``(None, reason)``."""
        if not self.fused:
            return None, "the block is not fused"
        if self.unfused_reasons:
            return None, "a conv + BN pair is not fused: " + "; ".join(
                f"{k}: {v}" for k, v in self.unfused_reasons.items())
        try:
            layout = BlockLayout.of(self.block_layout())
        except ValueError as e:
            return None, str(e)
        reason = layout_reason(layout, self.norm_reason)
        return (None, reason) if reason is not None else (layout, None)

    def norm_reason(self, bn: nn.Module) -> str | None:
        """None if ``bn`` normalises exactly as the block op's BatchNorm (+ the ReLU the
        structure puts after it), else why not."""
        return block_norm_reason(bn)

    def _block_call(self, x: Tensor) -> Tensor | None:
        """The block through the block op, or None if it runs layer by layer (also inside
        :func:`layer_by_layer`)."""
        if not self.fused or forced_layer_by_layer():
            return None
        for name, (conv, bn, _) in self.fusion_pairs().items():  # children replaced since?
            self._current_view(name, conv, bn)
        if self._gate() is not None and torch.compiler.is_compiling():
            return None  # a gate is Python the block op's custom op cannot carry: per layer
        layout, _ = self._block_plan()
        if not isinstance(x, Tensor) or layout is None:
            return None
        return run_block_op(x, layout)

    def _projection(self) -> tuple[nn.Module | None, nn.Module | None]:
        """``(projection conv, shortcut pool)`` of a post-activation ``downsample``: exactly
        conv + BN, or pool + conv + BN (ResNet-D; an ``nn.Identity`` pool is none); ``(None,
        None)`` for an identity shortcut; ValueError for other shortcut modules."""
        ds = getattr(self, "downsample", None)
        if ds is None:
            return None, None
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            return ds[0], None
        if isinstance(ds, nn.Sequential) and len(ds) == 3:
            return ds[1], _no_op(ds[0])
        raise ValueError("the shortcut is not a plain [pool +] conv + BN projection")

    def _drop_path(self) -> nn.Module | None:
        """The block's ``drop_path`` child (timm's name), None if it has none or an Identity."""
        return _no_op(getattr(self, "drop_path", None))

    def _gate(self) -> nn.Module | None:
        """The block's ``se`` child (timm's attention module, adopted from a timm block), None
        if it has none."""
        return _no_op(getattr(self, "se", None))

    def _plain_join(self) -> bool:
        """The last pair joins as ``relu(bn(conv(h)) + identity)``: no gate, no drop path."""
        return self._gate() is None and self._drop_path() is None

    def _join(self, name: str, conv: nn.Module, bn: nn.Module, h: Tensor,
              identity: Tensor) -> Tensor:
        """The last pair and the join, layer by layer: ``relu(bn(conv(h)) + identity)`` in one
        fused call, or, as timm orders them, ``relu(drop_path(se(bn(conv(h)))) + identity)``."""
        if self._plain_join():
            return self._run(name, conv, bn, h, residual=identity)
        branch = self._run(name, conv, bn, h, relu=False)
        for m in (self._gate(), self._drop_path()):
            if m is not None:
                branch = m(branch)
        return F.relu(branch + identity)

    def _shortcut(self, x: Tensor) -> Tensor:
        """Projection ``downsample`` (leading modules such as an avg-pool, then conv + BN)."""
        ds = self.downsample
        if not isinstance(ds, nn.Sequential) or len(ds) < 2:
            return ds(x)
        for m in list(ds)[:-2]:
            x = m(x)
        return self._run("downsample", ds[-2], ds[-1], x, relu=False)

    def _downsample_pair(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        ds = getattr(self, "downsample", None)
        if isinstance(ds, nn.Sequential) and len(ds) >= 2:
            return {"downsample": (ds[-2], ds[-1], False)}
        return {}

    def extra_repr(self) -> str:
        fused = ", ".join(self._views) or "none"
        return f"fused=[{fused}]"


class BasicBlock(FusedBlock):
    """torchvision's ``BasicBlock``: conv3×3-BN-ReLU, conv3×3-BN, + shortcut, ReLU.

    Runs as two fused calls: ``conv1+bn1+relu`` and ``conv2+bn2+residual+relu``, the projection
    shortcut (if any) as a third (``downsample.0+downsample.1``, no ReLU).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, previous_dilation: int | None = None,
                 downsample: nn.Module | bool | None = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        out_channels = channels * self.expansion
        first_dilation = dilation if previous_dilation is None else previous_dilation
        self.conv1 = conv3x3(in_channels, channels, stride, dilation=first_dilation)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, out_channels, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _make_downsample(downsample, in_channels, out_channels, stride)
        self.stride = stride
        self.set_fused(True)

    @classmethod
    def from_modules(cls, conv1: nn.Module, bn1: nn.Module, conv2: nn.Module, bn2: nn.Module,
                     downsample: nn.Module | None = None, *,
                     drop_path: nn.Module | None = None) -> BasicBlock:
        """A block over existing modules (shared, not copied), e.g. a torchvision or timm
        block's; ``drop_path`` (timm's child of that name) scales the branch before the add."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.downsample = downsample
        if drop_path is not None:  # else an adopted child of that name (fuse) stays visible
            self.drop_path = drop_path
        self.stride = conv1.stride[0] if isinstance(conv1, nn.Conv2d) else 1
        self.training = conv1.training
        return self.set_fused(True)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {"conv1": (self.conv1, self.bn1, True),
                "conv2": (self.conv2, self.bn2, self._plain_join()),
                **self._downsample_pair()}

    def block_layout(self) -> BlockLayout:
        proj, pool = self._projection()
        norms = [self.bn1, self.bn2] + ([self.downsample[-1]] if proj is not None else [])
        return BlockLayout([self.conv1, self.conv2], norms, proj, False, pool, self._drop_path(),
                           self._gate())

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_call(x)
        if out is not None:
            return out
        identity = x if self.downsample is None else self._shortcut(x)
        out = self._run("conv1", self.conv1, self.bn1, x)
        return self._join("conv2", self.conv2, self.bn2, out, identity)


class Bottleneck(FusedBlock):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3×3), with ``groups`` and
    ``base_width`` for ResNeXt (``groups=32, base_width=4``) and Wide ResNet (``base_width=128``).

    Three fused calls; the last one adds the shortcut before its ReLU.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, previous_dilation: int | None = None,
                 downsample: nn.Module | bool | None = None) -> None:
        super().__init__()
        width = int(channels * (base_width / 64.0)) * groups
        if width == 0:
            raise ValueError(f"Bottleneck width is 0 (channels={channels}, base_width="
                             f"{base_width}, groups={groups}); widen the block")
        out_channels = channels * self.expansion
        first_dilation = dilation if previous_dilation is None else previous_dilation
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, first_dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _make_downsample(downsample, in_channels, out_channels, stride)
        self.stride = stride
        self.set_fused(True)

    @classmethod
    def from_modules(cls, conv1: nn.Module, bn1: nn.Module, conv2: nn.Module, bn2: nn.Module,
                     conv3: nn.Module, bn3: nn.Module,
                     downsample: nn.Module | None = None, *,
                     drop_path: nn.Module | None = None) -> Bottleneck:
        """A block over existing modules (shared, not copied), e.g. a torchvision or timm
        block's (timm ``resnet50d``: ``downsample`` = avg-pool + conv + BN, ``drop_path``)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.conv3, self.bn3 = conv3, bn3
        self.downsample = downsample
        if drop_path is not None:  # else an adopted child of that name (fuse) stays visible
            self.drop_path = drop_path
        self.stride = conv2.stride[0] if isinstance(conv2, nn.Conv2d) else 1
        self.training = conv1.training
        return self.set_fused(True)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {"conv1": (self.conv1, self.bn1, True), "conv2": (self.conv2, self.bn2, True),
                "conv3": (self.conv3, self.bn3, self._plain_join()),
                **self._downsample_pair()}

    def block_layout(self) -> BlockLayout:
        proj, pool = self._projection()
        norms = [self.bn1, self.bn2, self.bn3]
        norms += [self.downsample[-1]] if proj is not None else []
        return BlockLayout([self.conv1, self.conv2, self.conv3], norms, proj, False, pool,
                           self._drop_path(), self._gate())

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_call(x)
        if out is not None:
            return out
        identity = x if self.downsample is None else self._shortcut(x)
        out = self._run("conv1", self.conv1, self.bn1, x)
        out = self._run("conv2", self.conv2, self.bn2, out)
        return self._join("conv3", self.conv3, self.bn3, out, identity)


def _make_downsample(downsample: nn.Module | bool | None, in_channels: int, out_channels: int,
                     stride: int) -> nn.Module | None:
    """``None`` → a projection exactly when torchvision would make one; a module → used as is."""
    if isinstance(downsample, nn.Module):
        return downsample
    if downsample is None:
        downsample = stride != 1 or in_channels != out_channels
    return projection(in_channels, out_channels, stride) if downsample else None


# ------------------------------------------------------------------------------------------------
# Pre-activation blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks")
# ------------------------------------------------------------------------------------------------
#
# x ─ bn1 ─ relu ─┬─ conv1 ─ bn2 ─ relu ─ conv2 (─ bn3 ─ relu ─ conv3) ─ (+) ─ out
#                 └─ [downsample: 1×1 conv, when the shape changes] ─────┘ (else x itself)
#
# What is fused here: every conv followed by the next BN + ReLU (``conv1+bn2+relu``,
# ``conv2+bn3+relu``), one ConvBNReLU call each. What is not, and is left for the prologue fusion
# of DESIGN.md §3 ("Training fusion target"): the block's entry ``bn1+relu`` on its input, and
# the last conv with the residual add, because there the BN follows the add of the *previous*
# block (relu(bn(conv(h) + x)) is not conv_bn_relu's relu(bn(conv(h)) + x)). That fusion applies
# relu(scale·y + shift) while the next conv loads its input, from statistics gathered in the
# previous conv's epilogue.


class _PreActBlock(FusedBlock):
    expansion = 1

    def block_layout(self):
        n = 3 if hasattr(self, "conv3") else 2
        convs = [getattr(self, f"conv{i}") for i in range(1, n + 1)]
        norms = ([self.bn1] if self.bn1 is not None else []) + [
            getattr(self, f"bn{i}") for i in range(2, n + 1)]
        if self.downsample is not None and type(self.downsample) is not nn.Conv2d:
            raise ValueError("the shortcut is not a plain 1x1 nn.Conv2d")
        dropout = getattr(self, "dropout", None)
        if dropout is not None and dropout.training and dropout.p > 0:
            raise ValueError("dropout between the convolutions is active")
        return BlockLayout(convs, norms, self.downsample, True)

    def _preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(activated input, shortcut)``."""
        # bn1 is None when the input is already activated (the stem's BN + ReLU did it)
        a = x if self.bn1 is None else F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(a)
        return a, shortcut


class PreActBasicBlock(_PreActBlock):
    """Pre-activation basic block; ``dropout`` between the convs gives the Wide ResNet block.

    ``preact=False`` drops the entry BN + ReLU, for the first block after a stem that ends in
    BN + ReLU (as fb.resnet.torch's pre-activation ResNets and Wide ResNets do); the shortcut
    then takes the already activated input.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, previous_dilation: int | None = None,
                 preact: bool = True, dropout: float = 0.0,
                 downsample: nn.Module | bool | None = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock only supports groups=1 and base_width=64")
        out_channels = channels * self.expansion
        first_dilation = dilation if previous_dilation is None else previous_dilation
        self.bn1 = nn.BatchNorm2d(in_channels) if preact else None
        self.conv1 = conv3x3(in_channels, channels, stride, dilation=first_dilation)
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = conv3x3(channels, out_channels, dilation=dilation)
        self.downsample = _make_preact_downsample(downsample, in_channels, out_channels, stride)
        self.set_fused(True)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {"conv1": (self.conv1, self.bn2, True)}

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_call(x)
        if out is not None:
            return out
        a, shortcut = self._preact(x)
        h = self._run("conv1", self.conv1, self.bn2, a)
        if self.dropout is not None:
            h = self.dropout(h)
        return self.conv2(h) + shortcut


class PreActBottleneck(_PreActBlock):
    """Pre-activation bottleneck (1×1, 3×3 with stride/groups, 1×1), ``groups``/``base_width``
    as in :class:`Bottleneck`. ``preact=False`` as in :class:`PreActBasicBlock`."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, previous_dilation: int | None = None,
                 preact: bool = True, dropout: float = 0.0,
                 downsample: nn.Module | bool | None = None) -> None:
        super().__init__()
        if dropout:
            raise ValueError("PreActBottleneck has no dropout option")
        width = int(channels * (base_width / 64.0)) * groups
        if width == 0:
            raise ValueError(f"PreActBottleneck width is 0 (channels={channels}, base_width="
                             f"{base_width}, groups={groups}); widen the block")
        out_channels = channels * self.expansion
        first_dilation = dilation if previous_dilation is None else previous_dilation
        self.bn1 = nn.BatchNorm2d(in_channels) if preact else None
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, first_dilation)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.downsample = _make_preact_downsample(downsample, in_channels, out_channels, stride)
        self.set_fused(True)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {"conv1": (self.conv1, self.bn2, True), "conv2": (self.conv2, self.bn3, True)}

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_call(x)
        if out is not None:
            return out
        a, shortcut = self._preact(x)
        h = self._run("conv1", self.conv1, self.bn2, a)
        h = self._run("conv2", self.conv2, self.bn3, h)
        return self.conv3(h) + shortcut


def _make_preact_downsample(downsample: nn.Module | bool | None, in_channels: int,
                            out_channels: int, stride: int) -> nn.Module | None:
    """Pre-activation projection: a bare 1×1 conv on the activated input (no BN after it)."""
    if isinstance(downsample, nn.Module):
        return downsample
    if downsample is None:
        downsample = stride != 1 or in_channels != out_channels
    return conv1x1(in_channels, out_channels, stride) if downsample else None


__all__ = [
    "BasicBlock",
    "BlockLayout",
    "Bottleneck",
    "FusedBlock",
    "PreActBasicBlock",
    "PreActBottleneck",
    "conv_bn_act",
    "drop_path_scale",
    "forced_layer_by_layer",
    "layer_by_layer",
    "layout_reason",
    "run_block_op",
]
