"""The fused op against float64 and eager PyTorch, on every CPU-capable backend."""

import pytest
import torch

from tests.ops.cases import CASES, Case, run_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_backend(case: Case, dtype: torch.dtype, training: bool) -> None:
    run_case(case, dtype, training, "reference")


def test_running_stats_after_several_steps() -> None:
    run_case(Case(residual=True), torch.float32, True, "reference", steps=3)
