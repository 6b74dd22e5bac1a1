"""What a fused block runs on the Triton backend: the kernel launches of one block forward and
backward, by name (no standalone BN-apply or dBN pass inside a block, one join pass), and no
PyTorch convolution or batch norm at all. (Equivalence: tests/ops/test_block.py.)"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import fastres
from fastres.nn import Bottleneck, PreActBottleneck
from tests.backends.test_triton_conv_bwd import FORBIDDEN, _profiled_training_step
from tests.models._util import randomize_bn

CL = torch.channels_last


class _Launches:
    """Names of the Triton kernels launched (interpreted or compiled) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        from triton.runtime import interpreter, jit

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._wrap(cls.run))

    def _wrap(self, run):
        def recorded(fn_self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                self.names.append(fn_self.fn.__name__)
            return run(fn_self, *args, **kwargs)

        return recorded

    def take(self) -> collections.Counter:
        counted = collections.Counter(self.names)
        self.names.clear()
        return counted


def _step(block: nn.Module, x: torch.Tensor, launches: _Launches):
    with fastres.use_backend("triton"):
        out = block(x)
        forward = launches.take()
        out.backward(torch.randn_like(out))
        return forward, launches.take()


# Standalone passes over activations that may not run inside a block: BN apply, the backward
# reductions and dx (each allowed once where the branches join), the statistics of a tensor.
STANDALONE = ("_bn_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_dx_kernel", "_bn_stats_kernel")


def _standalone(counted: collections.Counter) -> dict[str, int]:
    return {k: counted[k] for k in STANDALONE if counted[k]}


CASES = {
    # (block, input channels): expected standalone passes (forward, backward) and launches
    "bottleneck-proj": (lambda: Bottleneck(16, 8, stride=2), 16,
                        {"_bn_apply_kernel": 1}, {"_bn_bwd_reduce_kernel": 1}),
    "preact-bottleneck-proj": (lambda: PreActBottleneck(16, 8, stride=2), 16,
                               {"_bn_stats_kernel": 1}, {"_bn_bwd_dx_kernel": 1}),
}


@pytest.mark.parametrize("name", CASES)
def test_block_runs_one_join_pass_and_no_standalone_bn(name: str, monkeypatch) -> None:
    """Forward: every BN + ReLU is applied in the next conv's prologue and the statistics come
    from the conv epilogues, so the only pass over an activation that is not a conv is the join
    (post-activation: the dual scale-bias-add-ReLU; pre-activation: the entry statistics).
    Backward: dReLU + dBN in the dgrad epilogues, one join pass. On the per-layer path the same
    block runs one BN pass per conv each way, which this test tells apart."""
    make, cin, want_fwd, want_bwd = CASES[name]
    block = randomize_bn(make()).train()
    x = torch.randn(2, cin, 7, 7).contiguous(memory_format=CL).requires_grad_()
    launches = _Launches(monkeypatch)
    forward, backward = _step(block, x, launches)
    assert _standalone(forward) == want_fwd, forward
    assert _standalone(backward) == want_bwd, backward
    convs = 4  # three on the main branch, the projection
    assert forward["_conv_gemm_kernel"] + forward["_conv_direct_kernel"] == convs, forward
    # per conv: wgrad + its chunk sum; a dgrad for each conv whose input gradient is needed
    assert backward["_wgrad_gemm_kernel"] + backward["_wgrad_direct_kernel"] == convs
    assert backward["_dgrad_gemm_kernel"] + backward["_dgrad_direct_kernel"] == convs
    # bounded: convs, per-BN finalize / affine maps of (K,) vectors, partial sums, the join
    assert sum(forward.values()) <= 2 * convs + 2, forward
    assert sum(backward.values()) <= 5 * convs + 3, backward

    # the per-layer path of the same block: a standalone BN pass per conv (the test can fail)
    with fastres.nn.layer_by_layer():
        forward, backward = _step(block, x, launches)
    assert forward["_bn_apply_kernel"] >= 2 and backward["_bn_bwd_reduce_kernel"] >= 2


def _tiny_preact() -> nn.Module:
    """fastres pre-activation blocks at interpreter widths: a conv + BN + ReLU stem, an identity
    bottleneck, a stride-2 bottleneck with its projection on the activated input."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        PreActBottleneck(16, 4), PreActBottleneck(16, 8, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_preact_training_step_runs_no_pytorch_convolution_or_batch_norm() -> None:
    """A pre-activation net's step on the triton backend, seen by the profiler (which sees aten
    calls inside custom ops): blocks run as block ops, and no PyTorch conv or BN runs at all
    (post-activation models: test_triton_conv_bwd's fused-training-step test)."""
    model = fastres.fuse(randomize_bn(_tiny_preact()).train())
    with fastres.backends.record_calls() as served:
        names = _profiled_training_step(model, torch.randn(2, 3, 9, 9))
    assert [c.op for c in served].count("residual_block") == 4  # 2 blocks, forward + backward
    hit = sorted(n for n in names if any(f in n for f in FORBIDDEN))
    assert not hit, f"PyTorch ran {hit}"
