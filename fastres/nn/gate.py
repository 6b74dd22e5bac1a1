"""Channel gates (SE, ECA, ...) read from what a module does, for the block op.

A channel gate multiplies its input x (N, K, H, W) by a per-(sample, channel) factor computed
from x's spatial mean only: ``x * f(mean(x, (2, 3)))``. timm's ``SEModule``,
``EffectiveSEModule``, ``EcaModule`` and torchvision's ``SqueezeExcitation`` all have that form,
written differently (``x.mean((2, 3), keepdim=True)`` or an ``AdaptiveAvgPool2d(1)``, the
factor multiplied directly or through ``expand_as(x)``, reshaped through ``x.shape[0]``). The
module's forward is traced with torch.fx; if x is used only in the pooling, in shape queries and
in the final multiply, the graph without that multiply is f: run on the pooled values shaped
(N, K, 1, 1) in place of x (the mean of a 1×1 map is itself, exactly), it gives the factor. That
graph is compiled once per module to Python code taking the module as ``self`` (as
:class:`torch.fx.GraphModule` does) and run on the live module, so the module's own parameters,
activations (sigmoid, hard sigmoid, ...), biases and train/eval state are what is computed, even
after ``.to()`` or a child swapped. The cache holds the code, not the module: a module dropped by
its owner is freed.
Modules of another form (CBAM's spatial attention, Gather-Excite, a max-pool beside the mean)
get a reason and stay layer by layer.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

# f as a function of (module, pooled), or why the module is no channel gate; the values must not
# reference their keys (a weak-key dictionary would then keep every module alive)
_GateCode = Callable[[nn.Module, Tensor], Tensor]
_plans: weakref.WeakKeyDictionary[nn.Module, _GateCode | str] = weakref.WeakKeyDictionary()
_SPATIAL = ({2, 3}, {-2, -1})


def gate_reason(module: nn.Module) -> str | None:
    """None if ``module`` is a channel gate :func:`gate_function` can run, else why not."""
    plan = _plan(module)
    return plan if isinstance(plan, str) else None


def gate_function(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``f``: pooled (N, K, 1, 1) → the gate ``module`` multiplies its input by, (N, K, 1, 1),
    computed by ``module``'s own graph; raises ValueError (see :func:`gate_reason`)."""
    plan = _plan(module)
    if isinstance(plan, str):
        raise ValueError(plan)
    return functools.partial(plan, module)


def _plan(module: nn.Module) -> _GateCode | str:
    plan = _plans.get(module)
    if plan is None:
        plan = _plans[module] = _extract(module)
    return plan


def _extract(module: nn.Module) -> _GateCode | str:
    """The code of f (see the module docstring), or the reason there is none."""
    name = type(module).__name__
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as e:  # any tracing failure is a reason, not an error
        return f"channel gate {name} cannot be traced ({type(e).__name__}: {e})"
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(inputs) != 1:
        return f"channel gate {name} takes {len(inputs)} inputs, not one"
    x = inputs[0]
    result = output.args[0]
    factor = _factor_of(result, x)
    if factor is None:
        return f"{name} does not end in x * gate, a channel gate's form x * f(mean(x, (2, 3)))"
    for use in x.users:
        if use is result or _is_spatial_mean(use, module) or _is_shape_query(use) or (
                use.op == "call_method" and use.target == "expand_as" and use in result.args):
            continue
        what = use.target if isinstance(use.target, str) else getattr(
            use.target, "__name__", str(use.target))
        return (f"{name} uses its input in {what}(): not a channel gate, which uses it only "
                "through its spatial mean and the final multiply")
    if _depends_on(factor, {result}):
        return f"{name}'s gate depends on its own output"
    gate_graph = fx.Graph(owning_module=module)  # (dead-code elimination asks it what is pure)
    values: dict[fx.Node, fx.Node] = {}
    gate_graph.graph_copy(graph, values)
    gate_graph.output(values[factor])
    gate_graph.eliminate_dead_code()
    code = gate_graph.python_code(root_module="self")  # submodules read as self.<target>
    scope = dict(code.globals)  # the cached code keeps neither the graph nor the module
    exec(compile(code.src, f"<channel gate {name}>", "exec"), scope)
    return scope["forward"]


def _factor_of(result, x: fx.Node) -> fx.Node | None:
    """``g`` of ``result = x * g`` (or ``g * x``, ``x * g.expand_as(x)``), else None."""
    if not isinstance(result, fx.Node):
        return None
    is_mul = (result.op == "call_function" and result.target in (operator.mul, torch.mul)) or (
        result.op == "call_method" and result.target == "mul")
    if not is_mul or len(result.args) != 2 or result.kwargs:
        return None
    a, b = result.args
    if b is x:
        a, b = b, a
    if a is not x or not isinstance(b, fx.Node) or b is x:
        return None
    if b.op == "call_method" and b.target == "expand_as" and b.args[1:] == (x,):
        b = b.args[0]
    return b if isinstance(b, fx.Node) else None


def _is_spatial_mean(node: fx.Node, module: nn.Module) -> bool:
    """``x.mean((2, 3)[, keepdim])``, ``torch.mean``, ``F.adaptive_avg_pool2d(x, 1)`` or an
    ``nn.AdaptiveAvgPool2d(1)`` child on x."""
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        return type(sub) is nn.AdaptiveAvgPool2d and sub.output_size in (1, (1, 1), [1, 1])
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and set(dims) in _SPATIAL and not any(
            k not in ("dim", "keepdim") for k in node.kwargs)
    return False


def _is_shape_query(node: fx.Node) -> bool:
    """``x.shape[0]``, ``x.shape[1]``, ``x.size(0)``, ``x.size(1)`` (also through ``x.size()``):
    the batch and channel counts, which the pooled (N, K, 1, 1) input has too (H and W it
    does not: a gate reading them is refused)."""
    def batch_or_channel(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target is operator.getitem
                and n.args[1] in (0, 1))

    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return all(batch_or_channel(u) for u in node.users)
    if node.op == "call_method" and node.target == "size" and not node.kwargs:
        if len(node.args) == 1:
            return all(batch_or_channel(u) for u in node.users)
        return node.args[1:] in ((0,), (1,))
    return False


def _depends_on(node: fx.Node, targets: set[fx.Node]) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


__all__ = ["gate_function", "gate_reason"]
