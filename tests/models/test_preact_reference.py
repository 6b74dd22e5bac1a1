"""Pre-activation and CIFAR models against the papers' architecture, written here independently.

He et al. 2016 ("Identity Mappings in Deep Residual Networks"; fb.resnet.torch's preresnet) and
Zagoruyko & Komodakis 2016 (Wide ResNet): stem conv (7×7/2 + BN + ReLU + 3×3/2 max-pool on
ImageNet; 3×3 on CIFAR), then per stage blocks whose residual branch is BN-ReLU-conv units; the
first block of a stage applies its BN-ReLU before the split, so a projection shortcut sees the
activated input (on stage 1 the stem's BN-ReLU is that activation), the others keep the raw
input on the identity path; the net ends in BN, ReLU, global average pool, fc. Strides sit on
the basic block's first conv and the bottleneck's 3×3. The definition below reads the model's
tensors by their keys and uses every one of them, so structure (which BN, which conv, which
pool) and outputs are checked, in eval, by the error-ratio rule. Needs no torchvision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastres import models
from tests.models._util import randomize_bn
from tests.numerics import assert_close_ratio


class _Params:
    """The state dict, with a record of the keys read."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def has(self, key: str) -> bool:
        return f"{key}.weight" in self.state

    def conv(self, key: str, x: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w = self.state[f"{key}.weight"]
        self.used.add(f"{key}.weight")
        return F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)

    def bn_relu(self, key: str, x: torch.Tensor) -> torch.Tensor:
        names = ("running_mean", "running_var", "weight", "bias")
        self.used.update(f"{key}.{n}" for n in (*names, "num_batches_tracked"))
        return F.relu(F.batch_norm(x, *(self.state[f"{key}.{n}"] for n in names), False, 0.0,
                                   1e-5))


def preact_reference(state: dict[str, torch.Tensor], x: torch.Tensor, *, imagenet: bool,
                     bottleneck: bool, stages: int, groups: int = 1) -> torch.Tensor:
    p = _Params(state)
    x = p.bn_relu("bn1", p.conv("conv1", x, stride=2 if imagenet else 1))
    if imagenet:
        x = F.max_pool2d(x, 3, 2, 1)
    for i in range(1, stages + 1):
        j = 0
        while p.has(f"layer{i}.{j}.conv1"):
            b = f"layer{i}.{j}"
            stride = 2 if i > 1 and j == 0 else 1
            a = p.bn_relu(f"{b}.bn1", x) if p.has(f"{b}.bn1") else x
            shortcut = p.conv(f"{b}.downsample", a, stride) if p.has(f"{b}.downsample") else x
            if bottleneck:
                h = p.bn_relu(f"{b}.bn2", p.conv(f"{b}.conv1", a))
                h = p.bn_relu(f"{b}.bn3", p.conv(f"{b}.conv2", h, stride, groups))
                h = p.conv(f"{b}.conv3", h)
            else:
                h = p.bn_relu(f"{b}.bn2", p.conv(f"{b}.conv1", a, stride))
                h = p.conv(f"{b}.conv2", h)  # (WRN's dropout sits before it: identity in eval)
            x = h + shortcut
            j += 1
        assert j > 0, f"stage {i} has no blocks"
    x = p.bn_relu("bn_final", x).mean((2, 3))
    p.used.update(("fc.weight", "fc.bias"))
    out = F.linear(x, state["fc.weight"], state["fc.bias"])
    unused = set(state) - p.used
    assert not unused, f"tensors the papers' architecture has no place for: {sorted(unused)}"
    return out


# name, factory kwargs, input size, reference options
CASES = [
    ("preact_resnet18", {"base_channels": 8}, 16, dict(imagenet=True, bottleneck=False, stages=4)),
    ("preact_resnet50", {"base_channels": 4}, 32, dict(imagenet=True, bottleneck=True, stages=4)),
    ("wrn28_10", {"base_channels": 2, "dropout": 0.3}, 8,
     dict(imagenet=False, bottleneck=False, stages=3)),
    ("preact_resnet164", {"base_channels": 2}, 8, dict(imagenet=False, bottleneck=True, stages=3)),
]


@pytest.mark.parametrize("name, kwargs, size, arch", CASES, ids=[c[0] for c in CASES])
def test_matches_the_papers_architecture(name: str, kwargs: dict, size: int, arch: dict) -> None:
    model = randomize_bn(getattr(models, name)(num_classes=7, **kwargs)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        state = model.state_dict()
        base = preact_reference(state, x, **arch)
        ref = preact_reference({k: v.double() for k, v in state.items()}, x.double(), **arch)
    assert out.shape == (2, 7)
    assert_close_ratio(name, out, ref, base)


def test_block_counts_are_the_papers() -> None:
    """Depth 28 = 6n + 4 (WRN, n = 4 basic blocks a stage); 164 = 9n + 2 (n = 18 bottlenecks)."""
    for name, per_stage in (("wrn28_10", 4), ("preact_resnet164", 18), ("preact_resnet1001", 111)):
        with torch.device("meta"):
            model = getattr(models, name)()
        assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [per_stage] * 3, name
        assert not hasattr(model, "layer4") or model.layer4 is None
