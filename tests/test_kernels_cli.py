"""``fastres kernels``: what a step launches on a device class, found without a GPU.

The command runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter offers one small
configuration per kernel; the command answers for the GPU's). Checked here: a ResNet-18 step on
simulated sm_80 / sm_89 / sm_90 lists the forward, dgrad, wgrad and BN kernels of training and
the fused eval kernels; every configuration it lists for a pruned kernel is the first one that
kernel's pruner keeps for the class and the launch (the real GPU configuration lists, recomputed
here); a unit compiled for a real target is clean. (Compile times and the ResNet-50 figures:
README, from the command itself.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastres import kernels
from fastres.backends import devices
from fastres.backends.triton import _tuning
from fastres.backends.triton import conv as tconv
from fastres.backends.triton import conv_bwd as tconv_bwd

ROOT = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# kernel -> (the Tuned launcher, its GPU configurations, the tensor argument its pruner reads)
PRUNED = {
    "conv:_conv_gemm_kernel": (tconv._gemm, tconv.GPU_GEMM_CONFIGS, "x_ptr"),
    "conv:_conv_direct_kernel": (tconv._direct, tconv.GPU_DIRECT_CONFIGS, "x_ptr"),
    "conv_bwd:_dgrad_gemm_kernel": (tconv_bwd._dgrad_gemm, tconv_bwd.GPU_DGRAD_GEMM_CONFIGS,
                                    "dz_ptr"),
    "conv_bwd:_wgrad_gemm_kernel": (tconv_bwd._wgrad_gemm, tconv_bwd.GPU_WGRAD_GEMM_CONFIGS,
                                    "dz_ptr"),
    "conv_bwd:_dgrad_direct_kernel": (tconv_bwd._dgrad_direct, tconv_bwd.GPU_DIRECT_CONFIGS,
                                      "dz_ptr"),
    "conv_bwd:_wgrad_direct_kernel": (tconv_bwd._wgrad_direct, tconv_bwd.GPU_DIRECT_CONFIGS,
                                      "dz_ptr"),
}


def run_kernels(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "fastres.cli", "kernels", *args, "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module", params=["sm_80", "sm_89", "sm_90"])
def resnet18_step(request, tmp_path_factory):
    _, report = run_kernels(tmp_path_factory.mktemp(request.param), "resnet18", "--device",
                            request.param, "--batch", "2", "--resolution", "32")
    return request.param, report


def _units(report: dict, mode: str, kernel: str, **flags) -> list[dict]:
    return [u for u in report["units"] if mode in u["modes"] and u["kernel"] == kernel
            and all(u["constexprs"].get(k) == v for k, v in flags.items())]


def test_a_resnet18_step_lists_the_training_and_eval_kernels(resnet18_step):
    target, report = resnet18_step
    assert report["device"]["name"] == target
    assert report["units"] and all(u["launches"] >= 1 for u in report["units"])
    # every fused pass went to the Triton backend: it is what the units describe
    for mode in ("train", "eval"):
        assert report["served"][mode] and all(k.endswith(" triton")
                                              for k in report["served"][mode])
    # training: conv forward with the BN-partials epilogue (also with the block's prologue),
    # BN finalize and the backward's reductions, dgrad and wgrad
    assert _units(report, "train", "conv:_conv_gemm_kernel", STATS=True)
    assert _units(report, "train", "conv:_conv_gemm_kernel", STATS=True, IN_AFFINE=True)
    for kernel in ("bn:_bn_finalize_kernel", "bn:_bn_bwd_reduce_kernel",
                   "conv_bwd:_dgrad_gemm_kernel", "conv_bwd:_wgrad_gemm_kernel"):
        assert _units(report, "train", kernel), kernel
    # eval: the one-kernel conv with BN folded in its epilogue, and ReLU; no statistics
    assert _units(report, "eval", "conv:_conv_gemm_kernel", STATS=False, HAS_AFFINE=True,
                  RELU=True)
    assert not _units(report, "eval", "conv:_conv_gemm_kernel", STATS=True)
    assert not [u for u in report["units"] if u["modes"] == ["eval"] and "bwd" in u["kernel"]]
    # the specialisation: channel counts are multiples of 16, the 1x1 convs' filter size is 1
    gemm = _units(report, "train", "conv:_conv_gemm_kernel")
    assert any("C" in u["divisible"] and "K" in u["divisible"] for u in gemm)
    assert any({"R", "S"} <= set(u["ones"]) for u in gemm)
    units = len(report["units"])
    assert report["tuning_configs"] >= report["tuning_keys"] > 0
    assert report["tuning_units"] >= units


def test_each_listed_configuration_is_the_first_the_pruner_keeps(resnet18_step):
    """Recomputed here from the kernels' GPU configuration lists and their pruning functions,
    for the class and each unit's arguments: the command's choice is the first survivor."""
    target, report = resnet18_step
    checked = 0
    with devices.simulate(int(target.removeprefix("sm_"))), FakeTensorMode():
        for unit in report["units"]:
            if unit["kernel"] not in PRUNED:
                continue
            tuned, configs, tensor_arg = PRUNED[unit["kernel"]]
            named = {**unit["ints"], tensor_arg: torch.empty(
                16, dtype=TORCH_DTYPES[unit["dtype"]], device="cuda")}
            config_keys = set().union(*(c.kwargs for c in configs))
            flags = {k: v for k, v in unit["constexprs"].items() if k not in config_keys}
            kept = tuned.prune(configs, named, **flags) or configs
            assert unit["config"] == _tuning.config_label(kept[0]), unit
            assert unit["candidates"] == len(kept)
            checked += 1
    assert checked >= 6


def test_a_compiled_unit_is_clean(tmp_path):
    done, report = run_kernels(tmp_path, "resnet18", "--device", "sm_80", "--batch", "2",
                               "--resolution", "32", "--mode", "eval", "--only", "bn_running",
                               "--compile", "--jobs", "1")
    (unit,) = report["units"]
    row = unit["compiled"]
    assert row["status"] == "ok" and row["target"] == "sm_80", row
    assert row["violations"] == [] and row["spill_store_bytes"] == 0 and row["regs"] > 0
    assert report["compile_seconds"] > 0 and report["compile_wall"] > 0
    assert "1 of 1 clean" in done.stdout


def test_device_names():
    assert kernels.parse_device("sm_100").name == "sm_100"
    assert kernels.parse_device("sm_90a").name == "sm_90"
    assert kernels.parse_device("8.9").name == "sm_89"
    assert kernels.parse_device("120").smem_per_block == 99 * 1024
    for bad in ("sm_60", "h100", ""):
        with pytest.raises(ValueError, match="--device|7.0"):
            kernels.parse_device(bad)


def test_refuses_the_interpreter():
    """This process interprets the kernels (conftest): their configurations are not the GPU's."""
    assert _tuning.INTERPRET
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.record(torch.nn.Conv2d(3, 16, 3), 90, batch=2, resolution=8)


def test_backward_without_the_engine_runs_every_node():
    """The Python walk of the autograd graph calls each node once with the summed gradient,
    maps a Python Function's gradients to its tensor arguments only, and reaches the leaves."""
    seen = []

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, factor, x, unused):
            ctx.factor = factor
            return x * factor

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.clone())
            return None, grad * ctx.factor, None

    w = torch.randn(3, requires_grad=True)
    with kernels._tracking_function_args():
        h = Scale.apply(2.0, w, None)
        loss = (h * 3).sum() + h.sum()  # two paths into Scale: their gradients add
        kernels.backward(loss)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((3,), 4.0))
