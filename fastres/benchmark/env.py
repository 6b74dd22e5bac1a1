"""The environment a result was measured in: card, driver, versions, fastres commit, date."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

import fastres


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The fastres source commit (with ``-dirty`` if the tree has changes), if in a checkout;
    else ``FASTRES_COMMIT`` (a copy of the tree without .git, as on a borrowed GPU machine)."""
    root = Path(fastres.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return os.environ.get("FASTRES_COMMIT") or None
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit + ("-dirty" if status else "")


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def gpu_record(device: torch.device | None = None) -> dict | None:
    """Name, capability, memory, SM count and L2 of the CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
    }


def environment() -> dict:
    """Everything a result needs to be read later."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version(),
        "fastres": fastres.__version__,
        "fastres_commit": git_commit(),
        "gpu": gpu_record(),
        "driver": driver_version(),
        # how fastres's Triton kernels chose their configurations in this run
        "fastres_triton_autotune": os.environ.get("FASTRES_TRITON_AUTOTUNE", "1") != "0",
    }


def card_slug(env: dict) -> str:
    """A folder-name-safe name of the card (``cpu`` without a GPU)."""
    gpu = env.get("gpu")
    name = gpu["name"] if gpu else "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower() or "unknown"
