"""Whether an eager call may run a custom op's Python implementation without the dispatcher.

Calling a ``torch.library`` custom op from Python boxes its arguments for the dispatcher, unboxes
them again for the Python kernel, and runs ``custom_op``'s wrappers (a grad-mode check, a
dynamo-disable frame, an output-aliasing check): ~16 µs of host time for ``conv_bn_relu``'s 17
arguments (CPU, one thread), a third of what eager conv + BN + ReLU costs in all. In plain eager
execution that buys nothing: fastres's ops carry their autograd themselves (an
``autograd.Function``) and the op has one implementation for every device. So eager calls run
the implementation directly, unless something would see or reroute the dispatch:

* ``torch.compile`` tracing (it must see the op and its fake kernel);
* a ``TorchDispatchMode`` (``FakeTensorMode``, ``FlopCounterMode``, functionalization...);
* a ``TorchFunctionMode`` (``with torch.device(...)`` too) or a tensor subclass argument;
* functorch transforms (``vmap``, ``grad``);
* the profiler (traces keep the ``fastres::`` op names);
* the JIT tracer (``torch.jit.trace``, the legacy ONNX export: it records dispatched ops only,
  and would miss every kernel launch);
* an argument that requires grad while grad mode is on (the implementation runs below
  autograd: a double backward must reach the dispatcher, which refuses it, rather than
  differentiate the backward's arithmetic).

Those take the dispatcher path, as every call did before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def can_skip_dispatcher(tensors: Sequence[torch.Tensor | None]) -> bool:
    """True if calling the op's implementation directly with these tensor arguments (``None``
    for absent optional ones) is indistinguishable from dispatching it (about 0.3 µs)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._has_torch_function(tensors)
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._profiler_enabled()
        or torch._C._get_tracing_state() is not None
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    )


def call_op(op, impl, args: Sequence, tensors: Sequence[torch.Tensor | None]):
    """``impl(*args)`` where :func:`can_skip_dispatcher` allows, else the custom op ``op``
    (whose implementation ``impl`` is) through the dispatcher."""
    return (impl if can_skip_dispatcher(tensors) else op)(*args)
