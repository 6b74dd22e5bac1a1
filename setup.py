"""Build script: the pure-Python package, plus the CUDA extension ``fastres._C`` where buildable.

Install torch first, then ``pip install --no-build-isolation -e .`` (torch is deliberately not a
build requirement). The extension is built when torch is importable, torch is a CUDA build and a
CUDA toolkit (nvcc plus headers) is found; otherwise the package installs without it and says why.
``FASTRES_NO_CUDA_EXT=1`` skips it on purpose.

Layout of csrc/: the ``.cu`` files are plain CUDA C++ (no torch headers, seconds to compile) behind
the C-style launcher API of ``csrc/kernels.h``; ``csrc/ops.cpp`` is the only file that includes
torch: it validates tensors and registers the ``fastres_cuda`` ops.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_80 (A100) and sm_90a (H100, with the Hopper-only instructions); no PTX fallback is shipped.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
]


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
    # With no GPU present torch's arch detection fails; the real targets are the -gencode flags.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _say(f"building the CUDA extension fastres._C with the toolkit at {cuda_home}")
    sources = [*sorted(glob.glob("csrc/*.cu")), "csrc/ops.cpp"]
    ext = CUDAExtension(
        name="fastres._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O2", "-g0"],
            # no --use_fast_math: BN statistics need exact division and sqrt
            "nvcc": ["-O3", "-lineinfo", *GENCODE],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
