"""Block level: a training step (forward + backward, no optimizer) of single residual blocks of
ResNet-50 and ResNeXt-50 (per stage the projection block and an identity one; one block on
CPU): eager torchvision block, torch.compile of it (``FASTRES_BENCH_BLOCK_COMPILE=1``), the
same fastres block layer by layer (``fastres.nn.layer_by_layer``), and the fastres block op."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")

from conftest import config

from fastres.benchmark.suite import block_params, timed_block

PARAMS = block_params(config())


@pytest.mark.parametrize("case, system", PARAMS, ids=[f"{c.id}-{s}" for c, s in PARAMS])
def test_block(benchmark, suite, card_ceilings, case, system):
    benchmark.group = f"{case.id}-train"
    info = timed_block(benchmark, case, system, suite, card_ceilings)
    assert info["traffic"]["designs"]["block"]["gb_per_step"] > 0
    if system != "compile":
        assert info["saved_bytes"] > 0
