"""No kernel applies ReLU as ``max(v, 0)``: on a GPU that drops NaN (PTX ``max.f32`` and
``fmaxf`` return the non-NaN operand) where ``torch.relu`` propagates it. The interpreter's and
the host's max differ from the GPU's, so the CPU tests cannot always see it; this reads the
sources (the kernel report, fastres/analysis/kernel_report.py, also reads the compiled conv
kernels' PTX)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a max with a literal zero operand, either side: tl.maximum(acc, 0.0), fmaxf(0.f, v), max(v, 0)
_ZERO = r"0(?:\.0*)?f?"
MAX_WITH_ZERO = re.compile(
    rf"\b(?:tl\.maximum|fmaxf?|max)\(\s*(?:{_ZERO}\s*,[^,()]+|[^,()]+,\s*{_ZERO})\s*\)"
)
ALLOWED: set[tuple[str, str]] = set()  # (file, line) of a max with 0 that may drop NaN


def _kernel_sources() -> list[Path]:
    return sorted([*ROOT.glob("fastres/backends/triton/*.py"), *ROOT.glob("csrc/*.cu"),
                   *ROOT.glob("csrc/*.cuh")])


def _max_with_zero(path: Path) -> list[str]:
    rel = str(path.relative_to(ROOT))
    comment = "#" if path.suffix == ".py" else "//"
    hits = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split(comment)[0].strip()
        if MAX_WITH_ZERO.search(code) and (rel, code) not in ALLOWED:
            hits.append(f"{rel}:{i}: {code}")
    return hits


def test_pattern_finds_the_nan_dropping_forms() -> None:
    for bad in ("acc = tl.maximum(acc, 0.0)", "v = fmaxf(v, 0.0f);", "o = fmaxf(0.f, o);",
                "x = max(x, 0)"):
        assert MAX_WITH_ZERO.search(bad), bad
    for good in ("acc = tl.where(acc < 0.0, 0.0, acc)", "return v < 0.0f ? 0.0f : v;",
                 "tl.maximum(n_b, 1.0)"):
        assert not MAX_WITH_ZERO.search(good), good


def test_no_relu_as_max_in_kernel_sources() -> None:
    sources = _kernel_sources()
    assert len(sources) >= 6, sources
    found = [hit for path in sources for hit in _max_with_zero(path)]
    assert not found, "ReLU as max(v, 0) drops NaN on a GPU; use v < 0 ? 0 : v:\n" + "\n".join(
        found
    )
