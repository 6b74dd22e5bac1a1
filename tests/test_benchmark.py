"""The benchmark library: formulas, layer extraction, timing, and that each system computes the
same function (a benchmark comparing different functions would be meaningless)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fastres.benchmark import cases, report, roofline, timing
from fastres.benchmark.env import card_slug, environment
from fastres.benchmark.roofline import Ceilings, ConvShape, Epilogue, conv_flops, conv_min_bytes

# the layer shapes are read off torchvision's definitions (the formulas need nothing)
needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="needs torchvision"
)

# ---------------------------------------------------------------------------------------------
# FLOPs and bytes, checked by hand
# ---------------------------------------------------------------------------------------------

# 2 images, 4 → 6 channels, 3×3, padding 1, 5×5: output 2×6×5×5
SMALL = ConvShape(n=2, c=4, h=5, w=5, k=6, r=3, s=3, padding=(1, 1))


def test_conv_flops_by_hand():
    assert SMALL.out_hw == (5, 5)
    # 2 · (2·5·5 output positions) · 6 out channels · (4·3·3 reduction) = 21 600
    assert conv_flops(SMALL) == 21_600
    assert conv_flops(SMALL, training=True) == 3 * 21_600  # + dgrad + wgrad
    assert conv_flops(SMALL, training=True, input_grad=False) == 2 * 21_600
    grouped = ConvShape(n=2, c=4, h=5, w=5, k=6, r=3, s=3, padding=(1, 1), groups=2)
    assert conv_flops(grouped) == 10_800  # each output sees C/g = 2 channels


def test_conv_min_bytes_by_hand():
    # elements: x 2·4·25 = 200, w 6·4·9 = 216, z 2·6·25 = 300; bf16 = 2 bytes
    assert conv_min_bytes(SMALL, Epilogue(), 2) == (200 + 216 + 300) * 2
    assert conv_min_bytes(SMALL, Epilogue(residual=True), 2) == (200 + 216 + 300 + 300) * 2
    # training: forward 716; backward reads dz, z, x, w (300+300+200+216), writes dw, dx (216+200)
    assert conv_min_bytes(SMALL, Epilogue(), 2, training=True) == (716 + 1432) * 2
    # no dx written for the stem
    assert conv_min_bytes(SMALL, Epilogue(), 4, training=True, input_grad=False) == (
        716 + 1232) * 4
    # residual in training: read it forward, write its gradient backward
    assert conv_min_bytes(SMALL, Epilogue(residual=True), 2, training=True) == (
        1016 + 1432 + 300) * 2


def test_stride_and_output_size():
    stem = ConvShape(n=1, c=3, h=224, w=224, k=64, r=7, s=7, stride=(2, 2), padding=(3, 3))
    assert stem.out_hw == (112, 112)
    # 2 · 112² · 64 · 3 · 49
    assert conv_flops(stem) == 2 * 112 * 112 * 64 * 3 * 49


def test_roofline_bound_and_fractions():
    ceil = Ceilings(tflops=100.0, tbps=2.0)
    # 1e12 FLOPs → 10 ms of arithmetic; 1e9 bytes → 0.5 ms of memory: compute-bound
    assert ceil.bound_seconds(1e12, 1e9) == pytest.approx(0.01)
    got = roofline.achieved(1e12, 1e9, 0.02, ceil)
    assert got["tflops"] == pytest.approx(50.0)
    assert got["tbps"] == pytest.approx(0.05)
    assert got["frac_peak_tflops"] == pytest.approx(0.5)
    assert got["frac_roofline"] == pytest.approx(0.5)
    assert got["bound_by"] == "compute"
    assert roofline.achieved(1e6, 4e9, 0.004, ceil)["bound_by"] == "memory"


# ---------------------------------------------------------------------------------------------
# Layer shapes read off the architectures
# ---------------------------------------------------------------------------------------------


@needs_torchvision
def test_resnet50_distinct_conv_shapes():
    """ResNet-50 (torchvision, stride on the 3×3) has 23 distinct conv shapes:
    stem 1; layer1 4 (64→64 1×1, 64→64 3×3, 64→256 1×1, which the downsample shares, 256→64);
    layers 2, 3, 4 six each (conv1 of block 0, strided 3×3, conv3, strided downsample,
    conv1 of later blocks, unstrided 3×3)."""
    layers = cases.model_conv_layers("resnet50", batch=256, resolution=224)
    assert len(layers) == 53
    found = cases.distinct_layer_cases(layers, "resnet50")
    assert len(found) == 23
    assert sum(len(c.layers) for c in found) == 53
    assert all(c.shape.n == 256 for c in found)
    stem = found[0]
    assert stem.shape.key() == (3, 224, 224, 64, 7, 7, (2, 2), (3, 3), (1, 1), 1)
    assert not stem.input_grad
    by_name = {layer.name: layer for layer in layers}
    assert by_name["layer1.0.conv3"].epilogue == Epilogue(residual=True, relu=True)
    assert by_name["layer1.0.downsample.0"].epilogue == Epilogue(residual=False, relu=False)
    assert by_name["layer1.0.conv1"].epilogue == Epilogue(residual=False, relu=True)
    assert all(layer.has_bn for layer in layers)


@needs_torchvision
def test_resnext50_distinct_conv_shapes():
    """ResNeXt-50 32x4d has 24: as ResNet-50, except that layer1's downsample (64→256) no
    longer matches conv3 (128→256), and every 3×3 is grouped (32 groups)."""
    found = cases.layer_cases("resnext50_32x4d", batch=8, resolution=224)
    assert len(found) == 24
    grouped = [c for c in found if c.shape.groups > 1]
    assert len(grouped) == 7 and all(c.shape.groups == 32 and c.shape.r == 3 for c in grouped)


@needs_torchvision
@pytest.mark.parametrize(
    "name, gmac, mega_outputs",
    [("resnet50", 4.09, 11.1), ("resnext50_32x4d", 4.23, 14.4), ("wide_resnet50_2", 11.4, 14.4)],
)
def test_model_work_matches_published_figures(name, gmac, mega_outputs):
    """Per-image conv MACs and conv output elements against DESIGN.md section 6."""
    layers = cases.model_conv_layers(name, batch=1, resolution=224)
    assert sum(conv_flops(layer.shape) for layer in layers) / 2e9 == pytest.approx(gmac, rel=5e-3)
    assert sum(layer.shape.z_elems for layer in layers) / 1e6 == pytest.approx(
        mega_outputs, rel=5e-3)


@needs_torchvision
def test_resnet50_roofline_matches_design_estimate():
    """At the H100 ceilings of DESIGN.md section 6 (800 TFLOP/s, 3.0 TB/s), ResNet-50's per-layer
    bound is ~46 k img/s inference and ~15 k training; weights amortise over batch 256."""
    layers = cases.model_conv_layers("resnet50", batch=1, resolution=224)
    ceil = Ceilings(tflops=800.0, tbps=3.0)
    infer = cases.model_roofline(layers, training=False, dtype=torch.bfloat16, batch=256)
    train = cases.model_roofline(layers, training=True, dtype=torch.bfloat16, batch=256)
    assert cases.roofline_img_s(infer, ceil) == pytest.approx(46_000, rel=0.1)
    assert 13_000 < cases.roofline_img_s(train, ceil) < 18_000
    assert train["flops_per_image"] == pytest.approx(3 * infer["flops_per_image"], rel=0.01)
    # at batch 1 the weights (23.45 M conv parameters, bf16) are read for every image
    single = cases.model_roofline(layers, training=False, dtype=torch.bfloat16, batch=1)
    assert single["bytes_per_image"] - infer["bytes_per_image"] == pytest.approx(
        2 * 23.45e6 * (1 - 1 / 256), rel=0.02)


@needs_torchvision
def test_quick_cases_pick_a_3x3_and_a_residual():
    picked = cases.quick_layer_cases(cases.layer_cases("resnet50", 2, 32))
    assert len(picked) == 2
    assert picked[0].shape.r == 3
    assert picked[1].epilogue.residual


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def test_time_calls_rotates_inputs_and_reports_median():
    seen = []
    t = timing.time_calls(seen.append, ["a", "b", "c"], torch.device("cpu"), warmup=2, repeats=5)
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]
    assert t.repeats == 5 and t.copies == 3 and t.timer == "perf_counter"
    assert len(t.samples_s) == 5
    assert t.min_s <= t.median_s <= t.max_s


def test_copies_to_defeat_l2_on_cpu_is_one():
    assert timing.copies_to_defeat_l2(10**6, torch.device("cpu")) == 1


def test_cpu_ceilings_are_positive_and_finite():
    ceil = timing.measure_ceilings(torch.device("cpu"), torch.bfloat16)
    assert ceil.device == "cpu" and ceil.dtype == "float32"
    assert 0 < ceil.tflops < math.inf and 0 < ceil.tbps < math.inf


# ---------------------------------------------------------------------------------------------
# Every system computes the same function
# ---------------------------------------------------------------------------------------------


@needs_torchvision
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_layer_systems_agree(training):
    case = cases.quick_layer_cases(cases.layer_cases("resnet50", 2, 32))[1]  # has a residual
    bench = cases.LayerBench(case, training=training, dtype=torch.float32,
                             device=torch.device("cpu"))
    assert bench.copies == 1
    inp = bench.inputs[0]
    # the running statistics change in training: compare from the same starting point
    mean0, var0 = bench.mean.clone(), bench.var.clone()
    eager = bench.eager()(inp)
    bench.mean.copy_(mean0)
    bench.var.copy_(var0)
    assert bench.fused_unavailable("reference") is None
    assert "interpreter" in bench.fused_unavailable("triton")
    fused = bench.fused("reference")(inp)
    if training:
        assert len(eager) == len(fused) == 5  # weight, gamma, beta, x, residual
        for a, b in zip(eager, fused):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(eager, fused, rtol=1e-4, atol=1e-4)


@needs_torchvision
def test_model_bench_step_runs_on_cpu():
    bench = cases.ModelBench("resnet18", "eager", training=True, batch=2, resolution=32,
                             dtype=torch.bfloat16, device=torch.device("cpu"))
    assert bench.source == "torchvision"
    before = next(bench.model.parameters()).detach().clone()
    loss = bench.step()(bench.inputs[0])
    assert torch.isfinite(loss)
    assert not torch.equal(before, next(bench.model.parameters()))  # SGD stepped


# ---------------------------------------------------------------------------------------------
# Report and environment
# ---------------------------------------------------------------------------------------------


def test_render_table_plain_text():
    text = report.render_table("T", ["model", "mode", "img/s"], [["resnet50", "train", "1,234"]])
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["model", "mode", "img/s"]
    assert lines[3].endswith("1,234")


def test_environment_record():
    env = environment()
    for key in ("date_utc", "python", "torch", "torch_cuda", "triton", "fastres",
                "fastres_commit", "gpu", "driver"):
        assert key in env
    assert env["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert env["gpu"] is None and card_slug(env) == "cpu"
    assert card_slug({"gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "nvidia-h100-80gb-hbm3"


# ---------------------------------------------------------------------------------------------
# bench/ scripts
# ---------------------------------------------------------------------------------------------


def test_gpu_check_script_parses():
    import pathlib
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sanitizer_script_dry_run(tmp_path):
    """The memcheck driver's own logic, on CPU: expected outputs written, then checked."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "sanitize_cuda.py"
    expected = tmp_path / "expected.pt"
    done = subprocess.run([sys.executable, str(script), "--dry-run", str(expected)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "expected outputs of 8 calls" in done.stdout
    assert "8 calls ran on the reference backend, 0 mismatched" in done.stdout
    assert expected.stat().st_size > 0


@needs_torchvision
def test_suite_params_put_baselines_first(monkeypatch):
    from fastres.benchmark import suite

    monkeypatch.setenv("FASTRES_BENCH_COMPILE_MODES", "default,max-autotune")
    cfg = suite.suite_config()
    if not cfg.tiny:
        pytest.skip("checks the CPU configuration")
    params = suite.layer_params(cfg)
    # CPU: one shape per model, both modes, eager + 2 compile modes + 3 backends
    assert len(params) == 2 * 2 * 6
    for i in range(0, len(params), 6):
        assert [s for _, _, s in params[i:i + 6]] == [
            "eager", "compile-default", "compile-max-autotune", "fastres-reference",
            "fastres-triton", "fastres-cuda"]
    assert suite.model_params(cfg)[:3] == [("resnet18", "train", "eager"),
                                           ("resnet18", "train", "compile"),
                                           ("resnet18", "train", "fastres")]


def test_summary_text_from_results():
    results = {
        "models": [{"model": "resnet50", "mode": "train", "roofline_img_s": 15000.0,
                    "speedup_vs_eager": 1.5,
                    "systems": {"fastres": {"status": "ok", "img_s": 3000.0,
                                            "frac_roofline": 0.2},
                                "eager": {"status": "ok", "img_s": 2000.0},
                                "compile": {"status": "skipped"}}}],
        "layers": [{"model": "resnet50", "mode": "infer", "best_fastres": "fastres-triton",
                    "speedup_vs_eager": 2.0, "speedup_vs_compile-default": 0.5,
                    "systems": {"fastres-triton": {"status": "ok", "frac_roofline": 0.4}}},
                   {"model": "resnet50", "mode": "infer", "best_fastres": "fastres-triton",
                    "speedup_vs_eager": 8.0,
                    "systems": {"fastres-triton": {"status": "ok", "frac_roofline": 0.6}}}],
        "ceilings": {"device": "x", "tflops": 800.0, "tbps": 3.0},
    }
    text = report.summary_text(results)
    assert "3,000" in text and "2,000" in text and "skipped" in text and "1.50x" in text
    assert "15,000" in text
    assert text.count(" - ") >= 3  # no saved-bytes ratio or traffic model in this entry
    results["models"][0] |= {
        "saved_bytes_vs_eager": 1.0696,
        "traffic": {"batch": 256, "dtype": "bfloat16", "tbps": 4.3, "designs": {
            "eager": {"gb_per_step": 120.3, "img_s_bound": 9151.0},
            "per_layer": {"gb_per_step": 95.5, "img_s_bound": 11527.0},
            "block": {"gb_per_step": 71.2, "img_s_bound": None}}}}
    header, rows = report.model_rows(results)
    cells = dict(zip(header, rows[0]))
    assert cells["saved/eager"] == "1.070x"
    assert cells["GB/step e/l/b"] == "120/95.5/71.2"
    assert cells["mem-bound img/s e/l/b"] == "9,151/11,527/-"
    layer_line = next(line for line in text.splitlines() if line.startswith("resnet50  infer"))
    assert layer_line.split()[2:] == ["2", "4.00x", "0.50x", "50.0%"]  # geomean of 2 and 8


# ---------------------------------------------------------------------------------------------
# Block level
# ---------------------------------------------------------------------------------------------


@needs_torchvision
def test_block_cases_one_projection_and_one_identity_block_per_stage():
    found = cases.block_cases("resnet50", batch=64, resolution=224)
    assert [c.path for c in found] == [f"layer{s}.{i}" for s in range(1, 5) for i in (0, 1)]
    assert [c.projection for c in found] == [True, False] * 4
    assert [c.x_shape for c in found] == [
        (64, 64, 56, 56), (64, 256, 56, 56), (64, 256, 56, 56), (64, 512, 28, 28),
        (64, 512, 28, 28), (64, 1024, 14, 14), (64, 1024, 14, 14), (64, 2048, 7, 7)]
    assert [layer.name.rsplit(".", 1)[-1] for layer in found[2].layers] == [
        "conv1", "conv2", "conv3", "0"]  # the projection last
    assert found[2].label() == "layer2.0 256→512 56x56 s2 proj"
    assert found[2].id == "resnet50-layer2.0-c256-56x56-proj"
    rx = cases.block_cases("resnext50_32x4d", batch=2, resolution=224)
    assert rx[1].label() == "layer1.1 256→256 56x56 g32 id"
    assert [c.path for c in cases.quick_block_cases(rx)] == ["layer1.0", "layer1.1"]


@needs_torchvision
@pytest.mark.parametrize("path", ["layer2.0", "layer2.1"])
def test_block_systems_compute_the_same_step(path):
    """eager, the fastres block op and the same fastres block layer by layer: the same
    gradients (input and every parameter) of a training step, from the same weights; each
    fastres system runs the op it says."""
    from fastres import backends

    case = next(c for c in cases.block_cases("resnext50_32x4d", 2, 64) if c.path == path)
    bench = cases.BlockBench(case, dtype=torch.float32, device=torch.device("cpu"))
    assert bench.copies == 1
    inp = bench.inputs[0]
    grads, ops = {}, {}
    for system in ("eager", "fastres", "fastres-layer"):
        with backends.record_calls() as served:
            grads[system] = bench.system(system)(inp)
        ops[system] = {(c.direction, c.op) for c in served}
    assert ops["eager"] == set()
    assert ops["fastres"] == {("forward", "residual_block"), ("backward", "residual_block")}
    assert ops["fastres-layer"] == {("forward", "conv_bn_relu"), ("backward", "conv_bn_relu")}
    n_params = len(list(bench.eager_block.parameters()))
    for system in ("fastres", "fastres-layer"):
        assert len(grads[system]) == len(grads["eager"]) == 1 + n_params
        for a, b in zip(grads[system], grads["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # the block op keeps less for backward than eager; layer by layer it keeps more
    saved = {s: bench.saved_bytes(s) for s in ("eager", "fastres", "fastres-layer")}
    assert saved["fastres"] < saved["eager"] <= saved["fastres-layer"]
    assert bench.saved_bytes("compile") is None


def test_block_rows_and_summary_from_results():
    results = {"blocks": [{
        "model": "resnet50", "label": "layer1.0 64→256 56x56 proj", "mode": "train",
        "speedup_vs_eager": 1.25, "speedup_vs_fastres-layer": 1.5, "saved_bytes_vs_eager": 0.8,
        "traffic": {"designs": {"eager": {"bound_ms": 2.0}, "per_layer": {"bound_ms": 1.5},
                                "block": {"bound_ms": 1.0}}},
        "systems": {
            "fastres": {"status": "ok", "ms_per_step": 4.0, "served_per_step": {
                "forward": {"triton residual_block": 1}, "backward": {"triton residual_block": 1}}},
            "fastres-layer": {"status": "ok", "ms_per_step": 6.0, "time_vs_eager": 1.2,
                              "saved_bytes_vs_eager": 1.1},
            "eager": {"status": "ok", "ms_per_step": 5.0}}}]}
    header, rows = report.block_rows(results)
    cells = dict(zip(header, rows[0]))
    assert "compile ms" not in cells
    assert cells["block"] == "R50 layer1.0 64→256 56x56 proj"
    assert (cells["fastres ms"], cells["fr-layer ms"], cells["eager ms"]) == ("4", "6", "5")
    assert (cells["vs eager"], cells["layer vs eager"], cells["vs layer"]) == (
        "1.25x", "0.83x", "1.50x")
    assert cells["fastres served by"] == "triton residual_block 1+1"
    assert (cells["saved/eager"], cells["layer saved/eager"]) == ("0.800x", "1.100x")
    assert cells["bound ms e/l/b"] == "2/1.5/1"
    text = report.summary_text(results)
    assert "Block level" in text
    line = next(x for x in text.splitlines() if x.startswith("resnet50  1"))
    assert line.split()[2:] == ["1.25x", "0.83x", "1.50x", "0.800x"]
    results["blocks"][0] |= {"batch": 128, "dtype": "bf16"}
    assert report.block_headline(results) == (
        "block step (forward + backward of one block; geometric mean of 1 block, batch 128, "
        "bf16): fastres block op 1.25x eager, 1.50x the same blocks layer by layer; layer by "
        "layer 0.83x eager; saved for backward 0.800x eager; fastres served by triton "
        "residual_block")
    assert report.block_headline({"blocks": []}) is None
