"""Fusing by structure: conv → norm (→ + shortcut) (→ activation) runs read from a module's data
flow, not from its class name.

Two readers find the runs:

* a Sequential (or a subclass that keeps Sequential's forward: torchvision's
  ``Conv2dNormActivation``, RegNet's ``SimpleStemIN``, timm's containers) is its children in
  order; ``fastres.swap.FusedSequential`` runs the conv → norm (→ act) children fused;
* any other module whose forward torch.fx can trace with its children as leaf modules (timm's
  ``ConvNormAct`` and ByobNet / RegNet / CSP / SE blocks, torchvision's RegNet blocks, detection
  backbones' ``IntermediateLayerGetter``): :func:`plan_graph` reads the chains from the graph. A
  chain qualifies when the conv's output feeds only the norm and the norm's output only the
  activation or the residual add (exact ``nn.Identity`` calls in between pass through); the add
  then becomes the fused op's ``residual`` input, also when the conv and norm sit in a child
  whose forward is exactly conv → norm (timm's ``ConvNormAct(apply_act=False)``, torchvision's
  ``Conv2dNormActivation(activation_layer=None)``).

A traced module keeps its object, its class as ``isinstance`` sees it, its children, names and
attributes: the instance's class becomes a subclass of its own type (:func:`graph_type`) whose
forward runs code generated from the graph with the chains replaced by :func:`run_chain` calls.
The generated code reaches the children through ``self`` at each call (no copy, a replaced child
is picked up), and :func:`run_chain` checks that the modules it gets can still run fused, else
runs them as PyTorch would. ``fastres.unfuse`` gives the class back.

Norms: ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, FrozenBatchNorm2d, and timm's
``BatchNormAct2d`` (a BatchNorm2d with its drop and activation inside). Activations: what
:func:`fastres.nn.conv_bn_relu.activation_of` names and :func:`fusable_reason` accepts; an
activation the fused op cannot apply yet runs after it in PyTorch (the conv + norm still fused).
"""

from __future__ import annotations

import operator
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import layout
from .conv_bn_relu import activation_of, fusable_reason, run_fused

Tensor = torch.Tensor

PLAN_ATTR = "_fastres_graph"

_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu"}
_ACT_APPLY = {"relu": F.relu, "silu": F.silu}
_ADDS = (operator.add, torch.add)


# ------------------------------------------------------------------------------------------------
# Norms and pairs
# ------------------------------------------------------------------------------------------------


def is_norm(m: nn.Module | None) -> bool:
    """A BatchNorm-like module (what "a conv followed by a norm" counts)."""
    return m is not None and (isinstance(m, nn.modules.batchnorm._NormBase)
                              or "BatchNorm" in type(m).__name__)


def _is_norm_act(norm: nn.Module) -> bool:
    """timm's ``BatchNormAct2d``: a BatchNorm2d that applies its ``drop`` and ``act`` too."""
    return type(norm).__name__ == "BatchNormAct2d" and type(norm).__module__.startswith("timm.")


def _plain_norm(norm: nn.Module) -> nn.Module:
    """``norm`` as a plain ``nn.BatchNorm2d`` sharing its attribute dict (no copy) for a
    BatchNormAct2d, whose BatchNorm part the fused op computes; ``norm`` itself otherwise."""
    if not _is_norm_act(norm):
        return norm
    view = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
    view.__dict__ = norm.__dict__
    return view


def _is_noop(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity or (
        type(m) in (nn.Dropout, nn.Dropout2d) and m.p == 0)


def has_inner_act(norm: nn.Module) -> bool:
    """A BatchNormAct2d that applies an activation or an active drop after its BatchNorm."""
    return _is_norm_act(norm) and not (type(norm.act) is nn.Identity and _is_noop(norm.drop))


@dataclass(frozen=True)
class PairPlan:
    """How a conv → norm pair with an optional activation after it runs fused."""

    norm: nn.Module  # the norm the fused op reads (a BatchNormAct2d's plain view)
    act: str | None  # the activation the fused op applies
    outer: bool  # ``act`` is the activation after the norm (not the norm's own)
    tail: bool  # a BatchNormAct2d whose drop/act run after the op, in PyTorch
    note: str | None  # why an activation runs outside the op, if one does


def pair_plan(conv: nn.Module, norm: nn.Module, outer_act: str | None = None,
              residual: bool = False) -> PairPlan | str:
    """How ``conv`` → ``norm`` (→ ``+ residual``) (→ ``outer_act``) runs fused, or why not.

    A BatchNormAct2d's own activation is fused when the op can apply it (its drop a no-op), else
    it runs after the op; with a residual it must have none (the add comes after the norm).
    ``outer_act`` (after the norm, or after the add) is fused when the op can apply it; when not,
    the plan has ``act=None`` and a note, and that activation runs after the op in PyTorch.
    """
    plain = _plain_norm(norm)
    reason = fusable_reason(conv, plain, None)
    if reason is not None:
        return reason
    if has_inner_act(norm):
        if residual or outer_act is not None:
            return "the norm applies its own activation before what follows it"
        inner, why = activation_of(norm.act)
        if why is None and _is_noop(norm.drop):
            why = fusable_reason(conv, plain, inner)
            if why is None:
                return PairPlan(plain, inner, False, False, None)
        return PairPlan(plain, None, False, True, why or "the norm's drop is active")
    if outer_act is not None:
        why = fusable_reason(conv, plain, outer_act)
        return PairPlan(plain, None if why else outer_act, why is None, False, why)
    return PairPlan(plain, None, False, False, None)


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_checked_lock = threading.Lock()


def _current_plan(conv: nn.Module, norm: nn.Module, outer_act: str | None,
                  residual: bool) -> PairPlan | None:
    """:func:`pair_plan` for the modules a call gets, remembered per conv (the check runs again
    when the conv's partner, the activation or the residual changed)."""
    if torch.compiler.is_compiling():  # traced once per graph: no cache (nor lock) needed
        plan = pair_plan(conv, norm, outer_act, residual)
        return plan if isinstance(plan, PairPlan) else None
    entry = _checked.get(conv)
    key = (outer_act, residual, type(norm))
    if entry is not None and entry[0]() is norm and entry[1] == key:
        return entry[2]
    plan = pair_plan(conv, norm, outer_act, residual)
    plan = plan if isinstance(plan, PairPlan) else None
    with _checked_lock:
        _checked[conv] = (weakref.ref(norm), key, plan)
    return plan


def guard_inplace(y: Tensor, *consumers: Any) -> Tensor:
    """``y`` (a fused op's output, which its backward keeps) copied if a consumer would modify
    it in place while autograd records (an ``inplace=True`` activation or dropout): in PyTorch
    that consumer follows a BatchNorm, whose backward does not need its output."""
    if (torch.is_grad_enabled() and isinstance(y, Tensor) and y.requires_grad
            and any(getattr(c, "inplace", False) for c in consumers)):
        return y.clone()
    return y


def _conv_out_hw(conv: nn.Conv2d, x: Tensor) -> tuple[int, int]:
    return tuple(
        (x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
        // conv.stride[i] + 1 for i in range(2))


def run_chain(conv: nn.Module, norm: nn.Module, x: Tensor, residual: Any = None,
              act: str | None = None) -> Tensor:
    """``act(norm(conv(x)) + residual)`` with the conv, the norm (and what of the rest the op
    can apply) as one fused op; exactly what the modules compute in PyTorch (where the pair
    cannot run fused any more, e.g. a child replaced since: through the modules themselves)."""
    with_residual = residual is not None
    if with_residual and not (isinstance(residual, Tensor) and isinstance(x, Tensor)
                              and x.dim() == 4 and residual.shape == (
                                  x.shape[0], conv.out_channels, *_conv_out_hw(conv, x))):
        with_residual = False  # broadcasting or a shape the op does not take: add after it
    # an activation after a residual added here comes after that add, not in the op
    op_act = act if residual is None or with_residual else None
    plan = _current_plan(conv, norm, op_act, with_residual) if isinstance(x, Tensor) else None
    if plan is None:
        y = norm(conv(x))
        applied = False
    else:
        y = run_fused(conv, plan.norm, x, residual if with_residual else None,
                      act=plan.act or "none")
        y = layout.match_input(layout.eager_strides(y), x)
        if plan.tail:
            y = norm.act(norm.drop(guard_inplace(y, norm.drop, norm.act)))
        applied = plan.outer
    if residual is not None and not with_residual:
        y = y + residual
        applied = False
    if act is not None and not applied:
        y = _ACT_APPLY[act](y)
    return y


# ------------------------------------------------------------------------------------------------
# Reading a traced graph
# ------------------------------------------------------------------------------------------------


_tracing = threading.local()


def plain_forward_active() -> bool:
    """True while fastres traces a module (fused modules then run their plain forward)."""
    return getattr(_tracing, "depth", 0) > 0


class _ChildrenAsLeaves(fx.Tracer):
    """Every module the traced forward calls stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace(module: nn.Module, tracer: type[fx.Tracer] = _ChildrenAsLeaves) -> fx.Graph | str:
    """The module's forward as a graph over its children (``tracer`` decides which modules
    stay one node), or why it cannot be traced. A fused module is traced as its plain class
    (the class is swapped back for the trace; fused modules inside run their plain forward)."""
    cls = type(module)
    plain = getattr(cls, "_fastres_plain", cls)
    _tracing.depth = getattr(_tracing, "depth", 0) + 1
    try:
        module.__class__ = plain
        return tracer().trace(module)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"its forward cannot be traced by torch.fx ({type(e).__name__}: {first[:120]})"
    finally:
        module.__class__ = cls
        _tracing.depth -= 1


@dataclass
class ChainSpec:
    """A fused run found in a graph: module paths relative to the traced module."""

    conv: str
    norm: str
    act: str | None = None  # the activation fused (or applied by run_chain) after the norm
    residual: bool = False
    note: str | None = None  # why an activation runs outside the op


@dataclass
class GraphPlan:
    """What :func:`plan_graph` found in one traced module."""

    chains: list[ChainSpec] = field(default_factory=list)
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (conv path, why unfused)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv, norm) followed-by pairs


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _skip_identities(root: nn.Module, node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The node after ``node`` past exact ``nn.Identity`` calls fed only by it, and those."""
    passed = []
    while (user := _only_user(node)) is not None and type(_module(root, user)) is nn.Identity:
        passed.append(user)
        node = user
    return node, passed


def _act_of(root: nn.Module, node: fx.Node | None, source: fx.Node) -> str | None:
    """The activation name if ``node`` applies one to ``source`` alone (a module or F.relu /
    torch.relu / F.silu, ``inplace`` allowed), else None."""
    if node is None or not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        name, why = activation_of(_module(root, node))
        return name if why is None and len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1 and (
            set(node.kwargs) <= {"inplace"}):
        return _ACT_FUNCTIONS[node.target]
    return None


def _residual_of(node: fx.Node | None, source: fx.Node) -> fx.Node | None:
    """The other operand if ``node`` is ``source + other`` (or ``other + source``)."""
    if node is None or node.op != "call_function" or node.target not in _ADDS or node.kwargs:
        return None
    if len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    return other if isinstance(other, fx.Node) and other is not source else None


def unit_of(module: nn.Module) -> tuple[str, str] | None:
    """``(conv, norm)`` paths if ``module``'s forward is exactly conv → norm on its one input
    (no activation: a norm with an Identity activation counts), e.g. timm's
    ``ConvNormAct(apply_act=False)`` or a Sequential(conv, norm)."""
    if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._NormBase)):
        return None
    graph = trace(module)
    if isinstance(graph, str):
        return None
    nodes = [n for n in graph.nodes
             if not (n.op == "call_module" and type(_module(module, n)) is nn.Identity)]
    ops = [n.op for n in nodes]
    if ops != ["placeholder", "call_module", "call_module", "output"]:
        return None
    conv, norm = (_module(module, n) for n in nodes[1:3])
    if not (isinstance(conv, nn.Conv2d) and is_norm(norm)):
        return None
    if _is_norm_act(norm) and not (type(norm.act) is nn.Identity and _is_noop(norm.drop)):
        return None
    return nodes[1].target, nodes[2].target


def plan_graph(module: nn.Module, graph: fx.Graph, *, rewrite: bool) -> GraphPlan:
    """Find the chains of ``graph`` (traced from ``module``); with ``rewrite``, replace each
    by a :func:`run_chain` call and add the layout conversions (see :mod:`.layout`)."""
    found = GraphPlan()
    fused_nodes: list[fx.Node] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or node.graph is not graph:
            continue
        conv = _module(module, node)
        conv_path = conv_node = None
        norm_node = None
        if isinstance(conv, nn.Conv2d):
            conv_path, conv_node = node.target, node
            user = _only_user(node)
            norm_node = user if is_norm(_module(module, user) if user else None) else None
            if norm_node is None:
                users = [u for u in node.users if is_norm(_module(module, u))]
                if users:
                    found.pairs.append((conv_path, users[0].target))
                    found.reasons.append((conv_path, "its output is also used by "
                                          f"{', '.join(str(u) for u in node.users)}"))
                continue
        else:
            # a child whose forward is exactly conv → norm, followed by a residual add
            end, _ = _skip_identities(module, node)
            if conv is None or _residual_of(_only_user(end), end) is None:
                continue
            unit = unit_of(conv)
            if unit is None:
                continue
            conv_path = f"{node.target}.{unit[0]}"
            conv_node = None
        norm_path = norm_node.target if norm_node is not None else f"{node.target}.{unit[1]}"
        if any(len(n.args) != 1 or n.kwargs for n in (node, norm_node) if n is not None):
            if conv_node is not None:
                found.pairs.append((conv_path, norm_path))
                found.reasons.append((conv_path, "the conv or norm is called with more than "
                                      "one argument"))
            continue
        conv_m, norm_m = module.get_submodule(conv_path), module.get_submodule(norm_path)
        if conv_node is not None:
            found.pairs.append((conv_path, norm_path))
        last = norm_node if norm_node is not None else node
        consumed = [node] + ([norm_node] if norm_node is not None else [])
        end, passed = _skip_identities(module, last)
        after = None if has_inner_act(norm_m) else _only_user(end)
        residual = None
        act = None
        if (add_other := _residual_of(after, end)) is not None:
            plan = pair_plan(conv_m, norm_m, residual=True)
            if isinstance(plan, PairPlan):
                residual = add_other
                consumed += [*passed, after]
                end, passed = _skip_identities(module, after)
                act = _act_of(module, _only_user(end), end)
                if act is not None:
                    consumed += [*passed, _only_user(end)]
        elif (act := _act_of(module, after, end)) is not None:
            consumed += [*passed, after]
        if norm_node is None and residual is None:
            continue  # a unit child alone is fused as its own module
        plan = pair_plan(conv_m, norm_m, act, residual is not None)
        if isinstance(plan, str):
            found.reasons.append((conv_path, plan))
            continue
        note = plan.note if act is not None and plan.act != act else None
        if note is None and plan.tail:
            note = plan.note
        found.chains.append(ChainSpec(conv_path, norm_path, act, residual is not None, note))
        if rewrite:
            fused_nodes.append(_rewrite(graph, consumed, conv_path, norm_path, residual, act))
    if rewrite and fused_nodes:
        _add_layout_conversions(module, graph, fused_nodes)
    return found


def _rewrite(graph: fx.Graph, consumed: list[fx.Node], conv_path: str, norm_path: str,
             residual: fx.Node | None, act: str | None) -> fx.Node:
    x = consumed[0].args[0]
    last = consumed[-1]
    with graph.inserting_before(last):
        conv = graph.get_attr(conv_path)
        norm = graph.get_attr(norm_path)
        fused = graph.call_function(run_chain, (conv, norm, x, residual, act))
    last.replace_all_uses_with(fused)
    for n in reversed(consumed):
        graph.erase_node(n)
    return fused


class _InPlace:
    """Stands for a consumer that modifies its input in place (see :func:`guard_inplace`)."""

    inplace = True


def _modifies_in_place(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(_module(module, node), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    return bool(node.kwargs.get("inplace", False))


def _add_layout_conversions(module: nn.Module, graph: fx.Graph,
                            fused_nodes: list[fx.Node]) -> None:
    """A fused output going to anything but another fused run or the module's output gets the
    layout eager would have there (the module's output is converted by its caller's rule), and
    is copied first for a consumer that would modify it in place while autograd records."""
    fused = set(fused_nodes)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    wanted = None
    for node in fused_nodes:
        others = [u for u in node.users if u not in fused and u.op != "output"]
        if not others:
            continue
        if wanted is None:
            anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
            with graph.inserting_after(anchor):
                wanted = graph.call_function(
                    layout.wanted_format, (placeholders[0] if placeholders else None,))
        with graph.inserting_after(node):
            converted = graph.call_function(layout.to_format, (node, wanted))
        for user in others:
            user.replace_input_with(node, converted)
        inplace = [u for u in others if _modifies_in_place(module, u)]
        if inplace:
            with graph.inserting_after(converted):
                guarded = graph.call_function(guard_inplace, (converted, _InPlace))
            for user in inplace:
                user.replace_input_with(converted, guarded)


# ------------------------------------------------------------------------------------------------
# The traced module's fused class
# ------------------------------------------------------------------------------------------------


class GraphFused(nn.Module):
    """Mixin of the generated classes (:func:`graph_type`): forward runs the module's traced
    graph with its chains fused. The plan in ``__dict__`` keeps only plain data; the generated
    code is made again after a deep copy or unpickling (from a new trace of the same module)."""

    _fastres_plain: type = nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if plain_forward_active():
            return self._fastres_plain.forward(self, *args, **kwargs)
        code = _code(self)
        if code is None:  # nothing to fuse per layer (a block with no chains of its own)
            out = self._fastres_plain.forward(self, *args, **kwargs)
        else:
            out = code(self, *args, **kwargs)
        return layout.match_input(out, layout.first_tensor(args))

    def __reduce_ex__(self, protocol: int):
        # the generated class is not importable: rebuild it from the plain class
        return new_fused, (GraphFused, self._fastres_plain), self.__dict__

    def extra_repr(self) -> str:
        plan = self.__dict__.get(PLAN_ATTR)
        base = super().extra_repr()
        if plan is None:
            return base
        runs = ", ".join(c.conv + ("+res" if c.residual else "") for c in plan.chains)
        return f"{base + ', ' if base else ''}fused=[{runs}]"


_FUSED_TYPES: dict[tuple[type, type], type] = {}


def fused_type(mixin: type, plain: type) -> type:
    """The generated fused subclass of ``plain`` with ``mixin``'s forward (made once per pair;
    ``mixin`` itself where ``plain`` is the class it was written for)."""
    if getattr(mixin, "_fastres_plain", None) is plain:
        return mixin
    key = (mixin, plain)
    if key not in _FUSED_TYPES:
        _FUSED_TYPES[key] = type(f"Fused{plain.__name__}", (mixin, plain), {
            "_fastres_plain": plain, "__module__": mixin.__module__,
            "__doc__": f"{plain.__name__} with its conv → norm runs fused (fastres.fuse)."})
    return _FUSED_TYPES[key]


def new_fused(mixin: type, plain: type) -> nn.Module:
    """An empty instance of :func:`fused_type` (unpickling: the generated class is not
    importable by name)."""
    cls = fused_type(mixin, plain)
    return cls.__new__(cls)


def graph_type(plain: type) -> type:
    """The fused subclass of ``plain`` (made once per class)."""
    return fused_type(GraphFused, plain)


class _Compiled:
    """The generated forward of one module (never pickled or deep-copied: made again).
    ``fn`` None: nothing to fuse (the plain forward runs); ``stale``: to be made again."""

    def __init__(self, fn: Any, stale: bool = False) -> None:
        self.fn = fn
        self.stale = stale

    def __reduce__(self):
        return _Compiled, (None, True)

    def __deepcopy__(self, memo: dict) -> _Compiled:
        return _Compiled(self.fn)  # code reaches its modules through ``self``: shareable


CODE_ATTR = "_fastres_graph_code"
BLOCK_ATTR = "_fastres_block"  # a traced residual block's BlockSpec (fastres.nn.graph_block)


def _code(module: nn.Module) -> Any:
    holder = module.__dict__.get(CODE_ATTR)
    if holder is None or holder.stale:
        fn, plan = compile_module(module)
        module.__dict__[PLAN_ATTR] = plan
        holder = module.__dict__[CODE_ATTR] = _Compiled(fn)
    return holder.fn


def compile_module(module: nn.Module) -> tuple[Any, GraphPlan]:
    """Trace ``module``, fuse its chains and generate its forward: ``(fn(self, ...), plan)``;
    ``fn`` is None when nothing is fused."""
    graph = trace(module)
    if isinstance(graph, str):
        return None, GraphPlan(reasons=[("", graph)])
    plan = plan_graph(module, graph, rewrite=True)
    if not plan.chains:
        return None, plan
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fastres fused {type(module).__name__}>", "exec"), namespace)
    return namespace["forward"], plan


def fuse_traced(module: nn.Module) -> None:
    """Make ``module`` (planned by :func:`plan_graph` without rewriting) run fused."""
    module.__class__ = graph_type(getattr(type(module), "_fastres_plain", type(module)))
    module.__dict__.pop(CODE_ATTR, None)
    _code(module)


def unfuse_traced(module: nn.Module) -> bool:
    """Give a traced module its plain class back; False if it was not one."""
    if not isinstance(module, GraphFused):
        return False
    module.__class__ = module._fastres_plain
    module.__dict__.pop(PLAN_ATTR, None)
    module.__dict__.pop(CODE_ATTR, None)
    module.__dict__.pop(BLOCK_ATTR, None)
    return True


def fused_chains(module: nn.Module) -> list[ChainSpec]:
    """The chains a traced module runs fused now."""
    plan = module.__dict__.get(PLAN_ATTR)
    return [] if plan is None else list(plan.chains)


__all__ = [
    "ChainSpec",
    "GraphFused",
    "GraphPlan",
    "PairPlan",
    "fuse_traced",
    "fused_chains",
    "fused_type",
    "graph_type",
    "has_inner_act",
    "is_norm",
    "new_fused",
    "pair_plan",
    "plan_graph",
    "run_chain",
    "trace",
    "unfuse_traced",
    "unit_of",
]
