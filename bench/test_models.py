"""Model level: img/s of a training step (forward, backward, SGD) and of inference, fastres vs
eager (channels_last, autocast) vs torch.compile, for the five models (resnet18 only on CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")

from conftest import config

from fastres.benchmark.suite import model_params, timed_model

PARAMS = model_params(config())


@pytest.mark.parametrize("name, mode, system", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_model(benchmark, suite, card_ceilings, name, mode, system):
    benchmark.group = f"{name}-{mode}"
    info = timed_model(benchmark, name, mode, system, suite, card_ceilings)
    assert info["roofline_img_s"] > 0
    if mode == "train":
        assert info["traffic"]["designs"]["block"]["gb_per_step"] > 0
        if system != "compile":
            assert info["saved_bytes"] > 0
