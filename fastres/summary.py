"""``fastres.summary(model, input_size=...)``: one row per layer or block, with what serves it.

The forward pass runs on a copy of the model on the ``meta`` device (shapes only: no activation
memory and no arithmetic, so any input size costs the same; fastres' ops have fake kernels for
this). A ``TorchDispatchMode`` sees every convolution, matrix product and fused
``fastres::conv_bn_relu_fwd`` call of that pass and charges it to the row being run.

Rows: every residual block (a module other than the root with a ``Conv2d`` child, e.g. a
torchvision/timm/fastres block or a Conv→BN→ReLU ``Sequential``) and every leaf module outside
blocks; work the root's own forward does itself (a fastres model runs its stem so) gets a first
row ``(Model.forward)``, and the modules it ran show no output shape of their own (``-``).
Columns: path, type, output shape, parameters, FLOPs, and for fused calls the backend and kernel
that dispatch *would* choose for ``device``/``dtype`` (a static decision: nothing runs or is
timed there). FLOPs count 2 per multiply-add of convolutions and linear layers (BN, ReLU, adds
and pooling are left out, as torchvision's and the papers' figures do); parameters are counted
once each, so the total is exact (ResNet-18, 1000 classes: 11,689,512).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import backends
from .backends import CallInfo, ConvParams

Tensor = torch.Tensor


@dataclass
class Row:
    name: str
    type: str
    output_shape: tuple[int, ...] | None = None  # None: not called in the forward pass
    params: int = 0
    flops: int = 0
    fused: Counter = field(default_factory=Counter)  # "backend kernel" -> calls


@dataclass
class Summary:
    """What :func:`summary` found; ``str()`` is a plain-text table, :meth:`print` a rich one."""

    rows: list[Row]
    total_params: int
    trainable_params: int
    total_flops: int
    input_shape: tuple[int, ...]
    device: str
    dtype: torch.dtype
    training: bool

    HEADER = ("layer", "type", "output shape", "params", "FLOPs", "fused: backend kernel ×calls")

    def table_rows(self) -> list[tuple[str, ...]]:
        return [(r.name, r.type, "-" if r.output_shape is None else str(list(r.output_shape)),
                 f"{r.params:,}", _si(r.flops), _fused_text(r.fused)) for r in self.rows]

    def footer(self) -> list[str]:
        mode = "training" if self.training else "inference"
        return [f"total parameters: {self.total_params:,} (trainable {self.trainable_params:,})",
                f"total FLOPs: {self.total_flops:,} ({_si(self.total_flops)}) per forward of "
                f"{list(self.input_shape)}",
                f"fused calls as dispatch would serve them on {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')}, {mode}, backend "
                f"{backends.get_backend()!r} (chosen, not measured)"]

    def __str__(self) -> str:
        from .benchmark.report import render_table

        return "\n".join([render_table("fastres summary", self.HEADER, self.table_rows()),
                          *self.footer()])

    def print(self, use_rich: bool = True) -> None:
        """Print the table (``rich`` when installed and wanted, else plain text)."""
        try:
            if not use_rich:
                raise ImportError
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self)
            return
        table = Table(title="fastres summary")
        for i, h in enumerate(self.HEADER):
            table.add_column(h, justify="right" if i in (3, 4) else "left")
        for row in self.table_rows():
            table.add_row(*row)
        console = Console()
        if not console.is_terminal:  # a log file: no reason to squeeze columns into 80
            console = Console(width=200)
        console.print(table)
        for line in self.footer():
            console.print(line, highlight=False)


def _si(n: int) -> str:
    if n == 0:
        return "0"
    k = min(int(math.log10(n) // 3), 4)
    return f"{n / 10 ** (3 * k):.3g}{' kMGT'[k].strip()}"


def _fused_text(calls: Counter) -> str:
    return ", ".join(f"{what} ×{n}" if n > 1 else what for what, n in calls.items())


def kernel_name(call: CallInfo, backend: str) -> str:
    """The conv kernel ``backend`` runs for ``call`` (by the backend's own rule)."""
    c_per_group = call.x_shape[1] // call.conv.groups
    if backend == "triton":
        from .backends.triton.conv import kernel_for

        kernel = kernel_for(c_per_group, call.conv.groups)
    elif backend == "cuda":
        from .backends.cuda import plan

        kernel = plan(call.x_shape, call.weight_shape, call.conv, call.dtype)[0]
    else:
        return "PyTorch conv + BN"
    # eval: one kernel, BN folded in the epilogue; training: conv with BN partials, then apply
    return f"{kernel} + BN stats" if call.batch_stats else f"{kernel}, BN folded"


def _conv_flops(x_shape: Sequence[int], w_shape: Sequence[int], conv: ConvParams) -> int:
    n, _, h, w = x_shape
    k, c_per_group, r, s = w_shape
    oh, ow = conv.out_hw(h, w, r, s)
    return 2 * n * k * oh * ow * c_per_group * r * s


class _Recorder(TorchDispatchMode):
    """Charges convolution / matmul FLOPs and fused calls to the row on top of ``stack``."""

    def __init__(self, rows: dict[str, Row], outside: Row, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.outside, self.device, self.dtype = rows, outside, device, dtype
        self.stack: list[str] = []

    def _charge(self, flops: int) -> Row:
        # outside every row: work done by the root's own forward (e.g. a fastres model's stem)
        row = self.rows[self.stack[-1]] if self.stack else self.outside
        row.flops += flops
        return row

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        aten = torch.ops.aten
        if func is aten.convolution.default:
            x, w, _, stride, padding, dilation, transposed, _, groups = args
            if not transposed:
                conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
                self._charge(_conv_flops(x.shape, w.shape, conv))
        elif func in (aten.mm.default, aten.addmm.default):
            a, b = args[-2], args[-1]
            self._charge(2 * a.shape[0] * a.shape[1] * b.shape[1])
        elif func is torch.ops.fastres.conv_bn_relu_fwd.default:
            x, w, residual = args[0], args[1], args[7]
            stride, padding, dilation, groups, batch_stats, _, act = args[8:15]
            conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
            row = self._charge(_conv_flops(x.shape, w.shape, conv))
            call = CallInfo(device=self.device, dtype=self.dtype, x_shape=tuple(x.shape),
                            weight_shape=tuple(w.shape), conv=conv, batch_stats=batch_stats,
                            has_residual=residual is not None, act=act)
            backend = backends.select(call)
            row.fused[f"{backend} {kernel_name(call, backend)}"] += 1
        elif func is torch.ops.fastres.residual_block_fwd.default:
            self._block(args)
        return out

    def _block(self, args) -> None:
        """A whole residual block (fastres.ops.block): each of its convs charged and named as
        the per-layer op names it (the block op runs the same conv kernels, the BN+ReLU before a
        conv applied while it loads its input)."""
        from .ops.block import _block, _shapes

        x, weights = args[0], args[1]
        convs, shortcut, preact, entry_norm, eps, batch_stats = args[6:12]
        block = _block(convs, shortcut, preact, entry_norm, eps)
        shapes = _shapes(x.shape, weights, block)
        n = len(block.convs)
        inputs = [tuple(x.shape)] + [tuple(s) for s in shapes[:n - 1]]
        inputs += [tuple(x.shape)] * (len(weights) - n)  # the projection reads the block input
        for conv, w, x_shape in zip(block.all_convs, weights, inputs):
            row = self._charge(_conv_flops(x_shape, w.shape, conv))
            call = CallInfo(device=self.device, dtype=self.dtype, x_shape=x_shape,
                            weight_shape=tuple(w.shape), conv=conv, batch_stats=batch_stats,
                            has_residual=False, act="relu")
            backend = backends.select(call)
            row.fused[f"{backend} {kernel_name(call, backend)}"] += 1


def _row_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks (not the root, with a Conv2d child) and the leaf modules outside blocks."""
    rows: dict[str, nn.Module] = {}

    def walk(m: nn.Module, path: str) -> None:
        children = list(m.named_children())
        is_block = path != "" and any(isinstance(c, nn.Conv2d) for _, c in children)
        if not children or is_block:
            rows[path or type(m).__name__] = m
            return
        for name, child in children:
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return rows


def summary(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), *,
            batch_size: int = 1, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32, training: bool = False,
            print_summary: bool = True) -> Summary:
    """Summarise ``model`` for an input of ``(batch_size, *input_size)``.

    Args:
        model: any module; it is not changed (a copy runs on the ``meta`` device).
        input_size: one sample's shape, e.g. ``(3, 224, 224)``.
        batch_size: samples per batch (FLOPs scale with it; parameters do not).
        device: the device whose dispatch decision the fused column shows (default ``"cuda"``
            when a GPU is present, else ``"cpu"``); needs no such device to be present.
        dtype: the compute dtype the fused column assumes.
        training: dispatch for a training step (batch statistics) instead of inference.
        print_summary: print the table (rich when installed).

    Returns the :class:`Summary` (rows, exact totals).
    """
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    params = {id(p): p for p in model.parameters()}.values()
    shadow = copy.deepcopy(model).to(device="meta", dtype=dtype).train(training)
    rows = {name: Row(name, type(m).__name__, params=sum(p.numel() for p in m.parameters()))
            for name, m in _row_modules(shadow).items()}
    root = type(model).__name__
    outside = Row(f"({root}.forward)", root)
    recorder = _Recorder(rows, outside, device, dtype)
    handles = []
    for name, m in _row_modules(shadow).items():
        def enter(_m, _inp, name=name):
            recorder.stack.append(name)

        def leave(_m, _inp, out, name=name):
            recorder.stack.pop()
            if isinstance(out, Tensor):
                rows[name].output_shape = tuple(out.shape)

        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    x = torch.empty(batch_size, *map(int, input_size), device="meta", dtype=dtype)
    try:
        with torch.no_grad(), recorder:
            shadow(x)
    finally:
        for h in handles:
            h.remove()
    result = Summary(
        rows=([outside] if outside.flops or outside.fused else []) + list(rows.values()),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_flops=sum(r.flops for r in rows.values()) + outside.flops,
        input_shape=tuple(x.shape), device=str(device), dtype=dtype, training=training,
    )
    if print_summary:
        result.print()
    return result


__all__ = ["Row", "Summary", "kernel_name", "summary"]
