"""bench/gpu_check.sh rehearsed on CPU (FASTRES_CHECK_DRY_RUN=1): a syntax error, a wrong flag or
a missing file must never waste a GPU session."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "info", "tests-triton", "tests-cuda", "models", "blocks", "layers",
         "sanitizer")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), FASTRES_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    summary = out[out.find("fastres gpu_check summary"):]
    assert done.returncode == 0, out[-6000:]
    for step in STEPS:
        assert re.search(rf"^{re.escape(step)}\s+ok\s+\d+$", summary, re.M), (step, summary)
    assert "RESULT: all steps passed" in summary
    # the GPU test groups were collected and dealt to shards (they skip without CUDA)
    assert re.search(r"^triton: \d+ tests in \d+ shards", summary, re.M), summary
    assert re.search(r"^cuda: \d+ tests in \d+ shards", summary, re.M), summary
    # the benchmarks wrote their JSON, and fastres came first at the model level
    models = (tmp_path / "models" / "results.json").read_text()
    assert '"fastres"' in models and (tmp_path / "layers" / "results.json").exists()
    assert "Model level" in summary and "fastres 1st step s" in summary
    # the block step: its JSON, its table, and its ratios in one line of the summary
    blocks = json.loads((tmp_path / "blocks" / "results.json").read_text())
    assert [e["block"] for e in blocks["blocks"]] == ["layer1.0"] and not blocks["models"]
    assert "Block level" in summary
    assert re.search(r"^block step \(forward \+ backward.*: fastres block op \d+\.\d+x eager, "
                     r"\d+\.\d+x the same blocks layer by layer", summary, re.M), summary


def test_gpu_test_shards_spread_model_level_tests_and_keep_neighbours_together():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from run_gpu_tests import deal
    finally:
        sys.path.pop(0)
    light = [f"tests/backends/test_triton.py::test_grid[{i}]" for i in range(10)]
    heavy = [f"tests/models/test_m.py::test_model[{i}]" for i in range(4)]
    shards = deal(light[:5] + heavy + light[5:], 3)
    assert sorted(t for s in shards for t in s) == sorted(light + heavy)  # each exactly once
    assert [s[0] for s in shards] == heavy[:3]  # model-level tests first, one per shard
    assert shards[0][1] == heavy[3]
    assert [s[-1] for s in shards] == [light[2], light[5], light[9]]  # contiguous runs
    assert deal(light[:2], 8) == [[light[0]], [light[1]]]
