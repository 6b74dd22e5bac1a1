"""Backend selection: names, context, environment variable, reasons, auto fallback."""

import os
import subprocess
import sys

import pytest
import torch

import fastres
from fastres import backends
from fastres.backends import BackendUnavailableError, CallInfo, ConvParams


def _call(device="cpu", dtype=torch.float32):
    return CallInfo(
        device=torch.device(device), dtype=dtype, x_shape=(2, 8, 5, 5), weight_shape=(8, 8, 3, 3),
        conv=ConvParams((1, 1), (1, 1), (1, 1), 1), batch_stats=True, has_residual=False,
        act="relu",
    )


def test_auto_on_cpu_is_reference():
    assert backends.select(_call(), "auto") == "reference"


def test_auto_never_fails_where_reference_works():
    assert backends.select(_call(dtype=torch.float64), "auto") == "reference"


def test_cuda_backend_on_cpu_call_names_the_reason():
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot serve this call"):
        backends.select(_call(), "cuda")


def test_use_backend_nests_and_restores():
    fastres.set_backend("auto")
    with fastres.use_backend("reference"):
        with fastres.use_backend("auto"):
            assert fastres.get_backend() == "auto"
        assert fastres.get_backend() == "reference"
    assert fastres.get_backend() == "auto"


def test_set_backend_is_process_wide():
    try:
        fastres.set_backend("reference")
        assert fastres.get_backend() == "reference"
    finally:
        fastres.set_backend("auto")


def test_environment_variable_sets_default():
    env = dict(os.environ, FASTRES_BACKEND="reference")
    out = subprocess.run(
        [sys.executable, "-c", "import fastres; print(fastres.get_backend())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "reference"


class _Stub:
    """A backend that serves every call, or none (``reason``)."""

    def __init__(self, name: str, reason: str | None = None):
        self.name, self.reason = name, reason

    def unsupported_reason(self, call):
        return self.reason


@pytest.fixture
def stub_backends(monkeypatch):
    """Replace the loaded backends by stubs: ``install(triton=..., cuda=...)`` with a reason
    string (cannot serve), None (serves) or "unloadable" (fails to load)."""
    monkeypatch.delenv("FASTRES_AUTOTUNE_BACKEND", raising=False)

    def install(**reasons):
        instances = {"reference": _Stub("reference")}
        errors = {}
        for name, reason in reasons.items():
            if reason == "unloadable":
                errors[name] = "ImportError: not built here"
            else:
                instances[name] = _Stub(name, reason)
        monkeypatch.setattr(backends, "_instances", instances)
        monkeypatch.setattr(backends, "_load_errors", errors)

    return install


@pytest.mark.parametrize(
    "triton, cuda, chosen",
    [
        (None, None, "triton"),
        ("shape not supported", None, "cuda"),
        ("unloadable", None, "cuda"),
        ("shape not supported", "dtype not supported", "reference"),
        ("unloadable", "unloadable", "reference"),
    ],
)
def test_auto_on_cuda_falls_back_in_order(stub_backends, triton, cuda, chosen):
    stub_backends(triton=triton, cuda=cuda)
    assert backends.auto_order(_call("cuda")) == ("triton", "cuda", "reference")
    assert backends.select(_call("cuda"), "auto") == chosen


def test_named_backend_that_cannot_serve_raises_its_reason(stub_backends):
    stub_backends(triton="shape not supported", cuda="unloadable")
    with pytest.raises(BackendUnavailableError, match="'triton' cannot serve.*shape not supported"):
        backends.select(_call("cuda"), "triton")
    with pytest.raises(BackendUnavailableError, match="not available: ImportError: not built"):
        backends.select(_call("cuda"), "cuda")
