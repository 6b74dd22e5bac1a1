"""The benchmark runner's order of work and time limit (what a short GPU session keeps)."""

from __future__ import annotations

import json
import time
from typing import ClassVar

import pytest

from fastres.benchmark import report, runner
from fastres.benchmark.roofline import Ceilings


class _FakeModelBench:
    """Stands in for ModelBench: records what was built, in order; "compile" never finishes."""

    built: ClassVar[list[tuple[str, str, str]]] = []

    def __init__(self, name, system, *, training, **kwargs):
        _FakeModelBench.built.append((name, "train" if training else "infer", system))
        self.source = "fake"
        self.inputs = [None]
        if system == "compile":
            time.sleep(60)  # a cold torch.compile that outlasts the whole budget

    def step(self):
        return lambda inp: time.sleep(0.001)


@pytest.fixture
def fake_models(monkeypatch):
    _FakeModelBench.built = []
    monkeypatch.setattr(runner, "ModelBench", _FakeModelBench)
    monkeypatch.setattr(runner, "_free", lambda device: None)  # a full gc takes ~1 s here
    monkeypatch.setattr(runner, "measure_ceilings",
                        lambda *a, **k: Ceilings(tflops=1.0, tbps=1.0, device="fake"))
    return _FakeModelBench


def test_fastres_and_eager_of_every_model_come_before_any_compile():
    config = runner.BenchConfig(models=["resnet50", "resnext50_32x4d"], modes=["train", "infer"])
    assert runner.model_work(config) == [
        ("resnet50", "train", "fastres"), ("resnet50", "train", "eager"),
        ("resnet50", "infer", "fastres"), ("resnet50", "infer", "eager"),
        ("resnext50_32x4d", "train", "fastres"), ("resnext50_32x4d", "train", "eager"),
        ("resnext50_32x4d", "infer", "fastres"), ("resnext50_32x4d", "infer", "eager"),
        ("resnet50", "train", "compile"), ("resnet50", "infer", "compile"),
        ("resnext50_32x4d", "train", "compile"), ("resnext50_32x4d", "infer", "compile"),
    ]


def test_a_slow_system_is_cut_off_and_fastres_results_are_written(fake_models, tmp_path):
    path = tmp_path / "results.json"
    config = runner.BenchConfig(models=["resnet50", "resnext50_32x4d"], modes=["train", "infer"],
                                layers=False, blocks=False, time_limit_s=6.0, device="cpu")
    for name in config.models:  # trace the roofline layers first (seconds on a cold start)
        runner._conv_layers(name, runner.tiny_cpu(runner.BenchConfig()).resolution)
    t0 = time.monotonic()
    results = runner.run(config, on_update=lambda r: report.write_json(r, path))
    took = time.monotonic() - t0
    assert took < 20, f"the time limit did not stop the slow system ({took:.0f} s)"
    # only the first compile was started; everything before it was measured
    assert fake_models.built == runner.model_work(config)[:9]
    on_disk = json.loads(path.read_text())
    for saved in (results, on_disk):
        by_key = {(e["model"], e["mode"]): e["systems"] for e in saved["models"]}
        for systems in by_key.values():
            assert systems["fastres"]["status"] == "ok"
            assert systems["eager"]["status"] == "ok"
            assert systems["fastres"]["first_call_s"] >= 0
            assert systems["compile"]["status"] == "skipped"
        cut = by_key["resnet50", "train"]["compile"]["reason"]
        assert "time limit reached after" in cut, cut
        assert by_key["resnet50", "infer"]["compile"]["reason"] == "time limit reached"
        assert all("speedup_vs_eager" in e for e in saved["models"])


def test_without_a_limit_nothing_is_interrupted(fake_models):
    with runner._Clock(None).enforced():
        time.sleep(0.01)
    clock = runner._Clock(5.0)
    with clock.enforced():
        time.sleep(0.01)
    assert not clock.expired()
    with pytest.raises(runner.TimeLimitReached), runner._Clock(0.05).enforced():
        time.sleep(5)


def test_layer_level_times_kernel_backends_on_cuda_not_reference():
    on_cuda = runner.BenchConfig(device="cuda")
    assert runner._layer_systems(on_cuda)[:2] == ["fastres-triton", "fastres-cuda"]
    assert "fastres-reference" not in runner._layer_systems(on_cuda)
    assert runner._layer_systems(runner.BenchConfig(device="cuda", backend="reference"))[0] == (
        "fastres-reference")
    assert runner._layer_systems(runner.BenchConfig(device="cpu"))[0] == "fastres-reference"


def test_block_systems_and_plan():
    assert runner._block_systems(runner.BenchConfig()) == ["fastres", "fastres-layer", "eager"]
    assert runner._block_systems(runner.BenchConfig(block_compile=True))[-1] == "compile"
    assert runner._block_systems(runner.BenchConfig(block_compile=True, compile=False)) == [
        "fastres", "fastres-layer", "eager"]
    tiny = runner.tiny_cpu(runner.BenchConfig(models=[], device="cpu"))
    work = runner.plan(tiny)
    assert [c.id.split("-c")[0] for c in work["blocks"]] == [
        "resnet50-layer1.0", "resnet50-layer1.1", "resnext50_32x4d-layer1.0",
        "resnext50_32x4d-layer1.1"]
    assert work["total"] == 4 * 3
    assert runner.plan(runner.tiny_cpu(runner.BenchConfig(
        models=[], device="cpu", block_limit=1)))["total"] == 2 * 3
    # the block level times training steps only
    assert runner.plan(runner.BenchConfig(models=[], modes=["infer"], device="cpu"))[
        "blocks"] == []


def test_block_level_runs_on_cpu_and_fills_its_entry(monkeypatch):
    """Tiny CPU configuration: one ResNeXt-50 block, every system measured, ratios, saved bytes
    and the traffic bounds filled in, the served ops per step recorded."""
    monkeypatch.setattr(runner, "measure_ceilings",
                        lambda *a, **k: Ceilings(tflops=1.0, tbps=0.5, device="fake"))
    config = runner.BenchConfig(models=[], modes=["train"], block_models=["resnext50_32x4d"],
                                block_limit=1, device="cpu")
    labels = []
    results = runner.run(config, progress=labels.append)
    assert results["layers"] == [] and results["models"] == []
    (entry,) = results["blocks"]
    assert entry["block"] == "layer1.0" and entry["projection"] and entry["mode"] == "train"
    assert labels[1:] == [f"{entry['id']} train {s}" for s in ("fastres", "fastres-layer",
                                                               "eager")]
    systems = entry["systems"]
    for name in ("fastres", "fastres-layer", "eager"):
        s = systems[name]
        assert s["status"] == "ok", s
        assert s["ms_per_step"] == pytest.approx(s["median_s"] * 1e3)
        assert s["saved_bytes"] > 0 and s["saved_bytes_vs_eager"] > 0
        assert s["time_vs_eager"] > 0
    assert systems["fastres"]["served_per_step"] == {
        "backward": {"reference residual_block": 1}, "forward": {"reference residual_block": 1}}
    assert systems["fastres-layer"]["served_per_step"] == {
        "backward": {"reference conv_bn_relu": 4}, "forward": {"reference conv_bn_relu": 4}}
    assert "served_per_step" not in systems["eager"]
    assert entry["saved_bytes_vs_eager"] == systems["fastres"]["saved_bytes_vs_eager"] < 1
    assert entry["speedup_vs_eager"] > 0 and entry["speedup_vs_fastres-layer"] > 0
    designs = entry["traffic"]["designs"]
    assert designs["eager"]["bound_ms"] > designs["per_layer"]["bound_ms"] > designs[
        "block"]["bound_ms"] > 0
    assert designs["block"]["bound_ms"] == pytest.approx(designs["block"]["gb_per_step"] / 0.5)
    assert "Block level" in report.summary_text(results)


def test_block_level_after_the_time_limit_is_skipped(monkeypatch):
    monkeypatch.setattr(runner, "measure_ceilings",
                        lambda *a, **k: Ceilings(tflops=1.0, tbps=1.0, device="fake"))
    config = runner.BenchConfig(models=[], modes=["train"], block_models=["resnet50"],
                                block_limit=1, device="cpu", time_limit_s=0.0)
    (entry,) = runner.run(config)["blocks"]
    assert {s["status"] for s in entry["systems"].values()} == {"skipped"}
    assert entry["traffic"]["designs"]["block"]["gb_per_step"] > 0


def test_blocks_run_after_fastres_and_eager_and_before_any_compile(fake_models, monkeypatch):
    at = []
    monkeypatch.setattr(runner, "_run_blocks",
                        lambda cases, *a, **k: at.append(list(fake_models.built)))
    config = runner.BenchConfig(models=["resnet50"], modes=["train"], block_limit=1,
                                time_limit_s=4.0, device="cpu")
    runner.run(config)
    assert at == [[("resnet50", "train", "fastres"), ("resnet50", "train", "eager")]]
    assert fake_models.built[-1] == ("resnet50", "train", "compile")  # started after, and cut
