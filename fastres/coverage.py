"""How much of a model :func:`fastres.fuse` fuses: the ``fastres coverage`` command.

The convs that count are those whose output goes straight into a norm (BatchNorm2d,
SyncBatchNorm, FrozenBatchNorm2d, timm's BatchNormAct2d, or any other BatchNorm-like module),
found by data flow: one eval forward of the *unfused* model on a small random input, with a hook
on every conv and norm, pairs a norm with the conv whose output tensor object it receives. That is
independent of how :func:`fastres.fuse` reads the model, so a run it misses shows as unfused.

Then, in the fused model: which of those convs run fused per layer (a fused block's, Sequential's
or traced module's run, or a folded stem), which train inside one block op
(:mod:`fastres.ops.block`), which have an activation applied after the op in PyTorch (and why),
and the reasons :func:`fastres.fuse_report` gives for the rest.
"""

from __future__ import annotations

import ast
import copy
import re
import warnings
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from .nn.blocks import FusedBlock
from .nn.graph import GraphFused, fused_chains, is_norm
from .nn.graph_block import GraphBlock
from .nn.stem import LINK_ATTR, StemConv2d
from .swap import FusedSequential, fuse, fuse_report

Tensor = torch.Tensor


def conv_norm_pairs(model: nn.Module, input_size: tuple[int, ...] = (3, 64, 64),
                    batch: int = 2) -> list[tuple[str, str]]:
    """``(conv path, norm path)`` for every conv whose output a norm receives, in call order
    (one eval forward without gradients; the model's train/eval flags are restored)."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, tuple[str, Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def conv_hook(m: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, Tensor):
            outputs[id(out)] = (names[m], out)  # the tensor kept alive: ids stay unique

    def norm_hook(m: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        seen = outputs.get(id(x))
        if seen is not None and seen[1] is x and (seen[0], names[m]) not in pairs:
            pairs.append((seen[0], names[m]))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif is_norm(m):
            handles.append(m.register_forward_pre_hook(norm_hook))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return pairs


def fused_convs(model: nn.Module) -> tuple[set[str], set[str], dict[str, str]]:
    """``(fused per layer, in a block op now, {conv: why its activation runs after the op})``
    by conv path, read from a fused model's modules."""
    paths = {id(m): n for n, m in model.named_modules()}
    per_layer: set[str] = set()
    block_op: set[str] = set()
    act_outside: dict[str, str] = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, GraphBlock) and m.block_reason() is None:
            convs, _, proj = m.block_layout()[:3]
            block_op.update(paths[id(c)] for c in (*convs, proj) if c is not None)
        if isinstance(m, FusedBlock) and m.fused:
            per_layer.update(paths[id(v.conv)] for v in m._views.values() if id(v.conv) in paths)
            if hasattr(m, "block_layout") and m.block_reason() is None:
                convs, _, proj = m.block_layout()[:3]
                block_op.update(paths[id(c)] for c in (*convs, proj) if c is not None)
        elif isinstance(m, FusedSequential):
            for run in m._runs.values():
                per_layer.add(paths[id(run.conv)])
                if run.note:
                    act_outside[paths[id(run.conv)]] = run.note
        elif isinstance(m, GraphFused):
            for chain in fused_chains(m):
                per_layer.add(prefix + chain.conv)
                if chain.note:
                    act_outside[prefix + chain.conv] = chain.note
        elif isinstance(m, StemConv2d) and m.__dict__[LINK_ATTR].intact():
            per_layer.add(path)
    return per_layer, block_op, act_outside


def _reason_for(conv: str, reasons: list[tuple[str, str]]) -> str | None:
    """The report's reason for ``conv``: one given at its path or at a module above it."""
    for path, why in reasons:
        if why.startswith("runs layer by layer"):
            continue
        if path in ("", conv) or conv.startswith(path + "."):
            return why
    return None


_DROP_PROB = re.compile(r"probability [0-9.e-]+")
_PAIR_PREFIX = re.compile(r"^(\[\d+\]|[\w.]+\+[\w.]+|stem): ")


def coverage(model: nn.Module, fused: nn.Module | None = None, *,
             input_size: tuple[int, ...] = (3, 64, 64)) -> dict[str, Any]:
    """The coverage of ``fuse(model)`` (``fused`` if given: fused from ``model``) as a dict:
    ``conv_norm`` (convs followed by a norm), ``fused_per_layer``, ``in_block_ops``,
    ``act_outside`` ({why: count}), ``unfused`` ({reason: [conv paths]}; "no reason given" where
    the report has none), ``block_notes`` ({why a block runs layer by layer: count})."""
    pairs = conv_norm_pairs(model, input_size)
    if fused is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fuse(copy.deepcopy(model), inplace=True)
    per_layer, block_op, act_outside = fused_convs(fused)
    report = fuse_report(fused)
    unfused: dict[str, list[str]] = defaultdict(list)
    for conv, _ in pairs:
        if conv not in per_layer:
            why = _reason_for(conv, report)
            unfused[_PAIR_PREFIX.sub("", why) if why else "no reason given"].append(conv)
    convs = [c for c, _ in pairs]
    notes = Counter(_DROP_PROB.sub("probability > 0", why.removeprefix("runs layer by layer: "))
                    for _, why in report if why.startswith("runs layer by layer"))
    return {
        "conv_norm": len(convs),
        "fused_per_layer": sum(c in per_layer for c in convs),
        "in_block_ops": sum(c in block_op for c in convs),
        "act_outside": dict(Counter(act_outside[c] for c in convs if c in act_outside)),
        "unfused": dict(unfused),
        "block_notes": dict(notes),
    }


def build_model(spec: str) -> nn.Module:
    """A weights-free model from a name as the command line gives it: ``timm:NAME``,
    ``fastres:NAME`` or a torchvision name, optionally ``[key=value,...]`` keyword arguments
    and ``.attr`` paths after it (``fasterrcnn_resnet50_fpn.backbone``)."""
    match = re.fullmatch(r"(?:(timm|fastres|torchvision):)?([\w]+)(?:\[(.*)\])?((?:\.\w+)*)",
                         spec)
    if match is None:
        raise ValueError(f"cannot read model name {spec!r} (e.g. timm:resnet50d[drop_path_rate="
                         "0.1], resnet50, fasterrcnn_resnet50_fpn.backbone)")
    source, name, args, attrs = match.groups()
    kwargs = {}
    for item in filter(None, (args or "").split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    elif source == "fastres":
        from . import models

        model = getattr(models, name)(**kwargs)
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                                 **kwargs)
        except TypeError:  # a classification model: no backbone weights argument
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    for attr in filter(None, attrs.split(".")):
        model = getattr(model, attr)
    return model


def coverage_lines(name: str, result: dict[str, Any]) -> list[str]:
    """The human-readable report of one model."""
    n = result["conv_norm"]

    def pct(k: int) -> str:
        return f"{100 * k / n:5.1f}%" if n else "  n/a"

    lines = [f"{name}",
             f"  conv layers followed by a norm  {n:5d}",
             f"  fused per layer                 {result['fused_per_layer']:5d}  "
             f"{pct(result['fused_per_layer'])}",
             f"  inside block ops (training)     {result['in_block_ops']:5d}  "
             f"{pct(result['in_block_ops'])}"]
    for why, k in result["act_outside"].items():
        lines.append(f"  activation after the op ({k}): {why}")
    for why, convs in result["unfused"].items():
        lines.append(f"  not fused ({len(convs)}): {why}")
        lines.append(f"      {', '.join(convs[:6])}{' ...' if len(convs) > 6 else ''}")
    for why, k in result["block_notes"].items():
        lines.append(f"  blocks layer by layer ({k}): {why}")
    return lines


__all__ = ["build_model", "conv_norm_pairs", "coverage", "coverage_lines", "fused_convs"]
