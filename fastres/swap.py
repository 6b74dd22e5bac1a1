"""``fastres.fuse`` / ``fastres.unfuse``: swap fused blocks into existing models, and back.

What is swapped (module *instances* are replaced, or change class to a fastres subclass of their
own type; no third-party class is patched):

* torchvision ``ResNet`` (ResNet, ResNeXt, Wide ResNet): every ``BasicBlock``/``Bottleneck`` becomes
  :class:`fastres.nn.BasicBlock`/:class:`fastres.nn.Bottleneck` holding the very same children
  (conv/BN modules, and the activations it does not call) under the same names, and the stem's
  conv1 + bn1 + relu is folded in place (:mod:`fastres.nn.stem`);
* timm ``ResNet`` (``resnet*``, ``resnext*``, ``wide_resnet*``, ...): the same, when the block's
  extras are no-ops (no SE/attention, no anti-aliasing, drop-block/drop-path off, ReLU);
* timm ``ResNetV2`` pre-activation blocks (``resnetv2_*`` with BatchNorm): :class:`FusedPreAct`;
* any plain ``nn.Sequential`` holding Conv2d → BatchNorm2d (→ ReLU) runs (or Conv2d → timm's
  BatchNormAct2d with ReLU, as in ``resnetv2_*d`` deep stems) become :class:`FusedSequential`
  (the same object, its class changed to that subclass);
* fastres' own blocks and models: their fused views are rebuilt (e.g. after a BN was replaced).

Parameters and buffers are shared, never copied (with ``inplace=False`` the model is deep-copied
first), so an optimizer built on the model before ``fuse(model, inplace=True)`` keeps working.
Nothing is renamed: ``named_parameters()``, ``named_buffers()``, ``named_modules()`` and
``state_dict()`` give the original's names in the original's order, attribute paths such as
``model.conv1.weight`` or ``model.layer1[0].bn2.running_mean`` reach the same tensors, and no
state_dict hook is involved. Only the types of swapped blocks (and of the stem's three modules,
which become subclasses of their own types) change; :func:`unfuse` gives the original types back.

What cannot be fused exactly stays as it was, with the reason: a ``warnings.warn`` lists them,
:func:`fuse_report` returns them, and ``strict=True`` raises :class:`FuseError` listing them all
before anything is changed. ``nn.SyncBatchNorm`` pairs are fused: in training across processes
their statistics are merged over the process group (:mod:`fastres.nn.sync_conv_bn`).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .nn.blocks import BasicBlock, Bottleneck, FusedBlock
from .nn.conv_bn_relu import ConvBNReLU, fusable_reason
from .nn.stem import fold_stem, stem_link, unfold_stem

Tensor = torch.Tensor

REPORT_ATTR = "_fastres_fuse_report"
_NO_LAYOUT = "no block-op layout"


class FuseError(ValueError):
    """``fuse(..., strict=True)`` found modules it cannot fuse exactly (the message lists why)."""


def _optional_classes() -> dict[str, tuple[type, ...]]:
    """The third-party classes fuse knows, by role; empty where the library is not installed."""
    found: dict[str, tuple[type, ...]] = {}
    try:
        from torchvision.models import resnet as tv

        found["tv_resnet"] = (tv.ResNet,)
        found["tv_basic"] = (tv.BasicBlock,)
        found["tv_bottleneck"] = (tv.Bottleneck,)
    except ImportError:
        pass
    try:
        from timm.models import resnet as tr
        from timm.models import resnetv2 as tr2

        found["timm_resnet"] = (tr.ResNet,)
        found["timm_basic"] = (tr.BasicBlock,)
        found["timm_bottleneck"] = (tr.Bottleneck,)
        found["timm_preact"] = (tr2.PreActBasic, tr2.PreActBottleneck)
        found["timm_v2_other"] = (tr2.Bottleneck,)
    except ImportError:
        pass
    return found


def _is(m: nn.Module, classes: dict[str, tuple[type, ...]], role: str) -> bool:
    # exact types: a subclass may override forward, and then the swap would not be exact
    return type(m) in classes.get(role, ())


# ------------------------------------------------------------------------------------------------
# Fused replacement modules
# ------------------------------------------------------------------------------------------------


def _relu_reason(act: nn.Module | None, where: str) -> str | None:
    if act is None or type(act) is nn.ReLU:
        return None
    return f"{where} is {type(act).__name__}, not ReLU (only ReLU is fused)"


def _noop_reason(m: nn.Module | None, where: str) -> str | None:
    """None if ``m`` does nothing (None, Identity, or a drop layer with probability 0)."""
    if m is None or type(m) is nn.Identity:
        return None
    prob = getattr(m, "drop_prob", getattr(m, "p", None))
    if type(m).__name__ in ("DropPath", "DropBlock2d", "Dropout", "Dropout2d") and prob == 0:
        return None
    detail = f" with drop probability {prob}" if prob is not None else ""
    return f"{where} is {type(m).__name__}{detail}, not a no-op"


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` whose Conv2d → BatchNorm2d (→ ReLU) runs execute fused.

    Same children under the same names as the original Sequential, so the same keys; the
    :class:`ConvBNReLU` views are kept unregistered (as in :class:`fastres.nn.FusedBlock`),
    checked against the current children at each call, and found anew if a child was replaced.
    """

    def __init__(self, *args: nn.Module) -> None:
        super().__init__(*args)
        self.rebuild()

    def rebuild(self) -> list[tuple[str, str]]:
        """Find the runs again; returns ``(child index, reason)`` for conv→norm left unfused."""
        mods = list(self._modules.values())
        runs: dict[int, tuple[ConvBNReLU, int]] = {}
        reasons = []
        i = 0
        while i < len(mods) - 1:
            conv, bn = mods[i], mods[i + 1]
            if isinstance(conv, nn.Conv2d) and _looks_like_norm(bn):
                reason = fusable_reason(conv, bn)
                if type(bn).__name__ == "BatchNormAct2d":  # timm: BN with its ReLU inside
                    reason = _bn_act_reason(conv, bn)
                    if reason is None:
                        runs[i] = (_bn_act_view(conv, bn), 2)
                        i += 2
                        continue
                elif reason is None:
                    relu = i + 2 < len(mods) and type(mods[i + 2]) is nn.ReLU
                    runs[i] = (ConvBNReLU.from_modules(conv, bn, relu=relu), 3 if relu else 2)
                    i += runs[i][1]
                    continue
                reasons.append((str(i), reason))
            i += 1
        self._runs = runs
        return reasons

    @staticmethod
    def _is_current(mods: list[nn.Module], i: int, view: ConvBNReLU, n: int) -> bool:
        return (i + n <= len(mods) and view.conv is mods[i] and view.bn is mods[i + 1]
                and (n == 2 or type(mods[i + 2]) is nn.ReLU))

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self._modules.values())
        if not all(self._is_current(mods, i, view, n) for i, (view, n) in self._runs.items()):
            self.rebuild()  # a child was replaced (e.g. convert_sync_batchnorm): runs anew
        i = 0
        while i < len(mods):
            run = self._runs.get(i)
            if run is not None:
                x = run[0](x)
                i += run[1]
                continue
            x = mods[i](x)
            i += 1
        return x


def _fold_sequential(m: nn.Sequential) -> None:
    # the same object becomes a FusedSequential (a subclass): fuse(inplace=True) on a root
    # Sequential returns the model itself, and nothing holding it sees a different object
    m.__class__ = FusedSequential
    m.rebuild()


def _looks_like_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__


class FusedPreAct(FusedBlock):
    """timm ``resnetv2`` ``PreActBasic`` / ``PreActBottleneck`` with each conv → norm+ReLU fused.

    Keeps timm's children and names (``norm1``, ``conv1``, ``norm2``, ..., ``downsample``). timm's
    ``BatchNormAct2d`` is a BatchNorm2d that also applies its ``act``; the pair conv_i →
    norm_{i+1} is fused as conv + BN + ReLU. ``norm1`` on the block input and the last conv with
    the residual add are left as they are (see the pre-activation notes in fastres.nn.blocks).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self._modules = OrderedDict(block._modules)
        self.downsample = getattr(block, "downsample", None)  # None is a plain attribute
        self.n_convs = 3 if hasattr(block, "conv3") else 2
        self.set_fused(True)

    def fusion_pairs(self) -> dict[str, tuple[nn.Module, nn.Module, bool]]:
        return {f"conv{i}": (getattr(self, f"conv{i}"), getattr(self, f"norm{i + 1}"), True)
                for i in range(1, self.n_convs)}

    def pair_reason(self, conv: nn.Module, bn: nn.Module) -> str | None:
        return _bn_act_reason(conv, bn)

    def make_view(self, conv: nn.Module, bn: nn.Module, relu: bool) -> ConvBNReLU:
        return _bn_act_view(conv, bn)  # the norm's own activation is the ReLU

    def block_layout(self):
        n = self.n_convs
        convs = [getattr(self, f"conv{i}") for i in range(1, n + 1)]
        norms = [getattr(self, f"norm{i}") for i in range(1, n + 1)]
        ds = self.downsample
        proj = None
        if ds is not None:
            # timm's DownsampleConv(preact=True): conv, then an Identity norm (DownsampleAvg
            # pools first: not a block-op shortcut)
            if type(ds).__name__ != "DownsampleConv" or type(ds.norm) is not nn.Identity:
                raise ValueError(f"the shortcut {type(ds).__name__} is not a bare conv on the "
                                 "activated input")
            proj = ds.conv
        return convs, norms, proj, True

    def norm_reason(self, bn: nn.Module) -> str | None:
        if type(bn).__name__ != "BatchNormAct2d":
            return f"{type(bn).__name__} is not timm's BatchNormAct2d"
        return _act_reason(bn)

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_call(x)
        if out is not None:
            return out
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        h = x_preact
        for i in range(1, self.n_convs):
            conv, norm = getattr(self, f"conv{i}"), getattr(self, f"norm{i + 1}")
            view = self._views.get(f"conv{i}")
            if view is not None and view.conv is conv and view.bn is norm:
                h = view(h)
            else:  # norm applies its own activation
                h = norm(conv(h))
        h = getattr(self, f"conv{self.n_convs}")(h)
        return self.drop_path(h) + shortcut


def _bn_act_reason(conv: nn.Module, norm: nn.Module) -> str | None:
    """timm BatchNormAct2d: a plain BatchNorm2d apart from its (drop, act) tail."""
    if type(norm).__name__ != "BatchNormAct2d":
        return fusable_reason(conv, norm) or f"{type(norm).__name__} has no ReLU"
    plain = nn.BatchNorm2d(norm.num_features, device="meta")
    return fusable_reason(conv, plain) or _act_reason(norm)


def _act_reason(norm: nn.Module) -> str | None:
    """None if a BatchNormAct2d's tail is exactly a ReLU (its drop a no-op)."""
    return _noop_reason(getattr(norm, "drop", None), "norm's drop") or (
        None if type(getattr(norm, "act", None)) is nn.ReLU
        else f"norm's activation is {type(norm.act).__name__}, not ReLU")


def _bn_act_view(conv: nn.Conv2d, norm: nn.Module) -> ConvBNReLU:
    """A ConvBNReLU over timm's BatchNormAct2d (checked by :func:`_bn_act_reason`).

    ``from_modules`` insists on an exact ``nn.BatchNorm2d``; BatchNormAct2d holds the same
    parameters, buffers and attributes, which is all ConvBNReLU reads, and its ReLU is the fused
    one. So the view is assembled here instead.
    """
    view = ConvBNReLU.__new__(ConvBNReLU)
    nn.Module.__init__(view)
    view.conv, view.bn, view.relu, view.act = conv, norm, True, "relu"
    return view


# ------------------------------------------------------------------------------------------------
# Planning: what to replace, and why not
# ------------------------------------------------------------------------------------------------

Action = Callable[[], None]


def _block_reasons(block: nn.Module, pairs, extras) -> list[str]:
    reasons = [f"{c}+{b}: {r}" for c, b, r in
               ((c, b, fusable_reason(getattr(block, c), getattr(block, b))) for c, b in pairs)
               if r is not None]
    ds = getattr(block, "downsample", None)
    if ds is not None:
        if isinstance(ds, nn.Sequential) and len(ds) >= 2:
            r = fusable_reason(ds[-2], ds[-1])
            if r is not None:
                reasons.append(f"downsample: {r}")
        else:
            reasons.append(f"downsample is {type(ds).__name__}, not Sequential(..., conv, bn)")
    for r in extras:
        if r is not None:
            reasons.append(r)
    return reasons


def _take_place_of(fused: nn.Module, original: nn.Module) -> nn.Module:
    """``fused`` adopts all of ``original``'s children, in order and under the same names (also
    those it does not call, such as the activations), so every module path stays as it was."""
    fused._modules = OrderedDict(original._modules)
    # kept out of the module tree (no keys, no double .to()): unfuse hands it back
    fused.__dict__["_fastres_original"] = original
    return fused


def _plan_module(parent: nn.Module, name: str, m: nn.Module, path: str, classes,
                 actions: list[Action], reasons: list[tuple[str, str]]) -> bool:
    """Plan the swap of ``m`` (child ``name`` of ``parent``). True: do not recurse into it."""

    def replace(new_factory: Callable[[], nn.Module]) -> None:
        def action() -> None:
            new = new_factory()
            new.training = m.training  # the flag only: the shared children keep theirs
            setattr(parent, name, new)

        actions.append(action)

    def refuse(why: list[str]) -> bool:
        reasons.extend((path, r) for r in why)
        return True

    if _is(m, classes, "tv_basic") or _is(m, classes, "timm_basic"):
        extras = [_relu_reason(getattr(m, a, None), a) for a in ("relu", "act1", "act2")]
        extras += [_noop_reason(getattr(m, a, None), a) for a in ("drop_block", "drop_path")]
        extras += [_noop_reason(getattr(m, "aa", None), "aa (anti-aliasing)"),
                   _noop_reason(getattr(m, "se", None), "se (attention)")]
        why = _block_reasons(m, [("conv1", "bn1"), ("conv2", "bn2")], extras)
        if why:
            return refuse(why)
        replace(lambda: _take_place_of(BasicBlock.from_modules(
            m.conv1, m.bn1, m.conv2, m.bn2, m.downsample), m))
        return True
    if _is(m, classes, "tv_bottleneck") or _is(m, classes, "timm_bottleneck"):
        extras = [_relu_reason(getattr(m, a, None), a) for a in ("relu", "act1", "act2", "act3")]
        extras += [_noop_reason(getattr(m, a, None), a) for a in ("drop_block", "drop_path")]
        extras += [_noop_reason(getattr(m, "aa", None), "aa (anti-aliasing)"),
                   _noop_reason(getattr(m, "se", None), "se (attention)")]
        why = _block_reasons(m, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")], extras)
        if why:
            return refuse(why)
        replace(lambda: _take_place_of(Bottleneck.from_modules(
            m.conv1, m.bn1, m.conv2, m.bn2, m.conv3, m.bn3, m.downsample), m))
        return True
    if _is(m, classes, "timm_preact"):
        n = 3 if hasattr(m, "conv3") else 2
        why = [f"conv{i}+norm{i + 1}: {r}" for i in range(1, n)
               if (r := _bn_act_reason(getattr(m, f"conv{i}"), getattr(m, f"norm{i + 1}")))]
        r = _noop_reason(m.drop_path, "drop_path")
        if r:
            why.append(r)
        if why:
            return refuse(why)
        replace(lambda: _take_place_of(FusedPreAct(m), m))
        return True
    if _is(m, classes, "timm_v2_other"):
        return refuse(["timm resnetv2 post-activation Bottleneck is not swapped"])
    if isinstance(m, FusedBlock) and not isinstance(m, FusedPreAct):
        actions.append(lambda: m.set_fused(True))
        for pair, r in m.fusion_reasons().items():
            reasons.append((path, f"{pair}: {r}"))
        # a fastres ResNet: recurse into its stages; a block: done
        return not isinstance(m, _models_resnet())
    if type(m) in (nn.Sequential, FusedSequential):
        probe = FusedSequential.__new__(FusedSequential)
        nn.Module.__init__(probe)
        probe._modules = OrderedDict(m._modules)
        why = probe.rebuild()
        reasons.extend((path, f"[{i}]: {r}") for i, r in why)
        if probe._runs:
            # children first (nested Sequentials), then this one over the possibly new children
            _plan_children(m, path, classes, actions, reasons)
            actions.append(lambda: _fold_sequential(m))
            return True
    return False


def _models_resnet() -> type:
    from .models.resnet import ResNet

    return ResNet


def _plan_stem(model: nn.Module, path: str, classes, actions: list[Action],
               reasons: list[tuple[str, str]]) -> None:
    act_name = "relu" if _is(model, classes, "tv_resnet") else "act1"
    conv, bn, act = (getattr(model, n, None) for n in ("conv1", "bn1", act_name))
    where = f"{path}.stem" if path else "stem"
    if stem_link(model, "conv1") is not None:  # fused before
        return
    if isinstance(conv, nn.Sequential):
        reasons.append((where, "deep stem: its last conv is not fused with bn1 (inner runs are)"))
        return
    r = fusable_reason(conv, bn) or _relu_reason(act, act_name)
    if r is not None:
        reasons.append((where, r))
        return
    actions.append(lambda: fold_stem(model, "conv1", "bn1", act_name))


def _plan_children(module: nn.Module, path: str, classes, actions, reasons) -> None:
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        if _is(child, classes, "tv_resnet") or _is(child, classes, "timm_resnet"):
            _plan_stem(child, child_path, classes, actions, reasons)
        if not _plan_module(module, name, child, child_path, classes, actions, reasons):
            _plan_children(child, child_path, classes, actions, reasons)


def _format(reasons: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {path or '<model>'}: {why}" for path, why in reasons)


def fuse(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> nn.Module:
    """Swap fused blocks into ``model``; what cannot be fused exactly stays as it was.

    Args:
        model: a torchvision or timm ResNet-family model, a fastres model, or any module tree
            with ``nn.Sequential`` Conv2d → BatchNorm2d (→ ReLU) runs.
        inplace: modify ``model`` itself (parameters stay the same objects, so existing
            optimizers keep working). Otherwise a deep copy is fused and returned.
        strict: raise :class:`FuseError` listing every reason if anything is left unfused
            (nothing is changed then).

    Returns the fused model. The reasons are in :func:`fuse_report` and, if any, a warning.
    """
    classes = _optional_classes()
    if not inplace:
        model = copy.deepcopy(model)
    actions: list[Action] = []
    reasons: list[tuple[str, str]] = []
    if _is(model, classes, "tv_resnet") or _is(model, classes, "timm_resnet"):
        _plan_stem(model, "", classes, actions, reasons)
    holder = nn.Module()  # lets the root itself be planned (e.g. a root Sequential / block)
    holder.root = model
    if not _plan_module(holder, "root", model, "", classes, actions, reasons):
        _plan_children(model, "", classes, actions, reasons)
    if strict and reasons:
        raise FuseError(f"fastres.fuse(strict=True): cannot fuse exactly:\n{_format(reasons)}")
    for action in actions:
        action()
    model = holder.root
    model.__dict__[REPORT_ATTR] = list(reasons)
    if reasons:
        warnings.warn(f"fastres.fuse left these unfused:\n{_format(reasons)}", stacklevel=2)
    return model


def fuse_report(model: nn.Module) -> list[tuple[str, str]]:
    """``[(module path, reason), ...]`` of what the last :func:`fuse` left unfused, then, as
    things stand now, each fused block that trains layer by layer rather than as one block op
    (:mod:`fastres.ops.block`) and why (e.g. dropout active, a conv bias, an avg-pool shortcut).
    A backend without block kernels (``cuda``) also runs blocks layer by layer; ``fastres
    info`` says so."""
    notes = [(path or type(m).__name__, f"runs layer by layer: {why}")
             for path, m in model.named_modules()
             if isinstance(m, FusedBlock) and m.fused and hasattr(m, "block_layout")
             and (why := m.block_reason()) is not None
             and not why.startswith(_NO_LAYOUT)]
    return list(model.__dict__.get(REPORT_ATTR, [])) + notes


def unfuse(model: nn.Module) -> nn.Module:
    """Give back plain PyTorch modules (in place; returns ``model``).

    Swapped third-party blocks become the original block objects again (over the current
    children), a fused stem's modules get their plain classes back, and FusedSequentials become
    ``nn.Sequential``. fastres' own blocks and models stay fastres classes but run every
    conv → BN → ReLU through plain PyTorch modules (``set_fused(False)``).
    """

    def restore(m: nn.Module) -> nn.Module:
        for name, child in list(m.named_children()):
            new = restore(child)
            if new is not child:
                setattr(m, name, new)
        unfold_stem(m)
        original = m.__dict__.get("_fastres_original")
        if original is not None:
            original._modules = OrderedDict(m._modules)
            original.training = m.training
            return original
        if isinstance(m, FusedSequential):
            m.__class__ = nn.Sequential
            del m.__dict__["_runs"]
        if isinstance(m, FusedBlock):
            m.set_fused(False)
        return m

    model = restore(model)
    model.__dict__.pop(REPORT_ATTR, None)
    return model


__all__ = ["FuseError", "FusedPreAct", "FusedSequential", "fuse", "fuse_report", "unfuse"]
