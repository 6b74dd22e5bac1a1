"""``fastres info`` and ``fastres bench`` on a machine without a GPU (tiny CPU configuration)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from fastres import cli
from fastres.benchmark.runner import CPU_BANNER, SCHEMA

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="needs torchvision"
)
NO_GPU = not torch.cuda.is_available()


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastres", "torch", "triton", "CUDA", "GPU"):
        assert word in out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    notes = ("backward:", "blocks:")
    rows = {line.split()[0]: line for line in lines if not line.lstrip().startswith(notes)}
    assert set(rows) == {"reference", "triton", "cuda"}
    backward = [line.strip() for line in lines if line.lstrip().startswith("backward:")]
    assert len(backward) == 3 and "PyTorch's convolution backward" in backward[2]
    blocks = [line.strip() for line in lines if line.lstrip().startswith("blocks:")]
    assert len(blocks) == 3 and "layer by layer" in blocks[2]
    assert "available" in rows["reference"] and "unavailable" not in rows["reference"]
    if NO_GPU:
        assert "GPU      none" in out
        assert "interpreter" in rows["triton"] or "unavailable" in rows["triton"]


def test_info_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "fastres.cli", "info"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "reference" in done.stdout


@needs_torchvision
@pytest.mark.skipif(not NO_GPU, reason="checks the CPU configuration")
def test_bench_quick_cpu_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--quick", "--no-compile", "--layers", "--model", "resnet18",
                     "--model", "resnet50", "--out", str(out), "--strict"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert CPU_BANNER in printed
    assert (out / "results.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())

    assert results["schema"] == SCHEMA
    assert results["cpu_only"] is True and results["note"] == CPU_BANNER
    env = results["environment"]
    for key in ("date_utc", "torch", "triton", "fastres", "fastres_commit", "gpu", "driver"):
        assert key in env
    assert results["ceilings"]["tflops"] > 0 and results["ceilings"]["tbps"] > 0
    cfg = results["config"]
    assert cfg["batch"] == 2 and cfg["resolution"] == 32 and cfg["compile"] is False

    # tiny CPU configuration: one model, both modes, eager and fastres
    assert [(e["model"], e["mode"]) for e in results["models"]] == [
        ("resnet18", "train"), ("resnet18", "infer")]
    for entry in results["models"]:
        assert set(entry["systems"]) == {"eager", "fastres"}
        for system in entry["systems"].values():
            assert system["status"] == "ok"
            assert system["img_s"] > 0 and system["median_s"] > 0
            assert system["frac_roofline"] > 0
        assert entry["roofline_img_s"] > 0 and entry["flops_per_image"] > 0
        assert entry["speedup_vs_eager"] > 0
    # train: bytes kept for backward (fastres vs eager) and the paper traffic of three designs
    train, infer = results["models"]
    saved = {k: train["systems"][k]["saved_bytes"] for k in ("fastres", "eager")}
    assert min(saved.values()) > 0
    assert train["saved_bytes_vs_eager"] == pytest.approx(saved["fastres"] / saved["eager"])
    designs = train["traffic"]["designs"]
    assert train["traffic"]["batch"] == 2 and train["traffic"]["tbps"] > 0
    assert (designs["eager"]["gb_per_step"] > designs["per_layer"]["gb_per_step"]
            > designs["block"]["gb_per_step"] > 0)
    assert all(d["img_s_bound"] > 0 for d in designs.values())
    assert "traffic" not in infer and "saved_bytes_vs_eager" not in infer
    assert all("saved_bytes" not in s for s in infer["systems"].values())
    assert "saved/eager" in printed

    # block level (on by default): the first stage's two ResNet-50 blocks (from --model
    # resnet50), a training step of each: the block op, the same block layer by layer, eager
    assert [e["block"] for e in results["blocks"]] == ["layer1.0", "layer1.1"]
    for entry in results["blocks"]:
        assert entry["model"] == "resnet50" and entry["mode"] == "train"
        assert set(entry["systems"]) == {"fastres", "fastres-layer", "eager"}
        assert all(s["status"] == "ok" and s["ms_per_step"] > 0
                   for s in entry["systems"].values())
        assert entry["speedup_vs_eager"] > 0 and entry["saved_bytes_vs_eager"] < 1
        assert set(entry["traffic"]["designs"]) == {"eager", "per_layer", "block"}
    assert "Block level" in printed and "layer vs eager" in printed

    # layer level: two ResNet-50 shapes (from --model resnet50), both modes
    assert len(results["layers"]) == 4
    for entry in results["layers"]:
        assert entry["model"] == "resnet50"
        assert entry["flops"] > 0 and entry["bytes"] > 0 and entry["bound_s"] > 0
        systems = entry["systems"]
        assert systems["eager"]["status"] == "ok"
        # on CPU the fastres layer system is the reference backend (on CUDA: triton and cuda)
        assert [k for k in systems if k.startswith("fastres-")] == ["fastres-reference"]
        assert systems["fastres-reference"]["status"] == "ok"
        assert systems["cudnn-conv"]["status"] == "ok"  # the conv alone, for its mainloop
        assert systems["fastres-reference"]["time_vs_cudnn_conv"] > 0
        for key in ("tflops", "tbps", "frac_peak_tflops", "frac_peak_tbps", "frac_roofline"):
            assert systems["eager"][key] > 0
        assert entry["best_fastres"].startswith("fastres-")
        assert entry["speedup_vs_eager"] > 0


@needs_torchvision
def test_bench_time_limit_records_skips(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--quick", "--no-compile", "--model", "resnet18", "--mode",
                     "infer", "--time-limit", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    statuses = {s["status"] for e in results["models"] for s in e["systems"].values()}
    assert statuses == {"skipped"}
    assert "Model level" in capsys.readouterr().out  # plain-text table


def test_bench_levels():
    parse = cli.build_parser().parse_args

    def levels(*argv):
        return cli.bench_levels(parse(["bench", *argv]))

    assert levels() == {"model", "block"}
    assert levels("--layers") == {"model", "block", "layer"}
    assert levels("--layers-only") == {"layer"}
    assert levels("--levels", "block") == {"block"}
    assert levels("--levels", "model,layer") == {"model", "layer"}
    assert levels("--levels", "block", "--layers") == {"block", "layer"}
    with pytest.raises(SystemExit):
        levels("--levels", "blocks")
    config = cli.bench_config(parse(["bench", "--levels", "block", "--model", "resnext50_32x4d",
                                     "--block-limit", "2", "--block-compile"]))
    assert config.models == [] and not config.layers and config.blocks
    assert config.block_models == ["resnext50_32x4d"]
    assert config.block_limit == 2 and config.block_compile
    config = cli.bench_config(parse(["bench", "--levels", "model", "--model", "resnet18"]))
    assert config.models == ["resnet18"] and not config.blocks
    assert config.block_models == ["resnet50", "resnext50_32x4d"]


def test_bench_rejects_unknown_model():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", "vgg16"])


@needs_torchvision
def test_tune_runs_the_first_steps_and_says_what_it_did(capsys):
    code = cli.main(["tune", "resnet18", "--batch", "2", "--resolution", "32", "--device", "cpu",
                     "--mode", "infer"])
    assert code == 0
    out = capsys.readouterr().out
    assert "nothing to tune" in out  # no GPU: honest about it
    assert re.search(r"resnet18 infer batch 2 bf16: first step [\d.]+ s", out), out


def test_tune_rejects_unknown_model():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["tune", "vgg16", "--device", "cpu"])


@needs_torchvision
def test_memory_counts_saved_bytes_and_prints_the_traffic_model(capsys):
    code = cli.main(["memory", "resnet18", "--batch", "2", "--resolution", "32", "--device",
                     "cpu", "--backend", "reference", "--tbps", "4.3"])
    assert code == 0
    out = capsys.readouterr().out
    eager = int(re.search(r"eager\s+([\d,]+) bytes", out).group(1).replace(",", ""))
    fused, ratio = re.search(r"fastres\s+([\d,]+) bytes\s+([\d.]+)x eager", out).groups()
    assert eager > 0
    assert float(ratio) == pytest.approx(int(fused.replace(",", "")) / eager, abs=1e-3)
    gb = [float(re.search(rf"{label}\s+([\d.]+) GB\s+[\d,]+ img/s", out).group(1))
          for label in ("eager", "per-layer fused", "block fused")]
    assert gb[0] > gb[1] > gb[2] > 0
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["memory", "vgg16", "--device", "cpu"])
