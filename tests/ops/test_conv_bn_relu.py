"""The fused op against float64 and eager PyTorch, on every CPU-capable backend."""

import pytest
import torch

from tests.ops.cases import CASES, MODES, SILU_CASES, Case, run_case
from tests.ops.nonfinite import check_nonfinite

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grid():
    # inference (no autograd) runs the same eager code here as eval: fp32 is enough
    for mode in MODES:
        for dtype in DTYPES if mode.id != "infer" else DTYPES[:1]:
            yield pytest.param(dtype, *mode.values, id=f"{dtype}-{mode.id}")


@pytest.mark.parametrize("dtype, training, grad", list(_grid()))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_backend(case: Case, dtype: torch.dtype, training: bool, grad: bool) -> None:
    run_case(case, dtype, training, "reference", grad=grad)


@pytest.mark.parametrize("dtype, training, grad", list(_grid()))
@pytest.mark.parametrize("case", SILU_CASES, ids=lambda c: c.id)
def test_reference_backend_silu(case: Case, dtype: torch.dtype, training: bool,
                                grad: bool) -> None:
    run_case(case, dtype, training, "reference", grad=grad)


def test_running_stats_after_several_steps() -> None:
    run_case(Case(residual=True), torch.float32, True, "reference", steps=3)


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_reference_nan_and_inf_as_eager(training: bool, grad: bool, act: str) -> None:
    check_nonfinite(Case(residual=True, act=act), torch.float32, training, grad, "reference")
