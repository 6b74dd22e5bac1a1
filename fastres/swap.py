"""``fastres.fuse`` / ``fastres.unfuse``: fuse a model's conv → norm (→ activation) runs in
place, found by structure, and back.

What is fused (module *instances* are replaced, or change class to a subclass of their own type;
no third-party class is patched):

* torchvision / timm ResNet blocks of the textbook shape (``BasicBlock``/``Bottleneck``, timm's
  when SE, anti-aliasing, drop-block/drop-path are no-ops and the activations ReLU) become
  :class:`fastres.nn.BasicBlock`/:class:`fastres.nn.Bottleneck` holding the very same children
  under the same names (one block op in training); timm ``ResNetV2`` pre-activation blocks become
  :class:`FusedPreAct`; the ResNet stem (a deep stem's last conv too) is folded in place
  (:mod:`fastres.nn.stem`);
* a Sequential, or a subclass that keeps Sequential's forward, runs its conv → norm (→ activation)
  children fused (:class:`FusedSequential` or a generated subclass of its own type);
* any other module whose forward torch.fx traces with its children as leaves has its chains read
  from the graph and runs a generated forward (:mod:`fastres.nn.graph`): timm ``ConvNormAct``,
  ByobNet / RegNet / CSP blocks, SE / ECA / drop-path / anti-aliased ResNet blocks, torchvision
  RegNet blocks, detection backbones' ``IntermediateLayerGetter``; one whose graph is a residual
  block the block op takes (RegNetX, ByobNet with ReLU) runs as one block op
  (:mod:`fastres.nn.graph_block`), any other block per layer, and the report says why;
* fastres' own blocks and models: their fused views are rebuilt (e.g. after a BN was replaced).

The fused model returns the memory format eager would (:mod:`fastres.nn.layout`: a forward
pre-hook and hook on the root, removed by :func:`unfuse`).

Parameters and buffers are shared, never copied (with ``inplace=False`` the model is deep-copied
first), so an optimizer built on the model before ``fuse(model, inplace=True)`` keeps working.
Nothing is renamed: ``named_parameters()``, ``named_buffers()``, ``named_modules()`` and
``state_dict()`` give the original's names in the original's order, attribute paths such as
``model.conv1.weight`` or ``model.layer1[0].bn2.running_mean`` reach the same tensors, and no
state_dict hook is involved. Only types change (to subclasses of their own type, except swapped
textbook blocks); :func:`unfuse` gives the original types back.

Every conv followed by a norm that is left unfused is listed with its reason: a
``warnings.warn`` lists them, :func:`fuse_report` returns them (with the blocks that run layer by
layer and why), and ``strict=True`` raises :class:`FuseError` listing them all before anything is
changed. ``nn.SyncBatchNorm`` pairs are fused: in training across processes their statistics are
merged over the process group (:mod:`fastres.nn.sync_conv_bn`).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .nn import layout
from .nn.blocks import BasicBlock, Bottleneck, FusedBlock, drop_path_reason
from .nn.conv_bn_relu import ConvBNReLU, activation_of, fusable_reason
from .nn.graph import (
    GraphFused,
    fuse_traced,
    fused_type,
    guard_inplace,
    has_inner_act,
    is_norm,
    new_fused,
    pair_plan,
    plain_forward_active,
    plan_graph,
    run_chain,
    trace,
    unfuse_traced,
)
from .nn.graph_block import BlockSpec, GraphBlock, block_spec, fuse_block
from .nn.stem import StemConv2d, fold_stem, stem_link, unfold_stem

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


class Run(NamedTuple):
    """A conv → norm (→ activation) run of a FusedSequential, from child ``start`` on."""

    conv: nn.Module
    norm: nn.Module
    act_module: nn.Module | None  # the activation child fused after the norm, if any
    act: str | None
    length: int
    note: str | None = None  # why an activation runs after the op, in PyTorch


class FusedSequential(nn.Sequential):
    """A Sequential (or a subclass that keeps Sequential's forward, as
    :func:`sequential_type` makes them) whose conv → norm (→ activation) children run fused.

    Same children under the same names, so the same keys; the runs are plain data (no
    registered module), checked against the current children at each call and found anew if a
    child was replaced. A run's output going to a child that is not fused gets the layout eager
    would have there (:mod:`fastres.nn.layout`).
    """

    _fastres_plain: type = nn.Sequential

    def __init__(self, *args: nn.Module) -> None:
        super().__init__(*args)
        self.rebuild()

    def rebuild(self) -> list[tuple[str, str]]:
        """Find the runs again; returns ``(child index, reason)`` for conv→norm left unfused."""
        mods = list(self._modules.values())
        runs: dict[int, Run] = {}
        reasons = []
        i = 0
        while i < len(mods) - 1:
            conv, norm = mods[i], mods[i + 1]
            if isinstance(conv, nn.Conv2d) and is_norm(norm):
                act_module, act = None, None
                if i + 2 < len(mods) and not has_inner_act(norm):
                    name, why = activation_of(mods[i + 2])
                    if name is not None and why is None:
                        act_module, act = mods[i + 2], name
                plan = pair_plan(conv, norm, act)
                if isinstance(plan, str):
                    reasons.append((str(i), plan))
                else:
                    runs[i] = Run(conv, norm, act_module, act, 3 if act else 2, plan.note)
                    i += runs[i].length
                    continue
            i += 1
        self._runs = runs
        return reasons

    @staticmethod
    def _is_current(mods: list[nn.Module], i: int, run: Run) -> bool:
        return (i + run.length <= len(mods) and run.conv is mods[i] and run.norm is mods[i + 1]
                and (run.length == 2 or run.act_module is mods[i + 2]))

    def forward(self, x: Tensor) -> Tensor:
        if plain_forward_active():
            return nn.Sequential.forward(self, x)
        mods = list(self._modules.values())
        if not all(self._is_current(mods, i, run) for i, run in self._runs.items()):
            self.rebuild()  # a child was replaced (e.g. convert_sync_batchnorm): runs anew
        entry, wanted, from_run = x, None, False
        i = 0
        while i < len(mods):
            run = self._runs.get(i)
            if run is not None:
                x = run_chain(run.conv, run.norm, x, None, run.act)
                i += run.length
                from_run = True
                continue
            if from_run and not isinstance(mods[i], _FUSED_MODULES):
                wanted = wanted or layout.wanted_format(entry)
                x = layout.to_format(x, wanted)  # the next child sees eager's layout
                x = guard_inplace(x, mods[i])
            x = mods[i](x)
            from_run = False
            i += 1
        return layout.match_input(x, entry)

    def __reduce_ex__(self, protocol: int):
        # a generated subclass is not importable by name: rebuild it from the plain class
        return new_fused, (FusedSequential, self._fastres_plain), self.__dict__


def sequential_type(plain: type) -> type:
    """The fused subclass of a Sequential type (``FusedSequential`` for ``nn.Sequential``)."""
    return fused_type(FusedSequential, plain)


def is_sequential_like(m: nn.Module) -> bool:
    """A Sequential whose forward is Sequential's: its children in order are its data flow."""
    return isinstance(m, nn.Sequential) and type(m).forward in (nn.Sequential.forward,
                                                                FusedSequential.forward)


_FUSED_MODULES = (FusedBlock, GraphFused, FusedSequential, StemConv2d)


def _fold_sequential(m: nn.Sequential) -> None:
    # the same object becomes a subclass of its own type: fuse(inplace=True) on a root
    # Sequential returns the model itself, and nothing holding it sees a different object
    m.__class__ = sequential_type(getattr(type(m), "_fastres_plain", type(m)))
    m.rebuild()


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
        return layout.match_input(self.drop_path(h) + shortcut, x)


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
    if isinstance(fused, FusedBlock):  # adopted children (a gate, a drop path) change the join
        fused.set_fused(fused.fused)
    return fused


_NOT_BLOCK_OP = "runs layer by layer: "


class _Planner:
    """What :func:`fuse` will do (``actions``), what it leaves unfused (``reasons``: module
    path, why) and which blocks it fuses per layer only (``notes``); nothing is changed until
    the actions run."""

    def __init__(self) -> None:
        self.classes = _optional_classes()
        self.actions: list[Action] = []
        self.reasons: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []

    def is_(self, m: nn.Module, *roles: str) -> bool:
        return any(_is(m, self.classes, role) for role in roles)

    def module(self, parent: nn.Module, name: str, m: nn.Module, path: str) -> bool:
        """Plan ``m`` (child ``name`` of ``parent``). True: do not recurse into it."""

        def replace(new_factory: Callable[[], nn.Module]) -> bool:
            def action() -> None:
                new = new_factory()
                new.training = m.training  # the flag only: the shared children keep theirs
                setattr(parent, name, new)

            self.actions.append(action)
            return True

        if self.is_(m, "tv_basic", "timm_basic", "tv_bottleneck", "timm_bottleneck"):
            basic = self.is_(m, "tv_basic", "timm_basic")
            n = 2 if basic else 3
            why = _block_reasons(m, [(f"conv{i}", f"bn{i}") for i in range(1, n + 1)],
                                 _textbook_extras(m, n))
            if not why:
                if basic:
                    return replace(lambda: _take_place_of(BasicBlock.from_modules(
                        m.conv1, m.bn1, m.conv2, m.bn2, m.downsample), m))
                return replace(lambda: _take_place_of(Bottleneck.from_modules(
                    m.conv1, m.bn1, m.conv2, m.bn2, m.conv3, m.bn3, m.downsample), m))
            return self.per_layer(m, path, why)
        if self.is_(m, "timm_preact"):
            n = 3 if hasattr(m, "conv3") else 2
            why = [f"conv{i}+norm{i + 1}: {r}" for i in range(1, n)
                   if (r := _bn_act_reason(getattr(m, f"conv{i}"), getattr(m, f"norm{i + 1}")))]
            if r := _noop_reason(m.drop_path, "drop_path"):
                why.append(r)
            if not why:
                return replace(lambda: _take_place_of(FusedPreAct(m), m))
            return self.per_layer(m, path, why)
        if self.is_(m, "timm_v2_other"):
            return self.per_layer(m, path, ["timm resnetv2's post-activation Bottleneck has no "
                                            "fastres block"])
        if isinstance(m, FusedPreAct):  # swapped before
            self.actions.append(lambda: m.set_fused(True))
            return True
        if isinstance(m, FusedBlock):
            self.actions.append(lambda: m.set_fused(True))
            for pair, r in m.fusion_reasons().items():
                self.reasons.append((path, f"{pair}: {r}"))
            # a fastres ResNet: recurse into its stages; a block: done
            return not isinstance(m, _models_resnet())
        if is_sequential_like(m):
            probe = FusedSequential.__new__(FusedSequential)
            nn.Module.__init__(probe)
            probe._modules = OrderedDict(m._modules)
            why = probe.rebuild()
            self.reasons.extend((path, f"[{i}]: {r}") for i, r in why)
            if probe._runs:
                # children first (nested Sequentials), then this one over the possibly new
                # children
                self.children(m, path)
                self.actions.append(lambda: _fold_sequential(m))
                return True
            return False
        if self.is_(m, "tv_resnet", "timm_resnet"):
            return False  # the stem is folded (_plan_stem), the blocks swapped
        return self.traced(m, path)

    def per_layer(self, m: nn.Module, path: str, why: list[str]) -> bool:
        """A residual block the block op cannot take: its runs fused by structure."""
        self.notes.append((path, _NOT_BLOCK_OP + "; ".join(why)))
        return self.traced(m, path, as_block=False)

    def traced(self, m: nn.Module, path: str, as_block: bool = True) -> bool:
        """Read ``m``'s chains from its traced forward, and (``as_block``) whether it is a
        residual block the block op takes (:mod:`fastres.nn.graph_block`; else the report says
        why not); its children are planned on their own (False: recurse)."""
        if not _may_hold_chains(m):
            return False
        graph = trace(m)
        if isinstance(graph, str):
            direct = list(m.children())
            if any(isinstance(c, nn.Conv2d) for c in direct) and any(map(is_norm, direct)):
                self.reasons.append((path, f"its conv → norm children are not fused: {graph}"))
            return False
        found = plan_graph(m, graph, rewrite=False)
        prefix = f"{path}." if path else ""
        self.reasons.extend((prefix + conv, why) for conv, why in found.reasons)
        spec = block_spec(m) if as_block else None
        if isinstance(spec, str):
            self.notes.append((path, _NOT_BLOCK_OP + spec))
        if isinstance(spec, BlockSpec):
            self.actions.append(lambda: fuse_block(m, spec))
        elif found.chains:
            self.actions.append(lambda: fuse_traced(m))
        return False

    def stem(self, model: nn.Module, path: str) -> None:
        act_name = "relu" if self.is_(model, "tv_resnet") else "act1"
        conv, bn, act = (getattr(model, n, None) for n in ("conv1", "bn1", act_name))
        conv_name = "conv1"
        if is_sequential_like(conv) and len(conv) and isinstance(conv[-1], nn.Conv2d):
            # a deep stem (resnet*d): its last conv feeds bn1 across the Sequential's boundary
            conv_name = f"conv1.{list(conv._modules)[-1]}"
            conv = conv[-1]
        if stem_link(model, conv_name) is not None:  # fused before
            return
        act_kind, r = activation_of(_plain_stem_view(act))
        if r is None:  # the folded activation passes its input through: the op must apply it
            r = fusable_reason(_plain_stem_view(conv), _plain_stem_view(bn), act_kind)
        if r is not None:
            self.reasons.append((f"{path}.{conv_name}" if path else conv_name, f"stem: {r}"))
            return
        self.actions.append(lambda: fold_stem(model, conv_name, "bn1", act_name))

    def children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if self.is_(child, "tv_resnet", "timm_resnet"):
                self.stem(child, child_path)
            if not self.module(module, name, child, child_path):
                self.children(child, child_path)


def _textbook_extras(m: nn.Module, n: int) -> list[str]:
    """Why a torchvision / timm ResNet block cannot become a fastres block (its activations,
    anti-aliasing, drop-block), beyond its conv + BN pairs. A channel gate (timm's ``se``) and
    drop path are taken over with the block: it runs them in timm's order (the block op serves
    both; a gate that is not of the form x * f(mean(x)) trains layer by layer and fuse_report
    says why)."""
    acts = ("relu", *(f"act{i}" for i in range(1, n + 1)))
    extras = [_relu_reason(getattr(m, a, None), a) for a in acts]
    extras.append(_noop_reason(getattr(m, "drop_block", None), "drop_block"))
    extras.append(_noop_reason(getattr(m, "aa", None), "aa (anti-aliasing)"))
    drop = getattr(m, "drop_path", None)
    if drop is not None and type(drop) is not nn.Identity:
        extras.append(drop_path_reason(drop))
    return [r for r in extras if r is not None]


def _plain_stem_view(m: nn.Module | None) -> nn.Module | None:
    from .nn.stem import _plain_view

    return _plain_view(m)


def _may_hold_chains(m: nn.Module) -> bool:
    """Worth tracing: a module with a forward of its own holding a conv somewhere below."""
    if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._NormBase)) or not m._modules:
        return False
    if type(m).forward is nn.Module.forward:  # ModuleList / ModuleDict
        return False
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def _models_resnet() -> type:
    from .models.resnet import ResNet

    return ResNet


def _format(reasons: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {path or '<model>'}: {why}" for path, why in reasons)


NOTES_ATTR = "_fastres_fuse_notes"


def fuse(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> nn.Module:
    """Fuse ``model``'s conv → norm (→ activation) runs, found by structure; what cannot be
    fused exactly stays as it was.

    Args:
        model: any module tree: torchvision / timm ResNet-family models, RegNet, ByobNet, CSP,
            SE/ECA variants, detection and segmentation backbones, fastres models, Sequentials.
        inplace: modify ``model`` itself (parameters stay the same objects, so existing
            optimizers keep working). Otherwise a deep copy is fused and returned.
        strict: raise :class:`FuseError` listing every reason if a conv followed by a norm is
            left unfused (nothing is changed then).

    Returns the fused model. The reasons are in :func:`fuse_report` and, if any, a warning.
    """
    if not inplace:
        model = copy.deepcopy(model)
    planner = _Planner()
    if planner.is_(model, "tv_resnet", "timm_resnet"):
        planner.stem(model, "")
    holder = nn.Module()  # lets the root itself be planned (e.g. a root Sequential / block)
    holder.root = model
    if not planner.module(holder, "root", model, ""):
        planner.children(model, "")
    reasons = planner.reasons
    if strict and reasons:
        raise FuseError(f"fastres.fuse(strict=True): cannot fuse exactly:\n{_format(reasons)}")
    for action in planner.actions:
        action()
    model = holder.root
    model.__dict__[REPORT_ATTR] = list(reasons)
    model.__dict__[NOTES_ATTR] = list(planner.notes)
    layout.add_root_hooks(model)
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
             if ((isinstance(m, FusedBlock) and m.fused and hasattr(m, "block_layout"))
                 or isinstance(m, GraphBlock))
             and (why := m.block_reason()) is not None
             and not why.startswith(_NO_LAYOUT)]
    return [*model.__dict__.get(REPORT_ATTR, []), *model.__dict__.get(NOTES_ATTR, []), *notes]


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
            m.__class__ = m._fastres_plain
            del m.__dict__["_runs"]
        unfuse_traced(m)
        if isinstance(m, FusedBlock):
            m.set_fused(False)
        return m

    model = restore(model)
    model.__dict__.pop(REPORT_ATTR, None)
    model.__dict__.pop(NOTES_ATTR, None)
    layout.remove_root_hooks(model)
    return model


__all__ = ["FuseError", "FusedPreAct", "FusedSequential", "fuse", "fuse_report", "unfuse"]
