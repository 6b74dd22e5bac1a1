"""The contract every backend implements.

A backend computes the whole fused op ``act(bn(conv(x)) + residual)`` forward and backward, where
``act`` is ``"relu"``, ``"silu"`` or None (no activation).
The op layer (:mod:`fastres.ops.conv_bn_relu`) validates arguments, converts layouts and dtypes,
updates BN running statistics, and picks the backend; a backend only computes.

Inputs a backend receives (already validated by the op layer):

* ``x``: (N, C, H, W), channels_last contiguous, dtype fp32/fp16/bf16 (fp64 for ``reference``).
* ``weight``: (K, C // groups, R, S), same dtype as ``x``, any layout.
* ``bias``: (K,) or None, same dtype as ``x``.
* ``bn_weight`` / ``bn_bias``: (K,) or None (affine=False), any float dtype.
* ``running_mean`` / ``running_var``: (K,) float; only read when ``batch_stats`` is False.
* ``residual``: (N, K, OH, OW) channels_last contiguous, same dtype as ``x``, or None.

Outputs are fresh tensors (never views of inputs): ``z`` and ``y`` channels_last in ``x``'s dtype,
``mean``/``var`` (K,) fp32, ``var`` the *biased* batch variance (or the running values in eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Tensor = torch.Tensor
OptTensor = Tensor | None


@dataclass(frozen=True)
class ConvParams:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def out_hw(self, h: int, w: int, r: int, s: int) -> tuple[int, int]:
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (r - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (s - 1) - 1) // self.stride[1] + 1
        return oh, ow


@dataclass(frozen=True)
class CallInfo:
    """What dispatch looks at to decide whether a backend can serve a call."""

    device: torch.device
    dtype: torch.dtype
    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    conv: ConvParams
    batch_stats: bool
    has_residual: bool
    act: str | None  # "relu", "silu" or None
    sync: bool = False  # SyncBatchNorm: batch statistics over a process group

    @property
    def relu(self) -> bool:
        return self.act == "relu"


class Backend(Protocol):
    name: str

    def unsupported_reason(self, call: CallInfo) -> str | None:
        """None if this backend can serve ``call``, else a sentence saying why not."""

    def forward(
        self,
        x: Tensor,
        weight: Tensor,
        bias: OptTensor,
        bn_weight: OptTensor,
        bn_bias: OptTensor,
        running_mean: OptTensor,
        running_var: OptTensor,
        residual: OptTensor,
        *,
        conv: ConvParams,
        batch_stats: bool,
        eps: float,
        act: str | None,
        save_for_backward: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(z, y, mean, var)``: z = act(v), v = bn(y) + residual the pre-activation.

        ``y`` is the raw conv output (+bias) when ``save_for_backward``; otherwise an empty tensor
        (eval inference then runs one fused kernel). ``mean``/``var`` are the batch statistics
        when ``batch_stats`` else fp32 copies of the running statistics.
        """

    def backward(
        self,
        dz: Tensor,
        x: Tensor,
        weight: Tensor,
        y: Tensor,
        z: OptTensor,
        mean: Tensor,
        var: Tensor,
        bn_weight: OptTensor,
        *,
        bn_bias: OptTensor,
        residual: OptTensor,
        conv: ConvParams,
        batch_stats: bool,
        eps: float,
        act: str | None,
        has_bias: bool,
        output_mask: tuple[bool, bool, bool, bool, bool, bool],
    ) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
        """Return grads ``(dx, dweight, dbias, dbn_weight, dbn_bias, dresidual)``.

        ``dz`` is channels_last contiguous. An entry is None where ``output_mask`` is False.
        ``dbn_weight``/``dbn_bias`` are fp32 (the op layer casts them to the parameters' dtype).
        g = dz·act'(v): dz itself without activation; dz·[z>0] for ReLU (``z`` is the output,
        given unless ``act`` is SiLU); for SiLU dz·s·(1 + v·(1 − s)), s = sigmoid(v), with
        v = y·scale + shift (+ residual) recomputed from the raw ``y``, the statistics, γ, β
        (``bn_bias``) and the ``residual`` (both given for SiLU only; SiLU is not invertible, so
        z alone cannot give v). With batch statistics: dβ = Σg; dγ = Σg·ŷ;
        dy = γ·invstd·(g − mean(g) − ŷ·mean(g·ŷ)); dresidual = g; then conv dgrad/wgrad of dy.
        With running statistics dy = γ·invstd·g.
        """


@dataclass(frozen=True)
class BlockParams:
    """The static structure of a residual block served by the block op (:mod:`fastres.ops.block`).

    Post-activation (ResNet, ResNeXt, Wide ResNet)::

        a_0 = x;  a_i = relu(bn_i(conv_i(a_{i-1})))  for i < L
        out = relu(bn_L(conv_L(a_{L-1})) + shortcut),  shortcut = bn_s(conv_s(x)) or x

    Pre-activation (He et al. 2016; timm ResNetV2)::

        a_0 = relu(bn_0(x)) (or x without ``entry_norm``);  a_i = relu(bn_i(conv_i(a_{i-1})))
        out = conv_L(a_{L-1}) + shortcut,  shortcut = conv_s(a_0) or x

    BatchNorms are listed in this order everywhere (``eps``, statistics, parameters):
    post-activation ``bn_1 .. bn_L`` then ``bn_s`` with a projection; pre-activation ``bn_0``
    (with ``entry_norm``) then ``bn_1 .. bn_{L-1}``. Convolutions: ``conv_1 .. conv_L`` then
    ``conv_s`` with a projection. No convolution has a bias.

    Post-activation blocks take more inputs beside this structure: a shortcut input the
    projection conv reads instead of x (ResNet-D's average-pooled x), a per-sample branch scale
    (stochastic depth) and a channel gate (:class:`ChannelGate`, SE/ECA), ``out =
    relu(bn_L(y_L)·gate[n, k]·scale[n] + shortcut)``, or between two convs (RegNetY).
    """

    convs: tuple[ConvParams, ...]  # main branch conv_1 .. conv_L
    shortcut: ConvParams | None  # projection conv_s (None: identity shortcut)
    preact: bool
    entry_norm: bool  # pre-activation only: bn_0 + ReLU on the block input
    eps: tuple[float, ...]  # per BatchNorm, in the order above

    @property
    def all_convs(self) -> tuple[ConvParams, ...]:
        return self.convs + (() if self.shortcut is None else (self.shortcut,))

    @property
    def num_norms(self) -> int:
        if self.preact:
            return len(self.convs) - 1 + int(self.entry_norm)
        return len(self.convs) + int(self.shortcut is not None)


class ChannelGate(Protocol):
    """A channel gate of a post-activation block (SE, ECA), computed by the caller between the
    backend's phases: ``gate[n, k] = G(pooled)`` with ``pooled[n, k]`` the spatial mean of the
    tensor ``a`` it multiplies. Where, :attr:`before_conv` says:

    - None: the last BN's output before the residual add (timm's SE/ECA ResNets), ``a =
      bn_L(y_L)`` and ``out = relu(a·gate[n, k]·scale[n] + shortcut)``;
    - i (1 ≤ i < L, 0-based into ``convs``): the input of main-branch conv i (RegNetY's SE
      between conv b and conv c), ``a = relu(bn(y))`` of the conv before it, which conv i reads
      as ``a·gate[n, k]``.

    Forward, the backend calls :meth:`forward` once with ``pooled``; backward, it reads
    :attr:`values` (what forward returned) and calls :meth:`backward` once with ``dgate[n, k] =
    Σ_hw da_g·a`` (da_g the gradient of the gated tensor: before the add, ``scale[n]·dz`` with dz
    the output's gradient through the final ReLU), getting ``dpooled``; ``a``'s gradient is then
    ``da_g·gate + dpooled/(H·W)``. Tensors are (N, K) in the block's accumulation dtype (fp32;
    fp64 for fp64 blocks on ``reference``).
    """

    values: Tensor | None
    before_conv: int | None

    def forward(self, pooled: Tensor) -> Tensor:
        """``gate`` (N, K) of ``pooled`` (N, K)."""

    def backward(self, dgate: Tensor) -> Tensor:
        """``dpooled`` (N, K) of ``dgate`` (N, K)."""
