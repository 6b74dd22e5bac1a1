"""Build script: the pure-Python package, plus the CUDA extension ``fastres._C`` where buildable.

Install torch first, then ``pip install --no-build-isolation -e .`` (torch is deliberately not a
build requirement). The extension is built when torch is importable, torch is a CUDA build and a
CUDA toolkit (nvcc plus headers) is found; otherwise the package installs without it and says why.
``FASTRES_NO_CUDA_EXT=1`` skips it on purpose. The GPU architectures come from
``TORCH_CUDA_ARCH_LIST`` when set, else :data:`DEFAULT_ARCHS` (see :func:`cuda_archs`); the
library records them (``torch.ops.fastres_cuda.built_archs()``) for the load-time device check.

Layout of csrc/: the ``.cu`` files are plain CUDA C++ (no torch headers, seconds to compile) behind
the C-style launcher API of ``csrc/kernels.h``; ``csrc/ops.cpp`` is the only file that includes
torch: it validates tensors and registers the ``fastres_cuda`` ops.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The architectures built when TORCH_CUDA_ARCH_LIST is not set (no hardware is probed): A100
# (its code also runs on RTX 30 / A6000 / A10, 8.6, and Orin, 8.7), RTX 40 / L4 / L40S, H100 /
# H200 (with the Hopper-only instructions), B200 / GB200 (likewise), RTX 50; each where the
# installed nvcc can target it. Plus PTX for compute_80, which the driver compiles for any newer
# device without code of its own here (GB300's 10.3, Thor's 11.0, ...).
DEFAULT_ARCHS = ("8.0", "8.9", "9.0a", "10.0a", "12.0")
PTX_FALLBACK = "8.0"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")
# PyTorch's named entries of TORCH_CUDA_ARCH_LIST that can hold code here (sm_80 and newer; the
# older names give nothing: see cuda_archs)
_NAMED = {"Ampere": "8.0;8.6+PTX", "Ampere+Tegra": "8.7", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
          "Volta": "7.0", "Volta+Tegra": "7.2", "Turing": "7.5", "Pascal": "6.0;6.1",
          "Maxwell": "5.0;5.2", "Maxwell+Tegra": "5.3", "Kepler": "3.5", "Kepler+Tesla": "3.7"}
MIN_ARCH = (8, 0)  # the kernels use bf16 tensor-core instructions (wmma bf16: sm_80 and newer)


def _nvcc_targets(cuda_home: str) -> set[str] | None:
    """The real architectures (``sm_90``...) this toolkit's nvcc can compile for; None if it
    cannot say (an old nvcc without ``--list-gpu-code``)."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-code"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.split())


def cuda_archs(arch_list: str | None, nvcc_targets: set[str] | None) -> list[str]:
    """The code the extension holds, as ``sm_80`` / ``sm_90a`` (machine code) and
    ``compute_80`` (PTX) names, from ``TORCH_CUDA_ARCH_LIST`` (``arch_list``; entries like
    ``8.0``, ``9.0a``, ``12.0+PTX`` separated by ``;``, spaces or commas, as PyTorch reads it)
    or, when that is unset, :data:`DEFAULT_ARCHS` where nvcc supports them plus PTX for
    :data:`PTX_FALLBACK`."""
    if arch_list:
        named = [_NAMED.get(e, e) for e in re.split(r"[;,\s]+", arch_list.strip())]
        entries, explicit = re.split(r"[;,\s]+", ";".join(named)), True
    else:
        entries, explicit = [*DEFAULT_ARCHS, f"{PTX_FALLBACK}+PTX"], False
    codes: list[str] = []
    for entry in filter(None, entries):
        m = _ARCH.match(entry)
        if m is None:
            raise SystemExit(f"fastres: cannot read {entry!r} in TORCH_CUDA_ARCH_LIST (expected "
                             "entries like 8.0, 9.0a, 10.0a or 12.0+PTX)")
        major, minor, suffix, ptx = m.groups()
        sm = f"sm_{major}{minor}"
        if (int(major), int(minor)) < MIN_ARCH:
            # such devices are served by the reference backend (fastres info says so)
            _say(f"TORCH_CUDA_ARCH_LIST entry {entry} skipped: the CUDA kernels need sm_80 or "
                 "newer")
            continue
        if nvcc_targets is not None and sm not in nvcc_targets:
            if explicit:
                raise SystemExit(f"fastres: TORCH_CUDA_ARCH_LIST asks for {entry}, which this "
                                 f"nvcc cannot compile for (it knows {sorted(nvcc_targets)})")
            _say(f"nvcc cannot compile for {sm}: the extension will not hold code for it")
            continue
        if ptx:  # 12.0+PTX: the machine code and the PTX
            codes += [f"{sm}{suffix}", f"compute_{major}{minor}{suffix}"]
        else:
            codes.append(f"{sm}{suffix}")
    # "8.0+PTX" lists sm_80 again: keep each code once, in order
    return list(dict.fromkeys(codes))


def gencode_flags(codes: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags for :func:`cuda_archs`'s codes."""
    flags = []
    for code in codes:
        virtual = code.replace("sm_", "compute_")
        flags.append(f"-gencode=arch={virtual},code={code}")
    return flags


def _say(msg: str) -> None:
    print(f"fastres: {msg}", file=sys.stderr)


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(root, "bin", "nvcc"))
    )


def _find_cuda_home() -> str | None:
    """The toolkit root (the folder holding include/cuda_runtime.h and bin/nvcc).

    ``nvcc`` on PATH may be a wrapper script (then ``realpath(nvcc)/../..`` is not the toolkit), so
    absolute ``.../bin/nvcc`` paths named inside such a script are tried too.
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it runs
                for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for c in candidates:
        if _is_toolkit(c):
            return os.path.abspath(c)
    return None


def _extension_config() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for setup(); empty when the extension cannot be built here."""
    if os.environ.get("FASTRES_NO_CUDA_EXT", "0") == "1":
        _say("building without the CUDA extension because FASTRES_NO_CUDA_EXT=1")
        return [], {}
    try:
        import torch
    except ImportError:
        _say(
            "building without the CUDA extension because torch is not importable "
            "(install torch first, then `pip install --no-build-isolation -e .`)"
        )
        return [], {}
    if not torch.version.cuda:
        _say(
            f"building without the CUDA extension because torch {torch.__version__} "
            "is not a CUDA build"
        )
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _say(
            "building without the CUDA extension because no CUDA toolkit was found "
            "(set CUDA_HOME to the folder holding include/cuda_runtime.h and bin/nvcc)"
        )
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME at import time, so set it before importing it.
    os.environ["CUDA_HOME"] = cuda_home
    codes = cuda_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"), _nvcc_targets(cuda_home))
    if not codes:
        raise SystemExit("fastres: no CUDA architecture left to build for")
    # The -gencode flags are the targets: torch adds none of its own when they are given (with
    # no GPU present its arch detection would fail without TORCH_CUDA_ARCH_LIST anyway).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _say(f"building the CUDA extension fastres._C for {', '.join(codes)} with the toolkit at "
         f"{cuda_home}")
    sources = [*sorted(glob.glob("csrc/*.cu")), "csrc/ops.cpp"]
    ext = CUDAExtension(
        name="fastres._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # the library records what it holds (fastres_cuda::built_archs; checked at load)
            "cxx": ["-O2", "-g0", f"-DFASTRES_CUDA_ARCHS={','.join(codes)}"],
            # no --use_fast_math: BN statistics need exact division and sqrt
            "nvcc": ["-O3", "-lineinfo", *gencode_flags(codes)],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
