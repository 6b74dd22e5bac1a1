"""A model's stem (``conv1`` → ``bn1`` → ``relu``, each called by the model) fused in place.

A torchvision or timm ResNet calls its stem as three separate children, ``x = relu(bn1(conv1(x)))``.
To run them as one fused op without changing any name, parameter, buffer or attribute path, the
three module *instances* change class to a subclass of their own type (``__class__`` assignment;
no class is patched, no parameter is copied):

* ``conv1`` becomes a :class:`StemConv2d` (an ``nn.Conv2d``) that computes ``relu(bn1(conv1(x)))``
  in one fused op;
* ``bn1`` becomes a :class:`FoldedBatchNorm2d` (an ``nn.BatchNorm2d``; a SyncBatchNorm becomes
  a :class:`FoldedSyncBatchNorm`) and the activation a :class:`FoldedReLU` (an ``nn.ReLU``);
  both pass their input through, since ``conv1`` did their work.

So ``model.conv1.weight``, ``model.bn1.running_mean``, ``named_parameters()`` and ``state_dict()``
are exactly the original's, with no key-remapping hooks, and an optimizer built before fusing keeps
its parameters. The three hold one :class:`StemLink`; each forward first checks that the owner
still holds all three. A replaced ``bn1`` (``nn.SyncBatchNorm.convert_sync_batchnorm`` after
fusing) or activation is folded in at the next forward if the three still are conv → BN → ReLU;
otherwise every one of them runs as its plain class.
:func:`unfold_stem` restores the original classes.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv_bn_relu import activation_of, fusable_reason, run_fused
from .layout import match_input

Tensor = torch.Tensor

LINK_ATTR = "_fastres_stem"


class StemLink:
    """The owner and child names of one fused stem (a plain object: it pickles and deep-copies
    along with the model, and is not a child module)."""

    def __init__(self, owner: nn.Module, conv_name: str, bn_name: str, act_name: str) -> None:
        self.owner = owner
        self.names = (conv_name, bn_name, act_name)

    def modules(self) -> tuple[nn.Module | None, ...]:
        return tuple(_child(self.owner, name) for name in self.names)

    def intact(self) -> bool:
        """Whether the owner still holds the three linked modules under their names."""
        return all(getattr(m, LINK_ATTR, None) is self for m in self.modules())


def _child(owner: nn.Module, path: str) -> nn.Module | None:
    """``owner``'s module at a dotted ``path`` (a deep stem's last conv: ``conv1.6``), or None."""
    m: nn.Module | None = owner
    for part in path.split("."):
        m = m._modules.get(part) if m is not None else None
    return m


class StemConv2d(nn.Conv2d):
    """``conv1`` of a fused stem: returns ``act(bn1(conv1(x)))`` computed by one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        link: StemLink = self.__dict__[LINK_ATTR]
        if not link.intact() and not _refold(link):
            return super().forward(x)
        link = self.__dict__[LINK_ATTR]
        return match_input(run_fused(self, link.modules()[1], x, act=link.act or "none"), x)

    def extra_repr(self) -> str:
        _, bn_name, act_name = self.__dict__[LINK_ATTR].names
        return f"{super().extra_repr()}, fused with {bn_name} and {act_name}"


class _Folded(nn.Module):
    """A stem module whose work ``conv1``'s fused op does: passes its input through while the
    stem's link is intact, else runs as its plain class."""

    def forward(self, x: Tensor) -> Tensor:
        if self.__dict__[LINK_ATTR].intact():
            return x
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded into {self.__dict__[LINK_ATTR].names[0]}"


class FoldedBatchNorm2d(_Folded, nn.BatchNorm2d):
    """``bn1`` of a fused stem: its parameters and buffers are used by ``conv1``'s fused op."""


class FoldedSyncBatchNorm(_Folded, nn.SyncBatchNorm):
    """``bn1`` of a fused stem, a SyncBatchNorm (statistics over the process group)."""


class FoldedReLU(_Folded, nn.ReLU):
    """The stem's activation: applied by ``conv1``'s fused op."""


FOLDED: dict[type, type] = {nn.Conv2d: StemConv2d, nn.BatchNorm2d: FoldedBatchNorm2d,
                             nn.SyncBatchNorm: FoldedSyncBatchNorm, nn.ReLU: FoldedReLU}
PLAIN = {folded: plain for plain, folded in FOLDED.items()}


def _folded_type(plain: type) -> type:
    """The folded subclass of a stem module's plain type (made once for the norms and
    activations without a named one above, e.g. FrozenBatchNorm2d or SiLU)."""
    if plain not in FOLDED:
        FOLDED[plain] = folded = type(f"Folded{plain.__name__}", (_Folded, plain), {
            "__doc__": f"A stem's {plain.__name__} whose work conv1's fused op does.",
            "__module__": __name__})
        PLAIN[folded] = plain
    return FOLDED[plain]


def fold_stem(owner: nn.Module, conv_name: str, bn_name: str, act_name: str) -> None:
    """Fuse ``owner``'s stem in place. The children must be a conv, norm and activation that
    :func:`fastres.nn.conv_bn_relu.fusable_reason` accepts (exact types),
    and ``owner.forward`` must call them one after the other (torchvision's and timm's ResNet)."""
    link = StemLink(owner, conv_name, bn_name, act_name)
    link.act = activation_of(_plain_view(link.modules()[2]))[0]
    for m in link.modules():
        m.__class__ = _folded_type(_plain_type(m))  # a module folded before is linked anew
        m.__dict__[LINK_ATTR] = link


def _plain_type(m: nn.Module | None) -> type | None:
    return None if m is None else PLAIN.get(type(m), type(m))


def _plain_view(m: nn.Module | None) -> nn.Module | None:
    """``m`` as its plain class would see it, for the fusability check (no copy: a bare
    instance of the plain type sharing ``m``'s attribute dict)."""
    if m is None:
        return None
    view = _plain_type(m).__new__(_plain_type(m))
    view.__dict__ = m.__dict__
    return view


def _refold(link: StemLink) -> bool:
    """A stem module was replaced since folding (e.g. ``bn1`` by ``convert_sync_batchnorm``):
    fold the owner's current three again if they still form conv → norm → activation. False if
    not."""
    conv, bn, act = (_plain_view(m) for m in link.modules())
    name, why = activation_of(act)
    if act is None or why is not None or fusable_reason(conv, bn, name) is not None:
        return False
    fold_stem(link.owner, *link.names)
    return True


def stem_link(owner: nn.Module, conv_name: str) -> StemLink | None:
    """The link of the stem fused at ``owner.<conv_name>``, if there is one."""
    return getattr(_child(owner, conv_name), LINK_ATTR, None)


def unfold_stem(owner: nn.Module) -> None:
    """Give every folded child of ``owner`` its plain class back (linked or not any more)."""
    for m in owner.children():
        if type(m) in PLAIN and LINK_ATTR in m.__dict__:
            m.__class__ = PLAIN[type(m)]
            del m.__dict__[LINK_ATTR]


__all__ = ["FoldedBatchNorm2d", "FoldedReLU", "FoldedSyncBatchNorm", "StemConv2d", "StemLink",
           "fold_stem", "stem_link", "unfold_stem"]
