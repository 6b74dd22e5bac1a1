"""Residual blocks found by structure train as one block op.

A traced module (:mod:`fastres.nn.graph`) whose data flow *is* a post-activation residual block
runs as one :func:`fastres.ops.residual_block` call, in training and eval, exactly as
:class:`fastres.nn.blocks.FusedBlock` runs the textbook blocks (the same checks and the same call:
:func:`fastres.nn.blocks.layout_reason`, :func:`fastres.nn.blocks.run_block_op`). The shape read
from the graph, with the block's children inlined down to convs, norms and childless modules:

    x ─┬─ conv_1 → bn_1 → ReLU → … → conv_L → bn_L (→ gate) (→ drop path) ─ (+) ─ ReLU ─ out
       └─ x itself, or [avg-pool →] conv_s → bn_s ─────────────────────────────┘

with ``nn.Identity`` (and probability-0 dropout) calls passing through, ReLU as ``nn.ReLU`` or
``F.relu`` / ``torch.relu`` or inside timm's ``BatchNormAct2d``, and nothing else computed:
torchvision's RegNetX ``ResBottleneckBlock`` (``proj``, ``f.a`` / ``f.b`` / ``f.c``
``Conv2dNormActivation``, ``activation``), timm's RegNet ``Bottleneck`` without SE (``conv1``..
``conv3`` ``ConvNormAct``, ``downsample``, ``drop_path``) and ByobNet's basic / bottleneck blocks
with ReLU (``gernet_*``). One channel gate (a module of the form ``x * f(mean(x))``,
:mod:`fastres.nn.gate`) may scale the last norm's output or the ReLU output a conv reads: the
SE of RegNetY (``f.se`` / ``se`` between conv b and conv c). Each module's exact type and
configuration is checked when the block runs (plain zero-padded bias-free ``nn.Conv2d``,
``nn.BatchNorm2d``, the same children as when fused), else the block runs layer by layer through
its generated per-layer forward.

Any other block (a module holding at least two conv → norm pairs and no smaller such block) gets
the structural limit named in ``fuse_report``: an activation other than ReLU, no residual add, a
split, a gate computed in the block's own forward, and so on.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .blocks import (
    BlockLayout,
    block_norm_reason,
    drop_path_reason,
    forced_layer_by_layer,
    layout_reason,
    run_block_op,
)
from .gate import gate_reason
from .graph import (
    BLOCK_ATTR,
    CODE_ATTR,
    GraphFused,
    _code,
    _is_noop,
    _is_norm_act,
    _module,
    fused_type,
    is_norm,
    new_fused,
    plain_forward_active,
    trace,
)

Tensor = torch.Tensor

_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)
_ACT_FUNCTIONS = {F.relu: "ReLU", torch.relu: "ReLU", F.silu: "SiLU", F.gelu: "GELU",
                  F.leaky_relu: "LeakyReLU", F.hardswish: "Hardswish", F.mish: "Mish",
                  torch.sigmoid: "Sigmoid", F.elu: "ELU", torch.tanh: "Tanh"}


@dataclass(frozen=True)
class BlockSpec:
    """A residual block read from a traced module: module paths relative to it, and what must
    still hold when it runs."""

    convs: tuple[str, ...]  # the main branch conv_1 .. conv_L
    norms: tuple[str, ...]  # bn_1 .. bn_L, then the projection's
    projection: str | None  # the shortcut conv, None: identity shortcut
    pool: str | None  # a module before the projection conv (ResNet-D's avg-pool)
    drop_path: str | None  # stochastic depth on the branch before the add
    inner_acts: tuple[bool, ...]  # per norm: a BatchNormAct2d whose own activation is the ReLU
    calls: tuple[tuple[str, type], ...] = field(default=())  # every module called, its type
    no_ops: tuple[str, ...] = ()  # called modules that must stay no-ops (Identity, p=0 drop)
    gate: str | None = None  # a channel gate module (SE)
    gate_before_conv: int | None = None  # None: the gate before the add; i: on conv i's input


# ------------------------------------------------------------------------------------------------
# Which modules are blocks
# ------------------------------------------------------------------------------------------------


def _is_sequential_like(m: nn.Module) -> bool:
    plain = getattr(type(m), "_fastres_plain", type(m))
    return isinstance(m, nn.Sequential) and plain.forward is nn.Sequential.forward


def _pair_count(m: nn.Module) -> int:
    """Convs that sit beside a norm under one parent (``ConvNormAct``, ``Conv2dNormActivation``,
    a block's ``convN`` / ``bnN``): how many conv → norm pairs ``m`` holds, read from the tree."""
    return sum(isinstance(c, nn.Conv2d) for parent in m.modules()
               if any(map(is_norm, parent.children())) for c in parent.children())


def _has_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward and not _is_sequential_like(m)


def is_block_candidate(module: nn.Module) -> bool:
    """A module the block reader looks at: a forward of its own (not a Sequential's), at least
    two conv → norm pairs, and no smaller such module below it (a stage or a whole model holds
    blocks; it is not one)."""
    if not _has_forward(module) or is_norm(module) or _pair_count(module) < 2:
        return False
    return not any(_has_forward(d) and _pair_count(d) >= 2
                   for name, d in module.named_modules() if name)


# ------------------------------------------------------------------------------------------------
# Reading the graph
# ------------------------------------------------------------------------------------------------


class _InlineChildren(fx.Tracer):
    """Children are traced through down to convs, norms and modules without children."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or is_norm(m) or not m._modules


@dataclass
class _Path:
    """One operand of the residual add read back to the block input (last conv first)."""

    convs: list[fx.Node] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    inner: list[bool] = field(default_factory=list)
    pool: fx.Node | None = None
    drop: fx.Node | None = None
    gate: str | None = None  # the gate module's path
    gate_read: int = 0  # convs read (from the add back) before the gate


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2
            and not node.kwargs) or (node.op == "call_method" and node.target == "add"
                                     and len(node.args) == 2 and not node.kwargs)


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MULS) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def _is_drop_path(m: nn.Module | None) -> bool:
    return m is not None and type(m).__name__ in ("DropPath", "StochasticDepth")


def _is_pool(m: nn.Module | None) -> bool:
    return m is not None and "Pool" in type(m).__name__


class _Reader:
    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.root = root
        self.nodes = list(graph.nodes)
        self.used: set[fx.Node] = set()
        self.no_ops: list[str] = []
        self.x: fx.Node | None = None
        self.gate_nodes: set[fx.Node] = set()  # a gate's own graph: run by the gate's code

    def module(self, node: fx.Node) -> nn.Module | None:
        return _module(self.root, node)

    def back(self, node: Any) -> Any:
        """``node``'s source past no-op module calls (recorded: they must stay no-ops)."""
        while (isinstance(node, fx.Node) and node.op == "call_module"
               and self.module(node) is not None and _is_noop(self.module(node))
               and len(node.args) == 1 and not node.kwargs):
            self.used.add(node)
            self.no_ops.append(node.target)
            node = node.args[0]
        return node

    def describe(self, node: fx.Node) -> str:
        """The module (path and type) a node belongs to, or the function it calls."""
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack:
            path, cls = stack[-1]
            return f"{path} ({getattr(cls, '__name__', cls)})"
        if node.op == "placeholder":
            return "the block input"
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}()"

    def activation(self, node: Any) -> tuple[str, fx.Node] | None:
        """``(name, input)`` if ``node`` applies an activation to one tensor."""
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if node.op == "call_module":
            m = self.module(node)
            kind = type(m)
            if m is None or m._modules or len(node.args) != 1 or node.kwargs:
                return None
            if kind.__module__ == "torch.nn.modules.activation" or kind.__module__.startswith(
                    "timm.layers.activations"):
                return kind.__name__, node.args[0]
            return None
        if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
            return _ACT_FUNCTIONS[node.target], node.args[0]
        if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
            return "ReLU", node.args[0]
        return None

    def gate(self, node: Any, p: _Path) -> fx.Node | str | None:
        """If ``node`` multiplies a tensor t by a factor computed from t inside one module that
        is a channel gate (:func:`fastres.nn.gate.gate_reason`): t's node, the gate recorded on
        ``p`` and its nodes as used; a reason if it is such a product the op cannot take; None
        if it is none."""
        if not (isinstance(node, fx.Node) and _is_mul(node)
                and len(node.all_input_nodes) == 2):
            return None
        a, b = node.all_input_nodes
        t = a if a in _ancestors(b) else b if b in _ancestors(a) else None
        if t is None:
            return None
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if not stack:
            return f"a channel gate computed in the block's own forward ({self.describe(node)}) " \
                   "is not in the block op"
        path = stack[-1][0]
        own = (_ancestors(node) - _ancestors(t)) - {t}
        if any(path not in [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]
               for n in own):
            return f"the channel gate {self.describe(node)} reads more than its module computes"
        if t is self.x:
            return f"a channel gate on the block input ({self.describe(node)}) is not in the " \
                   "block op"
        if p.gate is not None:
            return f"two channel gates on one path ({p.gate} and {path})"
        if (why := gate_reason(self.root.get_submodule(path))) is not None:
            return f"the channel gate {self.describe(node)}: {why}"
        p.gate, p.gate_read = path, len(p.convs)
        self.used |= own | {node}
        self.gate_nodes |= own | {node, t}
        return self.back(t)

    def unexpected(self, node: Any, path: _Path) -> str:
        """Why the block op cannot take what sits at ``node`` on a path to the add."""
        if not isinstance(node, fx.Node):
            return f"a constant ({node!r}) on a path to the residual add"
        if node is self.x:
            return "the block input reaches the residual add without the conv → norm chain"
        if _is_mul(node) and len(node.all_input_nodes) == 2:
            a, b = node.all_input_nodes
            if a in _ancestors(b) or b in _ancestors(a):  # x · f(x) where no gate can be
                return f"a channel gate between a norm and its activation is not in the block " \
                       f"op: {self.describe(node)}"
        # paths are read backwards: the last conv read is the one after ``node``
        where = f"before the conv {path.convs[-1].target}" if path.convs else \
            "before the residual add"
        if self.activation(node) is not None:
            name = self.activation(node)[0]
            return f"{name} activation {where} where the block op has none: {self.describe(node)}"
        if node.op in ("call_method", "call_function") and str(getattr(
                node.target, "__name__", node.target)) in ("chunk", "split", "getitem"):
            return f"a split of the tensor {where} (CSP-style) is not in the block op: " \
                   f"{self.describe(node)}"
        return f"{self.describe(node)} {where} is not in the block op"

    def path(self, node: Any) -> _Path | str:
        """Read one operand of the add back to the block input."""
        p = _Path()
        node = self.back(node)
        if node is self.x:
            return p
        if isinstance(node, fx.Node) and _is_drop_path(self.module(node)) and (
                len(node.args) == 1):
            p.drop = node
            self.used.add(node)
            node = self.back(node.args[0])
        if (gated := self.gate(node, p)) is not None:  # a gate before the add
            if isinstance(gated, str):
                return gated
            node = gated
        act_needed = False  # after a conv: the norm before it must be followed by a ReLU
        while True:
            explicit = None
            if act_needed and (gated := self.gate(node, p)) is not None:  # on a conv's input
                if isinstance(gated, str):
                    return gated
                node = gated
            if act_needed and (act := self.activation(node)) is not None:
                name, source = act
                if name != "ReLU":
                    return f"{name} activation in a block (block op is ReLU only): " \
                           f"{self.describe(node)}"
                explicit = node
                self.used.add(node)
                node = self.back(source)
            norm = self.module(node) if isinstance(node, fx.Node) else None
            if not is_norm(norm):
                return self.unexpected(node, p)
            if len(node.args) != 1 or node.kwargs:
                return f"the norm {self.describe(node)} is called with more than its input"
            inner = None
            if _is_norm_act(norm):
                if not _is_noop(norm.drop):
                    return f"the norm {self.describe(node)} applies an active " \
                           f"{type(norm.drop).__name__}"
                inner = None if type(norm.act) is nn.Identity else type(norm.act).__name__
            if inner is not None and inner != "ReLU":
                return f"{inner} activation in a block (block op is ReLU only): " \
                       f"{self.describe(node)}"
            if act_needed and explicit is None and inner is None:
                return f"no ReLU after {self.describe(node)} between convs"
            if inner is not None and (explicit is not None or not act_needed):
                where = "twice" if explicit is not None else "before the residual add"
                return f"the norm {self.describe(node)} applies a ReLU {where}"
            self.used.add(node)
            p.norms.append(node)
            p.inner.append(inner is not None)
            conv_node = self.back(node.args[0])
            conv = self.module(conv_node) if isinstance(conv_node, fx.Node) else None
            if not isinstance(conv, nn.Conv2d):
                return self.unexpected(conv_node, p)
            if len(conv_node.args) != 1 or conv_node.kwargs:
                return f"the conv {self.describe(conv_node)} is called with more than its input"
            self.used.add(conv_node)
            p.convs.append(conv_node)
            node = self.back(conv_node.args[0])
            if node is self.x:
                return p
            if isinstance(node, fx.Node) and _is_pool(self.module(node)) and len(
                    node.args) == 1 and not node.kwargs and self.back(node.args[0]) is self.x:
                if len(p.convs) > 1:
                    return f"{self.describe(node)} before the first conv is not in the block op"
                self.used.add(node)
                p.pool = node
                return p
            act_needed = True

    def read(self) -> BlockSpec | str:
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            return f"it takes {len(inputs)} inputs (the block op takes one)"
        self.x = inputs[0]
        output = next(n for n in self.nodes if n.op == "output")
        if not any(map(_is_add, self.nodes)):
            if any(n.op == "call_function" and n.target in (torch.cat, torch.concat)
                   for n in self.nodes):
                return "no residual add (parallel branches joined by concatenation)"
            return "no residual add"
        end = self.back(output.args[0])
        if not isinstance(end, fx.Node):
            return "its output is not one tensor"
        act = self.activation(end)
        if act is None:
            if _is_add(end):
                return "no activation after the residual add (the block op ends in ReLU)"
            return f"{self.describe(end)} after the residual add is not in the block op"
        if act[0] != "ReLU":
            return f"{act[0]} activation in a block (block op is ReLU only): " \
                   f"{self.describe(end)}"
        self.used.add(end)
        add = self.back(act[1])
        if not _is_add(add):
            return f"its ReLU follows {self.describe(add)}, not the residual add"
        self.used.add(add)
        paths = [self.path(a) for a in add.args]
        for p in paths:
            if isinstance(p, str):
                return p
        branch, shortcut = sorted(paths, key=lambda p: len(p.convs), reverse=True)
        if len(branch.convs) < 2:
            return f"a residual branch of {len(branch.convs)} conv (the block op takes 2 or more)"
        if len(shortcut.convs) > 1:
            return f"both paths of the residual add have convs ({len(branch.convs)} and " \
                   f"{len(shortcut.convs)})"
        if branch.pool is not None:
            return f"{self.describe(branch.pool)} before the first conv is not in the block op"
        if shortcut.drop is not None:
            return "a drop path on the shortcut"
        if shortcut.pool is not None and not shortcut.convs:
            return "a pool on an identity shortcut"
        if shortcut.gate is not None:
            return f"a channel gate on the shortcut ({shortcut.gate})"
        if (reason := self.leftover()) is not None:
            return reason
        if branch.drop is not None and (why := drop_path_reason(self.module(branch.drop))):
            return why
        name = (lambda n: None if n is None else n.target)
        calls = tuple((n.target, type(self.module(n))) for n in self.nodes
                      if n in self.used and n.op == "call_module")
        return BlockSpec(
            convs=tuple(n.target for n in reversed(branch.convs)),
            norms=tuple(n.target for n in (*reversed(branch.norms), *shortcut.norms)),
            projection=name(shortcut.convs[0] if shortcut.convs else None),
            pool=name(shortcut.pool), drop_path=name(branch.drop),
            inner_acts=(*reversed(branch.inner), *shortcut.inner),
            calls=calls, no_ops=tuple(self.no_ops), gate=branch.gate,
            gate_before_conv=len(branch.convs) - branch.gate_read if branch.gate_read else None)

    def leftover(self) -> str | None:
        """Why not, if the graph computes more than the two paths and the join, or reuses an
        inner result."""
        for node in self.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node not in self.used:
                return f"it also computes {self.describe(node)}, outside the conv → norm chains"
            # a gate's nodes (and the tensor it scales) may feed each other, nothing else
            if len(node.users) != 1 and not (node in self.gate_nodes
                                             and set(node.users) <= self.gate_nodes):
                return f"{self.describe(node)} feeds {len(node.users)} places (the block op " \
                       "keeps its inner results)"
        return None


def read_block(module: nn.Module) -> BlockSpec | str:
    """The residual block ``module``'s forward computes, or why the block op cannot take it."""
    graph = trace(module, _InlineChildren)
    if isinstance(graph, str):
        return f"{graph} (with its children inlined)"
    return _Reader(module, graph).read()


def block_spec(module: nn.Module) -> BlockSpec | str | None:
    """:func:`read_block` for a module :func:`is_block_candidate` takes, else None."""
    return read_block(module) if is_block_candidate(module) else None


# ------------------------------------------------------------------------------------------------
# The fused class
# ------------------------------------------------------------------------------------------------


def _block_norm_reason(bn: nn.Module) -> str | None:
    if _is_norm_act(bn) or block_norm_reason(bn) is None:
        return None
    return f"{type(bn).__name__} is not a plain nn.BatchNorm2d, nn.SyncBatchNorm, " \
           "FrozenBatchNorm2d or timm's BatchNormAct2d"


class GraphBlock(GraphFused):
    """Mixin of the generated classes of traced residual blocks: forward runs the block as one
    block op when it can now (:meth:`block_reason`), else the generated per-layer forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if (len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
                and not plain_forward_active() and not forced_layer_by_layer()):
            layout, _ = self._block_plan()
            if layout is not None:
                out = run_block_op(args[0], layout)
                if out is not None:
                    return out
        return GraphFused.forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol: int):
        return new_fused, (GraphBlock, self._fastres_plain), self.__dict__

    def extra_repr(self) -> str:
        spec = self.__dict__.get(BLOCK_ATTR)
        base = super().extra_repr()
        if spec is None:
            return base
        shortcut = f", shortcut={spec.projection}" if spec.projection else ""
        return f"{base + ', ' if base else ''}block_op=[{', '.join(spec.convs)}{shortcut}]"

    def block_layout(self) -> BlockLayout:
        """The block's modules in the block op's roles, or ``ValueError(reason)`` if its
        children changed since it was fused (a type, a no-op that is not one any more, a norm's
        own activation)."""
        spec: BlockSpec | None = self.__dict__.get(BLOCK_ATTR)
        if spec is None:
            raise ValueError("no block-op layout")
        norm_paths = set(spec.norms)
        for path, kind in spec.calls:
            m = self.get_submodule(path)
            # a norm may be replaced by another the op takes (convert_sync_batchnorm)
            if type(m) is not kind and not (path in norm_paths and is_norm(m)):
                raise ValueError(f"{path} is a {type(m).__name__} now (a {kind.__name__} when "
                                 "the block was fused)")
        for path in spec.no_ops:
            if not _is_noop(self.get_submodule(path)):
                raise ValueError(f"{path} is not a no-op any more")
        get = self.get_submodule
        norms = [get(p) for p in spec.norms]
        for bn, inner in zip(norms, spec.inner_acts):
            # the ReLU a BatchNormAct2d applied must still be there, and no other activation
            if _is_norm_act(bn):
                same = type(bn.act) is (nn.ReLU if inner else nn.Identity) and _is_noop(bn.drop)
            else:
                same = not inner
            if not same:
                raise ValueError(f"the activation or drop of the norm {type(bn).__name__} is "
                                 "not the one the block was fused with")
        return BlockLayout([get(p) for p in spec.convs], norms,
                           None if spec.projection is None else get(spec.projection), False,
                           None if spec.pool is None else get(spec.pool),
                           None if spec.drop_path is None else get(spec.drop_path),
                           None if spec.gate is None else get(spec.gate), spec.gate_before_conv)

    def block_reason(self) -> str | None:
        """None if the block runs as one block op now, else why it runs layer by layer."""
        return self._block_plan()[1]

    def _block_plan(self) -> tuple[BlockLayout | None, str | None]:
        try:
            layout = self.block_layout()
        except (ValueError, AttributeError) as e:
            return None, str(e)
        reason = layout_reason(layout, _block_norm_reason)
        return (None, reason) if reason is not None else (layout, None)


def fuse_block(module: nn.Module, spec: BlockSpec) -> None:
    """Make ``module`` (read by :func:`read_block`) run as one block op where it can."""
    plain = getattr(type(module), "_fastres_plain", type(module))
    module.__class__ = fused_type(GraphBlock, plain)
    module.__dict__[BLOCK_ATTR] = spec
    module.__dict__.pop(CODE_ATTR, None)
    _code(module)


__all__ = ["BlockSpec", "GraphBlock", "block_spec", "fuse_block", "is_block_candidate",
           "read_block"]
