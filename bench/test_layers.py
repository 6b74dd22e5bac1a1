"""Layer level: every distinct conv shape of ResNet-50 and ResNeXt-50 (a tiny subset on CPU):
eager conv+BN+ReLU(+add), torch.compile of it, and fastres on each backend; inference and
training (forward + backward)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")  # the architectures the shapes are read from

from conftest import config

from fastres.benchmark.suite import layer_params, timed_layer

PARAMS = layer_params(config())


@pytest.mark.parametrize(
    "case, mode, system", PARAMS, ids=[f"{c.id}-{m}-{s}" for c, m, s in PARAMS]
)
def test_layer(benchmark, suite, card_ceilings, case, mode, system):
    benchmark.group = f"{case.id}-{mode}"
    info = timed_layer(benchmark, case, mode, system, suite, card_ceilings)
    assert info["flops"] > 0
