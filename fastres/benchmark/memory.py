"""Bytes a forward pass keeps for backward: the measure of DESIGN.md section 4's memory rule.

:func:`saved_bytes` runs one forward under :func:`torch.autograd.graph.saved_tensors_hooks` and
adds up the tensors autograd keeps, counted the way memory is actually held:

* by storage, not by tensor: two saved tensors that share a storage (a view and its base, the
  output ``z`` of one fused layer saved again as the input ``x`` of the next) count once, with
  the storage's full ``nbytes``;
* parameters and buffers of the model are left out (they exist whether or not anything is saved);
  the input ``x`` is counted when a layer saves it (it is the same for every model compared);
  casts of parameters (autocast's bf16 weight copies) are new storages and are counted;
* only what goes through ``ctx.save_for_backward`` / autograd's own saving is seen: a tensor a
  custom ``autograd.Function`` stashes as a plain attribute of ``ctx`` is invisible here.

The forward changes nothing in the model: BN running statistics (and ``num_batches_tracked``)
are restored afterwards. The model is run in the mode it is in (call ``model.train()`` first to
measure a training step), with gradients enabled even inside ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _storage_key(t: Tensor) -> tuple[torch.device, int] | None:
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    return None if ptr == 0 else (t.device, ptr)


def saved_storages(
    model: nn.Module, x: Tensor, *, loss: Callable[[Tensor], Tensor] | None = None
) -> dict[tuple[torch.device, int], int]:
    """``{(device, storage data_ptr): nbytes}`` of every non-parameter storage autograd keeps
    for backward of ``loss(model(x))`` (``model(x)`` when ``loss`` is None)."""
    exclude = set()
    for t in [*model.parameters(), *model.buffers()]:
        key = _storage_key(t)
        if key is not None:
            exclude.add(key)
    seen: dict[tuple[torch.device, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in exclude:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        # the outputs stay alive until every pack has run, so no saved storage is freed and its
        # address reused by a later one within the count
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            if loss is not None:
                out = loss(out)
        del out
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return seen


def saved_bytes(
    model: nn.Module, x: Tensor, *, loss: Callable[[Tensor], Tensor] | None = None
) -> int:
    """Bytes of the unique non-parameter storages a forward of ``model`` on ``x`` (then
    ``loss``, if given) keeps for backward; see the module docstring for what counts."""
    return sum(saved_storages(model, x, loss=loss).values())


def saved_bytes_ratio(
    fused: nn.Module, eager: nn.Module, x: Tensor, *,
    loss: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """``saved_bytes(fused, x) / saved_bytes(eager, x)``: below 1, the fused model keeps less."""
    return saved_bytes(fused, x, loss=loss) / saved_bytes(eager, x, loss=loss)
