"""The ``cuda`` backend: the compiled extension ``fastres._C`` and its ``fastres_cuda`` ops.

Without a GPU (CI): the extension must be built and import wherever a CUDA build of torch and a
CUDA toolkit are present, its op schemas must be registered, the .so must hold the code its build
recorded (by default sm_80, sm_89, sm_90a, sm_100a, sm_120 and compute_80 PTX) for every kernel
file, the Python orchestration must trace under FakeTensorMode with fake CUDA tensors, and
dispatch must say why the backend cannot serve CPU calls. Tests marked ``gpu`` run the kernels:
the equivalence grid of tests/ops/cases.py against float64 (tests/numerics.py) and
``torch.library.opcheck``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastres
from fastres.analysis.kernel_report import cuda_rows
from fastres.backends import BackendUnavailableError, CallInfo, ConvParams, availability
from tests.host_sync import op_pass_syncs
from tests.ops.cases import CASES, MODES, Case, run_case
from tests.ops.nonfinite import check_nonfinite

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _toolkit() -> str | None:
    """A CUDA toolkit root as setup.py would find it (CUDA_HOME or the usual install folders)."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *glob.glob("/usr/local/cuda-*")]
    for r in roots:
        if r and os.path.isfile(os.path.join(r, "include", "cuda_runtime.h")):
            return r
    return None


def _extension_expected() -> str | None:
    """None when setup.py builds the extension here, else why it does not."""
    if os.environ.get("FASTRES_NO_CUDA_EXT", "0") == "1":
        return "FASTRES_NO_CUDA_EXT=1"
    if not torch.version.cuda:
        return "torch is not a CUDA build"
    if _toolkit() is None:
        return "no CUDA toolkit"
    return None


def _C():
    """The extension module; fails (does not skip) where it should have been built."""
    why_not = _extension_expected()
    try:
        import fastres._C as ext
    except ImportError as e:
        if why_not is None:
            pytest.fail(
                f"fastres._C is missing although torch {torch.__version__} is a CUDA build and a "
                f"CUDA toolkit is at {_toolkit()}: {e}. Rebuild: pip install --no-build-isolation "
                "--no-deps -e ."
            )
        pytest.skip(f"the extension is not built here on purpose: {why_not}")
    return ext


def _cuda_backend():
    _C()
    from fastres.backends import cuda

    return cuda


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def test_extension_builds_and_imports():
    ext = _C()
    assert ext.__name__ == "fastres._C"
    assert fastres.backends.load("cuda") is not None, fastres.backends.load_error("cuda")


SCHEMAS = {
    "conv_plan": (
        "fastres_cuda::conv_plan(int[] x_shape, int[] weight_shape, int[] stride, int[] padding, "
        "int[] dilation, int groups, ScalarType dtype) -> (int, int, str)"
    ),
    "conv": (
        "fastres_cuda::conv(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
        "Tensor(a!) out, Tensor(b!) partials) -> ()"
    ),
    "bn_finalize": (
        "fastres_cuda::bn_finalize(Tensor partials, Tensor? gamma, Tensor? beta, float eps, "
        "Tensor(a!) mean, Tensor(b!) var, Tensor(c!) scale, Tensor(d!) shift) -> ()"
    ),
    "bn_apply": (
        "fastres_cuda::bn_apply(Tensor y, Tensor scale, Tensor shift, Tensor? residual, "
        "bool relu, Tensor(a!) z) -> ()"
    ),
    "bn_backward": (
        "fastres_cuda::bn_backward(Tensor dz, Tensor y, Tensor z, Tensor mean, Tensor var, "
        "Tensor? gamma, float eps, bool batch_stats, bool relu, Tensor(a!) dy, Tensor(b!) dres, "
        "Tensor(c!) dgamma, Tensor(d!) dbeta) -> ()"
    ),
}


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema_registered(op):
    _C()
    assert str(getattr(torch.ops.fastres_cuda, op).default._schema) == SCHEMAS[op]


@pytest.mark.parametrize("op", ["conv", "bn_finalize", "bn_apply", "bn_backward"])
def test_ops_have_cuda_kernels_and_fakes(op):
    _C()
    name = f"fastres_cuda::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    _cuda_backend()  # registers the fake kernels
    assert torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None


def _cuobjdump(flag: str, path: str) -> set[str]:
    """The file names ``cuobjdump --list-elf`` / ``--list-ptx`` gives for a library."""
    tool = os.path.join(
        os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    if not os.path.isfile(tool):
        pytest.fail(f"Triton's bundled cuobjdump is missing at {tool}")
    out = subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[-1].strip() for line in out.splitlines() if " file " in line}


def test_library_holds_what_the_build_recorded():
    """Every kernel file has machine code for each sm_ architecture and PTX for each compute_
    one the build recorded (fastres_cuda::built_archs, what dispatch checks devices against),
    and nothing else; the default build covers sm_80 to sm_120 with a compute_80 fallback."""
    ext = _C()
    archs = _cuda_backend().BUILT_ARCHS
    sources = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "csrc/*.cu")))
    assert sources, "no csrc/*.cu files found"
    sass_archs = [a for a in archs if a.startswith("sm_")]
    # cuobjdump names PTX by its target too: compute_80's is "bn.sm_80.ptx"
    ptx_archs = [a.replace("compute_", "sm_") for a in archs if a.startswith("compute_")]
    assert _cuobjdump("--list-elf", ext.__file__) == {
        f"{src}.{a}.cubin" for src in sources for a in sass_archs}
    assert _cuobjdump("--list-ptx", ext.__file__) == {
        f"{src}.{a}.ptx" for src in sources for a in ptx_archs}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the default set (nvcc 13 has them all)
        assert {"sm_80", "sm_90a", "compute_80"} <= set(archs), archs


def test_kernels_use_no_local_memory():
    """No register spills or local arrays in any kernel, for either target: the kernel report's
    rule (fastres.analysis.kernel_report), read from the extension's SASS and resource usage."""
    _C()
    targets = [a for a in _cuda_backend().BUILT_ARCHS if a.startswith("sm_")]
    from fastres.analysis import sass

    unknown = [t for t in targets if int(t[3:].rstrip("af")) not in sass.ARCHS]
    if unknown:
        pytest.skip(f"the SASS reader has no occupancy figures for {unknown} yet")
    rows = cuda_rows()
    assert len(rows) >= len(targets) * 12, f"expected every kernel for {targets}, got {len(rows)}"
    per_arch = collections.Counter(r["kernel"] for r in rows)
    assert set(per_arch.values()) == {len(targets)}, f"kernels not built for {targets}: {per_arch}"
    for r in rows:
        assert not r["violations"], f"{r['kernel']} {r['target']}: {r['violations']}"
        assert r["regs"] <= 128 and r["shared"] <= 48 * 1024, (
            f"{r['kernel']}: {r['regs']} regs, {r['shared']} B smem"
        )


# ---------------------------------------------------------------------------------------------
# Planning and dispatch (no GPU needed)
# ---------------------------------------------------------------------------------------------


def _call(device: str, dtype=torch.float16, groups=1, c=16, k=16, r=3, padding=1):
    conv = ConvParams((1, 1), (padding, padding), (1, 1), groups)
    return CallInfo(
        device=torch.device(device), dtype=dtype, x_shape=(2, c, 9, 9),
        weight_shape=(k, c // groups, r, r), conv=conv, batch_stats=True, has_residual=False,
        act="relu",
    )


def test_availability_on_cpu_names_the_reason():
    _C()
    reason = availability("cuda", _call("cpu"))
    assert reason is not None and "CUDA tensors" in reason and "cpu" in reason


def test_unsupported_dtype_reason():
    cuda = _cuda_backend()
    reason = cuda.CudaBackend().unsupported_reason(_call("cuda", dtype=torch.float64))
    assert reason is not None and "float64" in reason


def test_silu_refused_with_reason_and_auto_serves_it_elsewhere(monkeypatch):
    """The CUDA C++ kernels apply ReLU or nothing: SiLU is refused naming it, and ``auto``
    never sends it there (with triton refusing too, it falls back to reference)."""
    from fastres.backends import select
    from fastres.backends.triton import TritonBackend

    cuda = _cuda_backend()
    relu_call = _call("cuda")
    silu_call = dataclasses.replace(relu_call, act="silu")
    assert cuda.CudaBackend().unsupported_reason(relu_call) is None
    reason = cuda.CudaBackend().unsupported_reason(silu_call)
    assert reason is not None and "silu" in reason and "triton and reference" in reason
    with pytest.raises(BackendUnavailableError, match="silu"):
        select(silu_call, "cuda")
    monkeypatch.setattr(TritonBackend, "unsupported_reason", lambda self, call: "not here")
    assert select(relu_call, "auto") == "cuda"
    assert select(silu_call, "auto") == "reference"


def test_unsupported_filter_reason():
    cuda = _cuda_backend()
    reason = cuda.CudaBackend().unsupported_reason(
        _call("cuda", dtype=torch.float32, r=25, padding=12)
    )
    assert reason is not None and "too large" in reason


def test_cuda_backend_on_cpu_tensors_raises_with_reason():
    _C()
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        fastres.ops.conv_bn_relu(
            x, w, None, None, None, None, training=True, padding=1, backend="cuda"
        )


@pytest.mark.parametrize(
    ("case", "dtype", "path"),
    [
        (Case(groups=8, c=32, k=32), torch.float16, "direct"),  # 4 channels per group
        (Case(groups=16, c=16, k=16), torch.bfloat16, "direct"),  # depthwise
        (Case(c=5, k=7), torch.float16, "direct"),  # odd channels
        (Case(c=64, k=64), torch.float32, "direct"),  # fp32 stays on CUDA cores
    ],
)
def test_plan_path_and_tiles(case, dtype, path):
    cuda = _cuda_backend()
    conv = case.conv
    got, tiles, reason = cuda.plan(
        (case.n, case.c, case.h, case.w), (case.k, case.c // case.groups, *case.kernel), conv,
        dtype,
    )
    assert reason is None
    assert got == path
    oh, ow = case.out_hw
    assert tiles == case.n * -(-oh // 8) * -(-ow // 8)  # 8x8 output tiles fit these shapes


@pytest.mark.parametrize(
    ("case", "dtype"),
    [
        (Case(c=64, k=64), torch.float16),  # dense
        (Case(groups=2, c=32, k=32), torch.bfloat16),  # 16 channels per group
        (Case(n=3, c=32, k=24, h=7, w=6, stride=2), torch.float16),  # partial row and column tiles
    ],
)
def test_plan_implicit_gemm(case, dtype):
    cuda = _cuda_backend()
    conv = case.conv
    got, tiles, reason = cuda.plan(
        (case.n, case.c, case.h, case.w), (case.k, case.c // case.groups, *case.kernel), conv,
        dtype,
    )
    assert reason is None
    assert got == "implicit_gemm"
    oh, ow = case.out_hw
    assert tiles == -(-(case.n * oh * ow) // 64)  # 64-row blocks of M = N * OH * OW


def test_plan_validates_shapes():
    _C()
    with pytest.raises(RuntimeError, match="groups=3 must divide"):
        torch.ops.fastres_cuda.conv_plan(
            [2, 16, 9, 9], [16, 16, 3, 3], [1, 1], [1, 1], [1, 1], 3, torch.float16
        )
    with pytest.raises(RuntimeError, match="stride must have 2 entries"):
        torch.ops.fastres_cuda.conv_plan(
            [2, 16, 9, 9], [16, 16, 3, 3], [1], [1, 1], [1, 1], 1, torch.float16
        )
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.fastres_cuda.conv_plan(
            [2, 16, 9, 9], [16, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1, torch.float64
        )


def test_ops_have_no_cpu_kernel():
    _C()
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(4, 4, 3, 3).contiguous(memory_format=CL)
    out = torch.empty(1, 4, 5, 5).contiguous(memory_format=CL)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.fastres_cuda.conv(
            x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, True, out, torch.empty(0)
        )


def test_autotune_uses_cached_choice(tmp_path, monkeypatch):
    cuda = _cuda_backend()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cuda, "_tuned", None)
    monkeypatch.setattr(cuda, "_key", lambda call: "the-key")
    path = cuda.autotune_cache_path()
    assert path == str(tmp_path / "fastres" / "backend_autotune.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"the-key": ["cuda", "triton"]}, f)
    never = lambda name, call: pytest.fail("a cached choice is not measured again")
    order = cuda.autotuned_order(_call("cuda"), ("triton", "cuda", "reference"), never)
    assert order == ("cuda", "triton", "reference")


def test_autotune_lets_pytorch_win_where_it_is_faster(tmp_path, monkeypatch):
    cuda = _cuda_backend()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FASTRES_AUTOTUNE_BACKEND", "1")
    monkeypatch.setattr(cuda, "_tuned", None)
    measured = {"triton": 2.0, "cuda": 3.0, "reference": 1.0}
    monkeypatch.setattr(fastres.backends, "_call_timer", lambda name, call: measured[name])
    monkeypatch.setattr(cuda, "_key", lambda call: "the-key")  # the real key names the GPU
    # no GPU here: the measurement's RNG fork on the CUDA device is not the point
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    call = _call("cuda")
    assert cuda.autotuned_order(call, ("triton", "cuda", "reference"),
                                fastres.backends._call_timer) == ("reference", "triton", "cuda")
    assert fastres.backends.select(call, "auto") == "reference"
    with open(cuda.autotune_cache_path()) as f:  # kept for the next process
        assert json.load(f) == {"the-key": ["reference", "triton", "cuda"]}


def test_auto_order_static_without_autotune(monkeypatch):
    monkeypatch.delenv("FASTRES_AUTOTUNE_BACKEND", raising=False)
    assert fastres.backends.auto_order(_call("cuda")) == ("triton", "cuda", "reference")
    monkeypatch.setenv("FASTRES_AUTOTUNE_BACKEND", "1")
    assert fastres.backends.auto_order(_call("cpu")) == ("reference",)


@pytest.mark.gpu
def test_autotune_measures_and_caches(tmp_path, monkeypatch):
    cuda = _cuda_backend()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FASTRES_AUTOTUNE_BACKEND", "1")
    monkeypatch.setattr(cuda, "_tuned", None)
    call = _call("cuda")
    order = fastres.backends.auto_order(call)
    assert set(order) == {"triton", "cuda", "reference"}  # all three measured, fastest first
    with open(cuda.autotune_cache_path()) as f:
        cached = json.load(f)
    assert cached[cuda._key(call)] == list(order)


# ---------------------------------------------------------------------------------------------
# The orchestration traced with fake CUDA tensors (no GPU needed): shapes, dtypes, layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_forward_backward_trace_with_fake_cuda_tensors(batch_stats, save, residual):
    cuda = _cuda_backend()
    backend = cuda.CudaBackend()
    conv = ConvParams((2, 2), (1, 1), (1, 1), 8)
    with FakeTensorMode():
        dev = torch.device("cuda")
        x = torch.empty(2, 32, 9, 9, device=dev, dtype=torch.bfloat16).contiguous(memory_format=CL)
        w = torch.empty(32, 4, 3, 3, device=dev, dtype=torch.bfloat16)
        vec = torch.empty(32, device=dev)
        res = (
            torch.empty(2, 32, 5, 5, device=dev, dtype=torch.bfloat16).contiguous(
                memory_format=CL
            )
            if residual
            else None
        )
        z, y, mean, var = backend.forward(
            x, w, None, vec, vec, vec, vec, res, conv=conv, batch_stats=batch_stats, eps=1e-5,
            act="relu", save_for_backward=save,
        )
        assert z.shape == (2, 32, 5, 5) and z.dtype == torch.bfloat16 and z.device.type == "cuda"
        assert z.is_contiguous(memory_format=CL)
        assert mean.shape == var.shape == (32,) and mean.dtype == torch.float32
        assert y.shape == ((2, 32, 5, 5) if save else (0,))
        if not save:
            return
        dz = torch.empty_like(z)
        grads = backend.backward(
            dz, x, w, y, z, mean, var, vec, bn_bias=None, residual=None, conv=conv,
            batch_stats=batch_stats, eps=1e-5, act="relu", has_bias=False,
            output_mask=(True, True, False, True, True, residual),
        )
        dx, dw, db, dgamma, dbeta, dres = grads
        assert dx.shape == x.shape and dw.shape == w.shape and db is None
        assert dgamma.shape == dbeta.shape == (32,) and dgamma.dtype == torch.float32
        assert (dres is not None) == residual
        if residual:
            assert dres.shape == z.shape and dres.dtype == torch.bfloat16


def test_fake_conv_checks_partials_shape():
    _cuda_backend()
    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 9, device="cuda", dtype=torch.float16)
        x = x.contiguous(memory_format=CL)
        w = torch.empty(16, 16, 3, 3, device="cuda", dtype=torch.float16)
        out = torch.empty_like(x)
        good = torch.empty(3, 3, 16, device="cuda")  # 162 rows of M in 64-row tiles
        torch.ops.fastres_cuda.conv(
            x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, False, out, good
        )
        with pytest.raises(RuntimeError, match="partials must be"):
            torch.ops.fastres_cuda.conv(
                x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, False, out,
                torch.empty(3, 2, 16, device="cuda"),
            )


@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grid_traces_with_fake_cuda_tensors(case, dtype, batch_stats):
    """Every case of the equivalence grid through the backend with fake CUDA tensors: the fake
    kernels check output and partials shapes against the plan the binding enforces."""
    cuda = _cuda_backend()
    backend = cuda.CudaBackend()
    conv = case.conv
    k, cg = case.k, case.c // case.groups
    oh, ow = case.out_hw
    with FakeTensorMode():
        dev = torch.device("cuda")
        x = torch.empty(case.n, case.c, case.h, case.w, device=dev, dtype=dtype)
        x = x.contiguous(memory_format=CL)
        w = torch.empty(k, cg, *case.kernel, device=dev, dtype=dtype)
        bias = torch.empty(k, device=dev, dtype=dtype) if case.bias else None
        vec = torch.empty(k, device=dev)
        res = None
        if case.residual:
            res = torch.empty(case.n, k, oh, ow, device=dev, dtype=dtype)
            res = res.contiguous(memory_format=CL)
        for save in (False, True):
            z, y, mean, var = backend.forward(
                x, w, bias, vec, vec, vec, vec, res, conv=conv, batch_stats=batch_stats,
                eps=1e-5, act="relu" if case.relu else None, save_for_backward=save,
            )
            assert z.shape == (case.n, k, oh, ow) and z.is_contiguous(memory_format=CL)
        grads = backend.backward(
            torch.empty_like(z), x, w, y, z, mean, var, vec, bn_bias=None, residual=None,
            conv=conv,
            batch_stats=batch_stats, eps=1e-5, act="relu" if case.relu else None,
            has_bias=case.bias, output_mask=(True,) * 6,
        )
        assert grads[0].shape == x.shape and grads[1].shape == w.shape
        assert (grads[2] is not None) == case.bias


# ---------------------------------------------------------------------------------------------
# The kernels themselves, on the CPU: csrc/*.cu compiled by g++ against csrc/emu/cuda_emu.h (a
# host emulation of blocks, threads, __syncthreads, shared memory and WMMA), driven through the
# real CudaBackend and op layer with the equivalence rule of tests/numerics.py.
# ---------------------------------------------------------------------------------------------

_EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P = ctypes.c_void_p


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx = shutil.which("g++")
    toolkit = _toolkit()
    if cxx is None or toolkit is None:
        pytest.skip("the kernel emulation needs g++ and the CUDA toolkit headers")
    out = tmp_path_factory.mktemp("emu")
    srcs = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    flags = [
        "-std=c++20", "-O1", "-fPIC", "-DFASTRES_EMU", "-Wno-unknown-pragmas",
        f"-I{toolkit}/include", f"-I{ROOT}/csrc",
    ]
    procs, objs = [], []
    for src in [*srcs, os.path.join(ROOT, "csrc", "emu", "emu_api.cpp")]:
        obj = str(out / (os.path.basename(src) + ".o"))
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        procs.append(subprocess.Popen([cxx, *flags, *lang, "-c", src, "-o", obj],
                                      stderr=subprocess.PIPE, text=True))
        objs.append(obj)
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, f"emulation build failed:\n{err}"
    lib_path = str(out / "libfastres_emu.so")
    subprocess.run([cxx, "-shared", "-pthread", "-o", lib_path, *objs], check=True)
    lib = ctypes.CDLL(lib_path)
    for name in ("emu_conv", "emu_conv_check", "emu_bn_finalize", "emu_bn_apply",
                 "emu_bn_backward"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.emu_conv_tiles.restype = ctypes.c_int64
    lib.emu_bn_backward_workspace.restype = ctypes.c_int64
    lib.emu_bn_finalize.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, _P, _P, ctypes.c_float,
                                    _P, _P, _P, _P]
    lib.emu_bn_apply.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int, ctypes.c_int]
    lib.emu_bn_backward.argtypes = [_P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_int,
                                    ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int]
    lib.emu_bn_backward_workspace.argtypes = [ctypes.c_int64, ctypes.c_int64]
    return lib


def _check_ok(err: bytes | None) -> None:
    assert err is None, err.decode()


class _Guarded:
    """Guard buffers (DESIGN.md section 4): each tensor a kernel sees sits between two runs of
    NaN. An out-of-bounds read then turns an output into NaN (caught by the NaN check), and an
    out-of-bounds write shows as a guard that is no longer NaN."""

    GUARD = 256  # elements on each side; keeps 16-byte alignment for every dtype

    def __init__(self):
        self.outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _place(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.full((t.numel() + 2 * self.GUARD,), float("nan"), dtype=t.dtype)
        return buf, buf.as_strided(t.shape, t.stride(), self.GUARD)

    def inp(self, t: torch.Tensor | None):
        if t is None or t.numel() == 0:
            return None
        buf, view = self._place(t)
        view.copy_(t)
        self.inputs.append((buf, t))
        return ctypes.c_void_p(view.data_ptr())

    def out(self, t: torch.Tensor | None):
        if t is None or t.numel() == 0:
            return None
        buf, view = self._place(t)
        self.outputs.append((buf, view, t))
        return ctypes.c_void_p(view.data_ptr())

    def finish(self, err: bytes | None) -> None:
        _check_ok(err)
        g = self.GUARD
        for buf, _ in self.inputs:
            assert buf[:g].isnan().all() and buf[-g:].isnan().all(), "write before/after an input"
        for buf, view, t in self.outputs:
            assert buf[:g].isnan().all(), "a kernel wrote before the start of an output"
            assert buf[-g:].isnan().all(), "a kernel wrote past the end of an output"
            t.copy_(view)


class EmuOps:
    """Stands in for ``torch.ops.fastres_cuda`` with the emulated kernels on CPU tensors, each
    behind guard buffers; checks layouts as csrc/ops.cpp does."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _shape(x_shape, w_shape, stride, padding, dilation, groups):
        n, c, h, w = x_shape
        k, _, r, s = w_shape
        conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
        oh, ow = conv.out_hw(h, w, r, s)
        sizes = (ctypes.c_int64 * 9)(n, h, w, c, k, r, s, oh, ow)
        params = (ctypes.c_int * 7)(*stride, *padding, *dilation, groups)
        return sizes, params

    def conv_plan(self, x_shape, w_shape, stride, padding, dilation, groups, dtype):
        sizes, params = self._shape(x_shape, w_shape, stride, padding, dilation, groups)
        code = _EMU_DTYPES[dtype]
        why = self.lib.emu_conv_check(sizes, params, code)
        return (
            self.lib.emu_conv_path(sizes, params, code),
            self.lib.emu_conv_tiles(sizes, params, code),
            "" if why is None else why.decode(),
        )

    def conv(self, x, weight, bias, scale, shift, residual, stride, padding, dilation, groups,
             relu, out, partials):
        for t in (x, weight, out, residual):
            assert t is None or t.is_contiguous(memory_format=CL)
        sizes, params = self._shape(x.shape, weight.shape, stride, padding, dilation, groups)
        g = _Guarded()
        g.finish(self.lib.emu_conv(
            sizes, params, _EMU_DTYPES[x.dtype], g.inp(x), g.inp(weight), g.inp(bias),
            g.inp(scale), g.inp(shift), g.inp(residual), g.out(out), g.out(partials), int(relu),
        ))

    def bn_finalize(self, partials, gamma, beta, eps, mean, var, scale, shift):
        g = _Guarded()
        g.finish(self.lib.emu_bn_finalize(
            g.inp(partials), partials.shape[1], partials.shape[2], g.inp(gamma), g.inp(beta), eps,
            g.out(mean), g.out(var), g.out(scale), g.out(shift),
        ))

    def bn_apply(self, y, scale, shift, residual, relu, z):
        k = y.shape[1]
        g = _Guarded()
        g.finish(self.lib.emu_bn_apply(
            g.inp(y), g.inp(scale), g.inp(shift), g.inp(residual), g.out(z), y.numel() // k, k,
            int(relu), _EMU_DTYPES[y.dtype],
        ))

    def bn_backward(self, dz, y, z, mean, var, gamma, eps, batch_stats, relu, dy, dres, dgamma,
                    dbeta):
        k = y.shape[1]
        m = y.numel() // k
        work = torch.empty(self.lib.emu_bn_backward_workspace(m, k))
        g = _Guarded()
        g.finish(self.lib.emu_bn_backward(
            g.inp(dz), g.inp(y), g.inp(z), g.inp(mean), g.inp(var), g.inp(gamma), eps,
            int(batch_stats), int(relu), g.out(dy), g.out(dres), g.out(dgamma), g.out(dbeta),
            g.out(work), m, k, _EMU_DTYPES[y.dtype],
        ))


def test_guard_buffers_catch_out_of_bounds_writes(emu_lib):
    """The emulation's guards can fail: an output one image too small is overrun."""
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=CL)
    w = torch.randn(8, 8, 1, 1).contiguous(memory_format=CL)
    small = torch.empty(1, 8, 2, 2).contiguous(memory_format=CL)
    ops = EmuOps(emu_lib)
    with pytest.raises(AssertionError, match="past the end"):
        ops.conv(x, w, None, None, None, None, [1, 1], [0, 0], [1, 1], 1, False, small,
                 torch.empty(0))


@pytest.fixture
def emulated_cpu_kernels(emu_lib):
    """The emulated kernels registered as the CPU kernels of the fastres_cuda ops (removed after
    the test), so torch.library.opcheck can exercise schemas, fakes and mutation on CPU."""
    _cuda_backend()
    ops = EmuOps(emu_lib)
    lib = torch.library.Library("fastres_cuda", "IMPL")
    for name in ("conv", "bn_finalize", "bn_apply", "bn_backward"):
        lib.impl(name, getattr(ops, name), "CPU")
    yield
    lib._destroy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_opcheck_with_emulated_kernels(emulated_cpu_kernels, dtype):
    _opcheck_all(dtype, "cpu")


@pytest.fixture
def emulated_cuda_backend(emu_lib, monkeypatch):
    """The real CudaBackend, serving CPU tensors with the emulated kernels."""
    cuda = _cuda_backend()
    monkeypatch.setattr(cuda, "ops", EmuOps(emu_lib))
    real = cuda.CudaBackend.unsupported_reason

    def on_cpu(self, call):
        return real(self, dataclasses.replace(call, device=torch.device("cuda")))

    monkeypatch.setattr(cuda.CudaBackend, "unsupported_reason", on_cpu)
    return cuda


def run_cuda_case(
    case: Case, dtype: torch.dtype, training: bool, grad: bool, device: str, steps: int = 1
) -> None:
    """run_case on the cuda backend; inference with running statistics must be one conv launch
    with the folded BN scale/shift, residual and ReLU in its epilogue (no bn_apply)."""
    cuda = _cuda_backend()
    recorder = _RecordingOps(cuda.ops)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda, "ops", recorder)
        run_case(case, dtype, training, "cuda", device=device, steps=steps, grad=grad)
    if training or grad or not case.running:
        return
    launches = [(name, a) for name, a in recorder.calls if name in ("conv", "bn_apply")]
    assert [name for name, _ in launches] == ["conv"] * steps, recorder.calls
    assert all(a[3] is not None for _, a in launches), "a conv ran without the folded BN scale"


# The emulation is slow (~2 s a case): by default a subset that still reaches every kernel path
# and option: 1x1 / 7x7 / rectangular, dilation, residual in apply and in the epilogue, eval-mode
# backward, affine=False, bias in training, mean ≫ std; the whole grid is marked slow.
_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_EMU_DEFAULT = {
    (Case(r=1, padding=0, stride=2, c=32, k=64).id, _F16, "train"),
    (Case(r=7, stride=2, padding=3, c=3, h=17, w=15, k=16).id, _F32, "eval"),
    (Case(n=1, h=5, w=7, residual=True).id, _BF16, "train"),
    (Case(relu=False, bias=True).id, _F32, "train"),
    (Case(affine=False, running=False).id, _F16, "train"),
    (Case(dilation=2, padding=2).id, _F32, "eval"),  # direct kernel (fp32)
    (Case(groups=8, c=32, k=32, stride=2).id, _BF16, "infer"),
    (Case(layout="contiguous", residual=True).id, _F16, "eval"),
    (Case(mean_offset=True, padding=0, residual=True).id, _F32, "train"),
    (Case(r=(1, 3), padding=(0, 1), residual=True, h=7, w=8).id, _F32, "infer"),
    (CASES[-1].id, _F16, "train"),  # rectangular, asymmetric everything, grouped
}


def _emulated_grid():
    for case in CASES:
        for dtype in DTYPES:
            for mode in MODES:
                default = (case.id, dtype, mode.id) in _EMU_DEFAULT
                yield pytest.param(
                    case, dtype, *mode.values, marks=() if default else (pytest.mark.slow,),
                    id=f"{case.id}-{str(dtype).split('.')[-1]}-{mode.id}",
                )


def test_emulated_default_subset_exists():
    ids = {(c.id, d, m.id) for c in CASES for d in DTYPES for m in MODES}
    assert ids >= _EMU_DEFAULT, _EMU_DEFAULT - ids


@pytest.mark.parametrize(("case", "dtype", "training", "grad"), list(_emulated_grid()))
def test_emulated_kernels_equivalence_grid(emulated_cuda_backend, case, dtype, training, grad):
    run_cuda_case(case, dtype, training, grad, device="cpu", steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "case",
    [
        Case(groups=8, c=32, k=32, residual=True, bias=True),  # direct, fused eval epilogue
        Case(c=32, k=48, h=11, w=10, residual=True),  # implicit GEMM for fp16/bf16
        Case(n=3, c=16, k=8, h=13, w=12, stride=2, bias=True, relu=False),
    ],
    ids=lambda c: c.id,
)
def test_emulated_eval_inference_single_kernel(emulated_cuda_backend, case, dtype):
    run_cuda_case(case, dtype, False, False, device="cpu")


@pytest.mark.parametrize("training, grad", MODES)
def test_emulated_backend_makes_no_host_sync(emulated_cuda_backend, training, grad):
    syncs = op_pass_syncs(Case(residual=True, bias=True), training, grad, "cuda")
    assert not syncs, syncs


# (case, dtype) for each conv kernel: implicit GEMM (fp16, 16+ channels per group) and direct
_NONFINITE = [
    (Case(c=32, k=48, h=11, w=10, residual=True), torch.float16),
    (Case(groups=8, c=32, k=32, residual=True), torch.float32),
]


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize(("case", "dtype"), _NONFINITE, ids=lambda v: getattr(v, "id", str(v)))
def test_emulated_nan_and_inf_as_eager(emulated_cuda_backend, case, dtype, training, grad):
    """The host's fmaxf drops NaN like the GPU's, so the emulation shows a max-based ReLU."""
    check_nonfinite(case, dtype, training, grad, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize(("case", "dtype"), _NONFINITE, ids=lambda v: getattr(v, "id", str(v)))
def test_nan_and_inf_as_eager(case, dtype, training, grad):
    _C()
    check_nonfinite(case, dtype, training, grad, "cuda", device="cuda")


@pytest.mark.parametrize(
    ("case", "dtype", "path"),
    [
        (Case(c=32, k=48, h=11, w=10), torch.bfloat16, "implicit_gemm"),
        (Case(groups=2, c=64, k=96, h=7, w=9, stride=2), torch.float16, "implicit_gemm"),
        (Case(groups=4, c=64, k=64, h=6, w=6), torch.float16, "implicit_gemm"),
        (Case(groups=32, c=128, k=128, h=6, w=7), torch.bfloat16, "direct"),  # ResNeXt 32x4d
        (Case(groups=64, c=64, k=64, h=5, w=5, r=3), torch.float32, "direct"),  # depthwise
    ],
    ids=lambda v: getattr(v, "id", str(v)),
)
def test_emulated_kernel_paths(emulated_cuda_backend, case, dtype, path):
    conv = case.conv
    got, _, _ = emulated_cuda_backend.plan(
        (case.n, case.c, case.h, case.w), (case.k, case.c // case.groups, *case.kernel), conv,
        dtype,
    )
    assert got == path
    run_case(case, dtype, True, backend="cuda", device="cpu")


# ---------------------------------------------------------------------------------------------
# GPU: the kernels themselves
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_equivalence_grid(case, dtype, training, grad):
    _C()
    run_cuda_case(case, dtype, training, grad, device="cuda", steps=2)


class _RecordingOps:
    """Stands in for ``fastres.backends.cuda.ops`` and records which ops are called."""

    def __init__(self, ops):
        self._ops, self.calls = ops, []

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*args, **kwargs):
            self.calls.append((name, args))
            return op(*args, **kwargs)

        return call


def _opcheck_all(dtype: torch.dtype, dev: str) -> None:
    x = torch.randn(2, 32, 9, 9, device=dev, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(32, 4, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=CL)
    out = torch.empty(2, 32, 9, 9, device=dev, dtype=dtype).contiguous(memory_format=CL)
    _, tiles, _ = torch.ops.fastres_cuda.conv_plan(
        [2, 32, 9, 9], [32, 4, 3, 3], [1, 1], [1, 1], [1, 1], 8, dtype
    )
    partials = torch.empty(3, tiles, 32, device=dev)
    torch.library.opcheck(
        torch.ops.fastres_cuda.conv.default,
        (x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 8, True, out, partials),
    )
    vec = lambda: torch.rand(32, device=dev) + 0.5
    torch.library.opcheck(
        torch.ops.fastres_cuda.bn_finalize.default,
        (partials.abs() + 1, vec(), vec(), 1e-5, vec(), vec(), vec(), vec()),
    )
    z = torch.empty_like(out)
    torch.library.opcheck(
        torch.ops.fastres_cuda.bn_apply.default, (out, vec(), vec(), None, True, z)
    )
    dz = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastres_cuda.bn_backward.default,
        (dz, out, z, vec(), vec(), vec(), 1e-5, True, True, torch.empty_like(out),
         torch.empty_like(out), vec(), vec()),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_opcheck(dtype):
    _cuda_backend()
    _opcheck_all(dtype, "cuda")


@pytest.mark.gpu
def test_conv_rejects_bad_tensors():
    _C()
    x = torch.randn(2, 8, 5, 5, device="cuda").contiguous(memory_format=CL)
    w = torch.randn(8, 8, 3, 3, device="cuda").contiguous(memory_format=CL)
    out = torch.empty(2, 8, 5, 5, device="cuda").contiguous(memory_format=CL)
    none = torch.empty(0, device="cuda")
    args = [None, None, None, None, [1, 1], [1, 1], [1, 1], 1, True]
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.fastres_cuda.conv(x.contiguous(), w, *args, out, none)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        torch.ops.fastres_cuda.conv(x, w.half(), *args, out, none)
    with pytest.raises(RuntimeError, match="out has shape"):
        torch.ops.fastres_cuda.conv(x, w, *args, out[:1], none)
    with pytest.raises(RuntimeError, match="partials must be"):
        torch.ops.fastres_cuda.conv(x, w, *args, out, torch.empty(3, 1, 8, device="cuda"))
