"""The mutation check's plants still fit the code: each snippet occurs exactly once (a plant
whose snippet drifted away would silently stop checking anything)."""

from pathlib import Path

import pytest

from tests.mutation.plants import PLANTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.name)
def test_plant_snippet_occurs_once(plant) -> None:
    text = (ROOT / plant.path).read_text()
    assert text.count(plant.original) == 1, f"{plant.path}: {plant.original!r}"
    assert plant.replacement != plant.original
    assert all((ROOT / t).exists() for t in plant.tests if t.startswith("tests/")), plant.tests
