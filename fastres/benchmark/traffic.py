"""Paper model of the HBM traffic of one training step, for three designs (issue 10).

Every pass reads each tensor it needs once and writes each tensor it makes once, whole; nothing
stays in cache between passes. Per-channel vectors (BN statistics, partial sums, scale/shift) are
left out, and so are the passes every design shares and that are not conv/BN/ReLU/add (max pool,
average pool, the classifier, the loss, the optimizer step). Weights are read (and their
gradients written) once per batch. ``Y`` is a conv's output, ``X`` its input, ``W`` its weight.

**eager** (PyTorch, cuDNN, channels_last), per conv layer:

* forward: conv reads X, W, writes Y; BN (training) reads Y for its statistics, then reads Y and
  writes its output (two kernels, as PyTorch's channels_last batch norm runs); the residual add
  reads two and writes one; ReLU reads and writes (in place or not, the same bytes);
* backward: ReLU's backward reads dz and the output (mask), writes the gradient; BN's backward
  reads the gradient and Y for its two reductions, then reads both again and writes dY; dgrad
  reads dY, W, writes dX (not for the stem); wgrad reads dY, X, writes dW; where a block's input
  feeds two branches autograd adds the two gradients (reads two, writes one, size X).
* pre-activation nets: the conv after which the block's residual add happens has no BN; the sum
  goes through BN + ReLU (the next block's entry norm, or the final norm) as above.

**per-layer fused** (fastres today, ``fastres.ops.conv_bn_relu``):

* forward: the conv reads X, W and writes Y with the BN partials in its epilogue; one apply pass
  reads Y (and the residual) and writes z = relu(BN(y) (+ residual));
* backward: one reductions pass reads dz, Y and z (the mask; z only where there is a ReLU) and
  writes dresidual where there is one; dgrad and wgrad each read dz, Y and z again to form dY
  while loading it, dgrad reads W and writes dX, wgrad reads X and writes dW; the gradient sum at
  a block input as in eager;
* what the op does not cover runs as in eager: pre-activation nets' entry BN + ReLU and their
  residual add, and convs without a BN after them (pre-activation projection and last convs).

**block fused** (the design of DESIGN.md section 3, "the residual block is the unit"):

* forward: every conv reads its input and writes its raw output Y with BN partials; where the
  input is a raw conv output (inside a block; in pre-activation nets also the block input, the
  raw sum) BN + ReLU are applied while loading it. One join pass per block reads the last conv's
  raw Y and the shortcut (the block input, or the projection's raw Y, its BN folded in) and
  writes the block output (post-activation: relu(BN(y) + shortcut); pre-activation: the raw sum
  with its BN partials). The stem keeps one apply pass (its output feeds the max pool).
* backward: one join pass per block reads the output gradient, the block output (mask), the last
  conv's Y and the projection's Y (for the BN reductions) and writes g = dz·mask once (pre-
  activation: reads dz, the sum, the entry-norm gradient of the next block, writes dsum). For
  each conv with BN, dgrad and wgrad read g and Y to form dY while loading it (DESIGN's dBN
  formula; the reductions came from the join pass or from the dgrad epilogue below); dgrad reads
  W and writes dX, where its input was a raw conv output its epilogue reads that raw output
  again (mask and normalised value) to apply dReLU and produce the next reductions; wgrad reads X
  (raw, activation recomputed at load) and writes dW. Where a block input feeds two branches,
  the second dgrad's epilogue reads the first's result (read X, no separate sum pass).

:func:`step_traffic` gives bytes per design and per pass kind; :func:`traffic_report` adds
GB/step and the memory-bound img/s at a bandwidth.

Against issue 10's figures (224², bf16, batch 256; GB per step, this model / the issue's):

=================  ===============  ===============  ==============
model              eager            per-layer fused  block fused
=================  ===============  ===============  ==============
ResNet-50          120.3 / 108      95.5 / 85        71.2 / 51
ResNeXt-50 32x4d   152.3 / 140      120.7 / 110      86.4 / 66
=================  ===============  ===============  ==============

The constants above were not tuned to meet the issue's numbers. What this model counts that a
one-pass-per-op count leaves out: the block-input gradient sums (8.6 GB for ResNet-50 in eager
and per-layer fused, 2.9 GB block fused); BN as two kernels each way in eager (5.7 GB forward,
11.4 GB backward more than one pass each); in block fused, y read next to g wherever dY is
formed at load (11.4 GB: dgrad and wgrad both need ŷ) and the join passes (8.5 GB forward,
12.1 GB backward). The ratios eager : per-layer agree (0.79 both); block fused keeps 0.59 of
eager's traffic here against the issue's 0.47.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cases import ConvLayer
from .roofline import DTYPE_BYTES

DESIGNS = ("eager", "per_layer", "block")


@dataclass(frozen=True)
class Role:
    """Where a conv sits in its block, as the traffic model needs it."""

    kind: str  # "stem", "inner", "last" (post-act, BN + add + ReLU), "preact_last", "shortcut"
    raw_input: bool  # its input is a raw conv output / raw sum with BN + ReLU still to apply
    block_first: bool  # the first conv of a block: its input also feeds the shortcut


def _block(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def roles(layers: Sequence[ConvLayer]) -> list[Role]:
    """Each conv's role, from the traced epilogues and the torchvision/fastres module names
    (``layerN.M.convK``, ``layerN.M.downsample``)."""
    preact = any(not layer.has_bn and "downsample" not in layer.name for layer in layers)
    out = []
    seen_preact_sum = False  # a pre-activation block input is a raw sum after the first block
    for layer in layers:
        short = layer.name.rsplit(".", 1)[-1]
        if not layer.input_grad:
            kind = "stem"
        elif "downsample" in layer.name:
            kind = "shortcut"
        elif not layer.has_bn:
            kind = "preact_last"
        elif layer.epilogue.residual:
            kind = "last"
        else:
            kind = "inner"
        first_of_block = short == "conv1" and kind != "stem"
        at_block_input = first_of_block or kind == "shortcut"
        raw = (not at_block_input and kind != "stem") or (
            preact and at_block_input and seen_preact_sum)
        out.append(Role(kind, raw, first_of_block))
        if kind == "preact_last":
            seen_preact_sum = True
    return out


class _Tally:
    def __init__(self):
        self.elems: collections.Counter = collections.Counter()  # activations, per image
        self.weights: collections.Counter = collections.Counter()  # per batch

    def act(self, label: str, n: float) -> None:
        self.elems[label] += n

    def wt(self, label: str, n: float) -> None:
        self.weights[label] += n


def _eager(layers, rls, t: _Tally, *, fused_op: bool = False) -> None:
    for layer, role in zip(layers, rls):
        x, y = layer.shape.x_elems / layer.shape.n, layer.shape.z_elems / layer.shape.n
        w = layer.shape.w_elems
        relu = layer.epilogue.relu and layer.has_bn
        t.act("conv fwd", x + y)
        t.wt("conv fwd", w)
        if layer.has_bn and fused_op:
            t.act("apply fwd", 2 * y + (y if layer.epilogue.residual else 0))
            mask = y if relu else 0
            t.act("dBN reductions", 2 * y + mask + (y if layer.epilogue.residual else 0))
            dy_reads = 2 * y + mask  # dgrad and wgrad each form dY from dz, y (, z)
        else:
            if layer.has_bn:
                t.act("BN fwd", 3 * y)
                t.act("BN bwd", 5 * y)
            if layer.epilogue.residual:
                t.act("add fwd", 3 * y)
            if relu:
                t.act("ReLU fwd", 2 * y)
                t.act("ReLU bwd", 3 * y)
            dy_reads = y
        if role.kind == "preact_last":  # residual add, then the next entry BN + ReLU (eager)
            t.act("add fwd", 3 * y)
            t.act("BN fwd", 3 * y)
            t.act("ReLU fwd", 2 * y)
            t.act("ReLU bwd", 3 * y)
            t.act("BN bwd", 5 * y)
        if layer.input_grad:
            t.act("dgrad", dy_reads + x)
            t.wt("dgrad", w)
        t.act("wgrad", dy_reads + x)
        t.wt("wgrad", w)
        if role.block_first:
            t.act("grad sum", 3 * x)


def _block_fused(layers, rls, t: _Tally) -> None:
    for layer, role in zip(layers, rls):
        x, y = layer.shape.x_elems / layer.shape.n, layer.shape.z_elems / layer.shape.n
        w = layer.shape.w_elems
        t.act("conv fwd", x + y)
        t.wt("conv fwd", w)
        if role.kind == "stem":
            t.act("apply fwd", 2 * y)
            t.act("dBN reductions", 3 * y)  # dz, y, z of the stem; its wgrad then reads g, y
            dy_reads = 2 * y
        elif role.kind in ("last", "preact_last"):
            t.act("join fwd", 3 * y)  # raw y (+ shortcut) in, block output out
            t.act("join bwd", 4 * y)  # dz, output, y (or next entry-norm grad) in; g out
            dy_reads = 2 * y if layer.has_bn else y
        elif role.kind == "shortcut":
            if layer.has_bn:
                t.act("join bwd", y)  # the join pass reads the projection's y for its dBN sums
            dy_reads = 2 * y if layer.has_bn else y
        else:
            dy_reads = 2 * y  # g and y: dY formed at load
        if layer.input_grad:
            t.act("dgrad", dy_reads + x + (x if role.raw_input else 0))
            t.wt("dgrad", w)
        t.act("wgrad", dy_reads + x)
        t.wt("wgrad", w)
        if role.block_first:
            t.act("grad sum", x)  # the second dgrad's epilogue reads the first's dX


def step_traffic(layers: Sequence[ConvLayer], *, design: str, dtype: torch.dtype = torch.bfloat16,
                 batch: int = 256) -> dict:
    """Bytes one training step moves under ``design`` (see the module docstring):
    ``{"bytes": total, "bytes_per_image": ..., "by_pass": {pass kind: bytes}}``."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    rls = roles(layers)
    t = _Tally()
    if design == "eager":
        _eager(layers, rls, t)
    elif design == "per_layer":
        _eager(layers, rls, t, fused_op=True)
    else:
        _block_fused(layers, rls, t)
    nbytes = DTYPE_BYTES[dtype]
    by_pass = {k: (t.elems[k] * batch + t.weights[k]) * nbytes
               for k in sorted(set(t.elems) | set(t.weights))}
    total = sum(by_pass.values())
    return {"bytes": total, "bytes_per_image": total / batch, "by_pass": by_pass}


def traffic_report(layers: Sequence[ConvLayer], *, dtype: torch.dtype = torch.bfloat16,
                   batch: int = 256, tbps: float | None = None) -> dict:
    """Per design: GB per step and, given the bandwidth ``tbps`` (TB/s), the img/s the step's
    traffic alone allows (``None`` when the bandwidth is unknown)."""
    out = {}
    for design in DESIGNS:
        tr = step_traffic(layers, design=design, dtype=dtype, batch=batch)
        seconds = tr["bytes"] / (tbps * 1e12) if tbps else None
        out[design] = {"gb_per_step": tr["bytes"] / 1e9,
                       "img_s_bound": batch / seconds if seconds else None}
    return {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "tbps": tbps,
            "designs": out}
