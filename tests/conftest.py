"""Test configuration shared by the whole suite.

Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET`` must be set before
any ``@triton.jit`` function is created, so it is set here, before fastres is imported.
Outputs are poisoned (NaN-filled) before every kernel run so unwritten elements show.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTRES_POISON", "1")

import pytest

import fastres.backends._alloc as _alloc

_alloc.set_poison(True)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
