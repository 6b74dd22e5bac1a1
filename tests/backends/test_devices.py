"""Device classes without the hardware: every class simulated at the one seam
(:func:`fastres.backends.devices.simulate`), checked for the configurations the Triton pruners
select, the shared-memory estimate behind them, dispatch (``auto``'s choice and each backend's
reasons), what ``fastres info`` says, and which GPUs the built CUDA extension can run on.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from fastres import backends, cli
from fastres.backends import CallInfo, ConvParams, devices
from fastres.backends.triton import _tuning, bn, conv, conv_bwd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "bench", "kernel_report.json")

# Every class of DESIGN.md §3, by the capability of a card in it, and the pre-Ampere ones.
CLASSES = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5), (7, 0)]
KB = 1024


def _fake(dtype: torch.dtype) -> torch.Tensor:
    """A CUDA tensor that needs no GPU (what the pruners see of a launch's input)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(16, dtype=dtype, device="cuda")


# ---------------------------------------------------------------------------------------------
# The shared-memory estimate against the compiled figures
# ---------------------------------------------------------------------------------------------

# spec-name prefix -> (kernel module, kernel name its smem_bytes takes, its GPU configurations)
_GEMM_KERNELS = {
    "conv_gemm": (conv, "gemm", conv.GPU_GEMM_CONFIGS),
    "conv_gemm_flat": (conv, "gemm_flat", conv.GPU_GEMM_CONFIGS),
    "conv_direct": (conv, "direct", conv.GPU_DIRECT_CONFIGS),
    "dgrad_gemm": (conv_bwd, "dgrad_gemm", conv_bwd.GPU_DGRAD_GEMM_CONFIGS),
    "dgrad_direct": (conv_bwd, "dgrad_direct", conv_bwd.GPU_DIRECT_CONFIGS),
    "wgrad_gemm": (conv_bwd, "wgrad_gemm", conv_bwd.GPU_WGRAD_GEMM_CONFIGS),
    "wgrad_gemm_flat": (conv_bwd, "wgrad_gemm_flat", conv_bwd.GPU_WGRAD_GEMM_CONFIGS),
    "wgrad_direct": (conv_bwd, "wgrad_direct", conv_bwd.GPU_DIRECT_CONFIGS),
}


def _spec_config(spec, configs: list[triton.Config]) -> triton.Config:
    """The autotuner configuration a compile spec was made from."""
    return next(c for c in configs
                if all(spec.constexprs.get(k) == v for k, v in c.kwargs.items())
                and bool(c.kwargs.get("TMA")) == bool(spec.constexprs.get("TMA"))
                and (c.num_warps, c.num_stages) == (spec.num_warps, spec.num_stages))


def _estimates() -> list[tuple[dict, int]]:
    """(report row, the estimate for its configuration) for every Triton row of the report."""
    with open(REPORT) as f:
        rows = json.load(f)["triton_kernels"]
    specs = {s.name: s for mod in (conv, conv_bwd, bn) for s in mod.compile_specs()}
    out = []
    for row in rows:
        spec = specs[row["spec"]]
        cc = int(row["target"].removeprefix("sm_"))
        prefix = row["spec"].split("-")[0]
        if prefix in _GEMM_KERNELS:
            mod, kname, configs = _GEMM_KERNELS[prefix]
            dtype = getattr(torch, row["spec"].split("-")[1])
            est = mod.smem_bytes(kname, _spec_config(spec, configs), dtype, cc,
                                 gated=bool(spec.constexprs.get("IN_GATE")))
        else:  # BatchNorm kernels and the wgrad chunk sum: a cross-warp reduction at most
            block_k = spec.constexprs.get("BLOCK_K", spec.constexprs.get("BLOCK", 32))
            est = _tuning.reduction_smem(block_k, spec.num_warps)
        out.append((row, est))
    return out


@pytest.fixture(scope="module")
def estimates() -> list[tuple[dict, int]]:
    return _estimates()


def test_estimate_is_at_least_what_every_compiled_configuration_takes(estimates):
    """The pruners' shared-memory estimate never undercounts: for every (spec, target) row of
    the kernel report (compiled with the real compiler), estimate >= compiled shared memory."""
    under = [(r["spec"], r["target"], r["shared"], est) for r, est in estimates
             if est < r["shared"]]
    assert len(estimates) > 1000 and not under, under[:10]
    assert {r["target"] for r, _ in estimates} >= {"sm_80", "sm_90"}


def test_estimate_prunes_nothing_the_report_offers(estimates):
    """On each target of the report the estimate keeps every configuration the autotuner
    offers there (pruned: null) within that target's shared memory: no tile that fits is lost."""
    # (unspecialised rows carry no pruner verdict: they only have to compile)
    over = [(r["spec"], r["target"], est) for r, est in estimates if r["pruned"] is None
            and r["shape_class"] != "unspecialised"
            and est > devices.for_target(int(r["target"][3:])).smem_per_block]
    assert not over, over[:10]


def test_fitting_shrinks_the_smallest_configuration_where_none_fits():
    """With 64 KB (sm_75), fp32 dgrad has no configuration that fits: the smallest runs with
    fewer pipeline stages instead of failing at launch."""
    need = lambda c: conv_bwd.smem_bytes("dgrad_gemm", c, torch.float32, 75)
    configs = conv_bwd.GPU_DGRAD_GEMM_CONFIGS
    assert all(need(c) > 64 * KB for c in configs)
    (shrunk,) = _tuning.fitting(configs, need, 64 * KB)
    assert need(shrunk) <= 64 * KB and shrunk.num_stages < 3
    assert _tuning.fitting(configs, need, None) == configs  # off CUDA: no limit


# ---------------------------------------------------------------------------------------------
# What the pruners select, per class
# ---------------------------------------------------------------------------------------------

def _selected(cap: tuple[int, int]) -> list[tuple[str, str, triton.Config, int]]:
    """(spec name, kernel, first surviving configuration, its estimate) for every ResNet shape
    class x dtype x epilogue / dy-flag variant of the conv and conv-backward compile specs, as
    the pruner sees it on a simulated device of capability ``cap`` (autotuning off: the first
    survivor runs)."""
    seen, out = set(), []
    with devices.simulate(cap) as cls:
        for mod, arg, specs in ((conv, "x_ptr", conv.compile_specs()),
                                (conv_bwd, "dz_ptr", conv_bwd.compile_specs())):
            for spec in specs:
                prefix, dname, variant = [*spec.name.split("-"), "", ""][:3]
                key = (prefix, dname, variant, spec.shape_class)
                if spec.ints is None or key in seen or prefix not in _GEMM_KERNELS:
                    continue  # unspecialised, seen, or a kernel with one configuration
                seen.add(key)
                _, kname, configs = _GEMM_KERNELS[prefix]
                prune = {"x_ptr": conv._prune_gemm if "gemm" in kname else conv._prune_direct,
                         "dz_ptr": {"dgrad_gemm": conv_bwd._prune_dgrad,
                                    "dgrad_direct": conv_bwd._prune_direct_dgrad,
                                    "wgrad_direct": conv_bwd._prune_direct_wgrad,
                                    }.get(kname, conv_bwd._prune_wgrad)}[arg]
                flags = {k: v for k, v in spec.constexprs.items()
                         if not k.startswith("BLOCK_") and k != "TMA"}
                dtype = getattr(torch, dname)
                first = prune(configs, {**spec.ints, arg: _fake(dtype)}, **flags)[0]
                out.append((spec.name, kname, first,
                            mod.smem_bytes(kname, first, dtype, cls.target,
                                           gated=bool(flags.get("IN_GATE")))))
    return out


@pytest.mark.parametrize("cap", CLASSES)
def test_first_surviving_configuration_fits_the_class(cap):
    """With autotuning off the first configuration left by pruning runs: on every class, for
    every ResNet-50 shape class (3x3 s2, 1x1, stem, 3x3 s1, grouped), dtype and training /
    eval / block-fusion variant of conv forward, dgrad and wgrad, it fits the class's shared
    memory per block."""
    cls = devices.make_class(cap)
    chosen = _selected(cap)
    assert len(chosen) > 100
    too_big = [(name, est) for name, _, _, est in chosen if est > cls.smem_per_block]
    assert not too_big, too_big[:5]


def test_99kb_classes_never_select_the_fp32_backward_tiles_that_need_150kb():
    """The issue's failure: fp32 dgrad / wgrad 128x128x32 take 146-150 KB (kernel report) and
    were the first choice on 99 KB devices (RTX 30/40/50, L4). On sm_86, sm_89 and sm_120 no
    fp32 backward selection is a tile whose compiled sm_80 figure exceeds 99 KB; on sm_80
    (163 KB) the 128x128 tiles are still chosen."""
    compiled: dict[tuple[str, ...], int] = {}  # (kernel, dtype, tile) -> most shared on sm_80
    with open(REPORT) as f:
        for r in json.load(f)["triton_kernels"]:
            parts = r["spec"].split("-")
            if r["target"] == "sm_80" and len(parts) > 3:
                key = parts[0], parts[1], parts[3]
                compiled[key] = max(compiled.get(key, 0), r["shared"])
    for cap in ((8, 6), (8, 9), (12, 0)):
        backward = [(n, c) for n, k, c, _ in _selected(cap)
                    if k.startswith(("dgrad", "wgrad")) and "-float32-" in n]
        assert backward
        for name, config in backward:
            key = (*name.split("-")[:2], _label(config))
            assert compiled.get(key, 0) <= 99 * KB, (cap, name, key, compiled.get(key))
    sm80 = {(n.split("-")[0], _label(c)) for n, k, c, _ in _selected((8, 0)) if "-float32-" in n}
    assert ("dgrad_gemm", "128_128_32_w8s3") in sm80 and ("wgrad_gemm", "128_128_32_w8s3") in sm80


def _label(config: triton.Config) -> str:
    """A configuration as the compile specs name it: ``128_128_32_w8s3``."""
    tile = "_".join(str(v) if v is not True else "tma" for v in config.kwargs.values())
    return f"{tile}_w{config.num_warps}s{config.num_stages}"


def test_bn_configurations_fit_every_class():
    """The BatchNorm kernels stage one fp32 row per warp at most (<= 5 KB): every configuration
    at the widest channel tile fits the smallest class (64 KB), so their pruners need no
    shared-memory check."""
    smallest = min(devices.make_class(c).smem_per_block for c in CLASSES)
    for configs in (bn._configs(bn._ELEMENTWISE_BLOCKS), bn._configs(bn._REDUCE_BLOCKS)):
        for c in configs:
            assert _tuning.reduction_smem(bn._block_k(1 << 20), c.num_warps) <= smallest


# ---------------------------------------------------------------------------------------------
# Dispatch per class
# ---------------------------------------------------------------------------------------------

def _call(dtype: torch.dtype = torch.float16, device: str = "cuda") -> CallInfo:
    return CallInfo(device=torch.device(device), dtype=dtype, x_shape=(8, 64, 56, 56),
                    weight_shape=(64, 64, 3, 3), conv=ConvParams((1, 1), (1, 1), (1, 1), 1),
                    batch_stats=True, has_residual=False, act="relu")


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_auto_uses_the_fused_kernels_on_tensor_core_classes(cap, monkeypatch):
    monkeypatch.delenv("FASTRES_AUTOTUNE_BACKEND", raising=False)
    with devices.simulate(cap):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backends.auto_reason(torch.device("cuda"), dtype) is None
            assert backends.auto_order(_call(dtype)) == ("triton", "cuda", "reference")
            assert backends.availability("triton", _call(dtype)) is None


@pytest.mark.parametrize("cap", [(7, 5), (7, 0)])
def test_auto_serves_cudnn_below_sm80_and_triton_runs_when_asked(cap):
    """No tensor-core path for Triton below sm_80: auto picks reference with the reason;
    backend="triton" still serves fp32 / fp16; bf16 (no native support) is refused by both
    compiled backends with a clear reason, and auto falls to reference."""
    with devices.simulate(cap) as cls:
        reason = backends.auto_reason("cuda")
        assert reason is not None and cls.name in reason and "tensor-core" in reason
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backends.auto_order(_call(dtype)) == ("reference",)
            assert backends.select(_call(dtype), "auto") == "reference"
        for dtype in (torch.float32, torch.float16):
            assert backends.select(_call(dtype), "triton") == "triton"
        with pytest.raises(backends.BackendUnavailableError, match="no native bfloat16"):
            backends.select(_call(torch.bfloat16), "triton")
        if backends.load("cuda") is not None:
            why = backends.availability("cuda", _call(torch.bfloat16))
            assert why is not None and "bfloat16" in why


def test_devices_older_than_sm70_are_refused():
    with devices.simulate((6, 1)) as cls:
        assert cls is None
        assert "6.1" in backends.auto_reason("cuda")
        assert backends.select(_call(), "auto") == "reference"
        why = backends.availability("triton", _call())
        assert why is not None and "7.0" in why


def test_no_device_to_ask_keeps_the_static_order(monkeypatch):
    """Fake CUDA tensors traced on a machine without a GPU: no class is known, nothing is
    refused for the device (tracing sees the order a GPU would)."""
    monkeypatch.delenv("FASTRES_AUTOTUNE_BACKEND", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its class is known")
    assert devices.device_class("cuda") is None and devices.capability("cuda") is None
    assert backends.auto_reason("cuda") is None
    assert backends.auto_order(_call()) == ("triton", "cuda", "reference")
    assert backends.auto_reason("cpu") is not None  # no fused kernels off CUDA


# ---------------------------------------------------------------------------------------------
# Which GPUs the extension's code runs on
# ---------------------------------------------------------------------------------------------

DEFAULT_BUILD = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120", "compute_80")


@pytest.mark.parametrize("cap, runs", [
    ((8, 0), True), ((8, 6), True), ((8, 7), True), ((8, 9), True), ((9, 0), True),
    ((10, 0), True), ((10, 3), True), ((11, 0), True), ((12, 0), True), ((12, 1), True),
    ((7, 5), False), ((7, 0), False),
])
def test_code_reason_for_the_default_build(cap, runs):
    why = devices.code_reason(DEFAULT_BUILD, cap)
    assert (why is None) == runs, why
    if not runs:
        assert f"sm_{cap[0]}{cap[1]}" in why and "TORCH_CUDA_ARCH_LIST" in why


def test_code_reason_rules():
    """Machine code: same major, equal or lower minor; "a" targets exactly their own; "f"
    targets their family; PTX: any device at or above it ("a" PTX only its own)."""
    assert devices.code_reason(("sm_90a",), (9, 0)) is None
    assert devices.code_reason(("sm_90a",), (10, 0)) is not None
    assert devices.code_reason(("sm_100a",), (10, 3)) is not None
    assert devices.code_reason(("sm_100f",), (10, 3)) is None
    assert devices.code_reason(("sm_86",), (8, 0)) is not None
    assert devices.code_reason(("sm_86",), (8, 9)) is None
    assert devices.code_reason(("sm_80",), (9, 0)) is not None
    assert devices.code_reason(("compute_90",), (12, 0)) is None
    assert devices.code_reason(("compute_90",), (8, 9)) is not None
    assert devices.code_reason(("compute_90a",), (10, 0)) is not None


def test_cuda_backend_is_unavailable_where_the_library_holds_no_code(monkeypatch):
    """A device the built library has no code for: the cuda backend refuses with the reason
    (the backend error, auto's fallback to triton, ``fastres info``)."""
    if backends.load("cuda") is None:
        pytest.skip(f"the CUDA extension is not built here: {backends.load_error('cuda')}")
    from fastres.backends import cuda

    monkeypatch.setattr(cuda, "BUILT_ARCHS", ("sm_80", "sm_90a"))
    with devices.simulate((12, 0)):
        why = backends.availability("cuda", _call())
        assert why is not None and "no machine code for sm_120" in why
        with pytest.raises(backends.BackendUnavailableError, match="sm_120"):
            backends.select(_call(), "cuda")
        rows = {name: (ok, note) for name, ok, note in cli.backend_report("cuda")}
        assert rows["cuda"][0] is False and "sm_120" in rows["cuda"][1]
    with devices.simulate((8, 6)):
        assert backends.availability("cuda", _call()) is None


# ---------------------------------------------------------------------------------------------
# fastres info
# ---------------------------------------------------------------------------------------------

def test_info_shows_the_class_and_auto_choice_per_simulated_class():
    with devices.simulate((8, 9)):
        lines = cli.info_lines(torch.device("cuda"))
        text = "\n".join(lines)
        assert "class    sm_89 (capability 8.9, 99 KB shared memory per block" in text
        assert "auto serves: the fused kernels" in text
        rows = {n: (ok, note) for n, ok, note in cli.backend_report("cuda")}
        assert rows["triton"] == (True, "") and rows["reference"][0]
    with devices.simulate((7, 5)):
        text = "\n".join(cli.info_lines(torch.device("cuda")))
        assert "class    sm_75" in text and "no tensor cores" in text
        assert "auto serves: reference (PyTorch): sm_75 has no tensor-core path" in text
        rows = {n: (ok, note) for n, ok, note in cli.backend_report("cuda")}
        assert rows["triton"][0] and "bfloat16" in rows["triton"][1]
        assert "auto serves reference" in rows["triton"][1]
    with devices.simulate((10, 0), smem_per_block=200 * KB):  # the device's own limit shown
        assert "200 KB shared memory per block" in "\n".join(cli.info_lines("cuda"))


# ---------------------------------------------------------------------------------------------
# The backends never import the op layer
# ---------------------------------------------------------------------------------------------

def test_backends_import_without_the_op_layer():
    """The circle backends -> cuda.py -> ops -> backends is cut: the op layer hands its timer
    down (backends.set_call_timer). Loaded without fastres/__init__ (which imports everything),
    fastres.backends and its cuda module import no fastres.ops, and no backends module names
    the op layer."""
    code = f"""
import importlib, sys, types
pkg = types.ModuleType("fastres"); pkg.__path__ = [{os.path.join(ROOT, "fastres")!r}]
sys.modules["fastres"] = pkg
import fastres.backends as b
try:
    importlib.import_module("fastres.backends.cuda")
except ImportError:
    pass  # no extension built: the point is what was imported
assert b._call_timer is None
print(sorted(m for m in sys.modules if m.startswith("fastres.ops")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    package = os.path.join(ROOT, "fastres")
    for folder, _, files in os.walk(os.path.join(package, "backends")):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            here = os.path.relpath(folder, os.path.dirname(package)).split(os.sep)  # fastres/..
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = here[:len(here) - node.level + 1] if node.level else []
                    names = [".".join([*base, node.module or ""])]
                    names += [f"{names[0]}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                assert not any(n.strip(".").startswith("fastres.ops") for n in names), (path, names)
    assert backends._call_timer is not None  # importing fastres registered the op layer's


# ---------------------------------------------------------------------------------------------
# The architectures setup.py builds the extension for
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, without running the build."""
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("FASTRES_NO_CUDA_EXT", "1")
    spec = importlib.util.spec_from_file_location("fastres_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NVCC_13 = {"sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100", "sm_110",
           "sm_103", "sm_120", "sm_121"}  # nvcc 13.0 --list-gpu-code


def test_default_architectures(setup_py):
    assert setup_py.cuda_archs(None, NVCC_13) == list(DEFAULT_BUILD)
    assert setup_py.cuda_archs("", None) == list(DEFAULT_BUILD)  # nvcc cannot say: all
    # an older nvcc without Blackwell: what it can build, still with the PTX fallback
    assert setup_py.cuda_archs(None, {"sm_80", "sm_86", "sm_89", "sm_90"}) == [
        "sm_80", "sm_89", "sm_90a", "compute_80"]


def test_torch_cuda_arch_list_is_honoured(setup_py):
    assert setup_py.cuda_archs("8.0;9.0a;10.0a;12.0+PTX", NVCC_13) == [
        "sm_80", "sm_90a", "sm_100a", "sm_120", "compute_120"]
    assert setup_py.cuda_archs("8.0 8.6, 8.0+PTX", NVCC_13) == ["sm_80", "sm_86", "compute_80"]
    # PyTorch's names; entries below sm_80 hold nothing (the kernels need bf16 tensor cores):
    # a common list such as "7.5;8.0;8.6;9.0" still builds
    assert setup_py.cuda_archs("Ampere;Hopper", NVCC_13) == [
        "sm_80", "sm_86", "compute_86", "sm_90", "compute_90"]
    assert setup_py.cuda_archs("7.0;7.5;8.0;8.6;9.0", NVCC_13) == ["sm_80", "sm_86", "sm_90"]
    with pytest.raises(SystemExit, match="'Amp'"):
        setup_py.cuda_archs("8.0;Amp", NVCC_13)
    with pytest.raises(SystemExit, match="cannot compile for"):
        setup_py.cuda_archs("8.5", NVCC_13)
    assert setup_py.gencode_flags(["sm_90a", "compute_80"]) == [
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80"]


def test_installed_nvcc_lists_its_targets(setup_py):
    home = "/usr/local/cuda"
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        pytest.skip("no CUDA toolkit at /usr/local/cuda")
    targets = setup_py._nvcc_targets(home)
    assert targets and "sm_80" in targets


def test_sm86_prunes_as_sm89():
    """RTX 30 / A10 / A6000 (8.6) and Orin (8.7) take sm_89's spill tables: the kernel report
    compiles that class as sm_89 (same register file, 99 KB, mma.sync)."""
    from fastres.backends.triton import _tuning

    x = _fake(torch.float32)
    for cap, want in (((8, 6), 89), ((8, 7), 89), ((8, 9), 89), ((9, 0), 90), ((8, 0), 80)):
        with devices.simulate(cap):
            assert _tuning.target(x) == want, cap
    cls = devices.make_class((8, 6))
    assert cls.target == 86 and cls.name == "sm_86" and cls.report_target == 89
