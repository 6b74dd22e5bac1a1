"""Every Triton kernel configuration compiles for sm_80 and sm_90, and one per kernel, dtype and
flag set for sm_89, sm_100 and sm_120, and its machine code is clean.

The CPU tests run the kernels under the interpreter, which accepts code the GPU compiler rejects;
this runs the kernel report (``python -m fastres.analysis.kernel_report``) in a fresh process
without TRITON_INTERPRET (a GPU is not needed to compile): every configuration compiled as a
launch on ResNet shapes specialises it, plus unspecialised compiles, and the CUDA extension's
kernels, checked for spills, lost MMA and lost asynchronous copies. The newer targets get the
representative subset (``compile.representative``: the configuration a launch without autotuning
tries first, per kernel, dtype and flag set), which keeps the default suite's compile work at
about 1.5x that of sm_80 + sm_90 alone; the committed report holds more (checked without
compiling: test_kernel_report.py). Compiled kernels land in Triton's cache, so a rerun with
unchanged kernels is quick.

The committed report (bench/kernel_report.json) must list the current configurations: after
changing a kernel's configurations, regenerate it with the same command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fastres.analysis.compile import MODULES, TARGETS

FULL = (80, 90)  # compiled in full here; the other TARGETS their representative subset
ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "bench" / "kernel_report.json"


def _spec_keys(rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(r["module"], r["spec"], r["target"]) for r in rows}


def test_every_triton_kernel_compiles_clean_for_every_target(tmp_path) -> None:
    out_json = tmp_path / "kernel_report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastres.analysis.kernel_report", "--out", str(out_json),
         "--representative", ",".join(str(cc) for cc in TARGETS if cc not in FULL)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kernel report failed (rc={proc.returncode}):\n{out[-8000:]}"
    summary = re.search(r"compiled (\d+) specs \(([^)]*)\) for sm_80, sm_90 and (\d+) "
                        r"representative ones for sm_89, sm_100, sm_120", out)
    assert summary, f"no summary line in the report's output:\n{out[-4000:]}"
    total = int(summary.group(1))
    counts = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", summary.group(2))}
    assert set(counts) == {m.rsplit(".", 1)[-1] for m in MODULES}
    assert all(n > 0 for n in counts.values()) and total == sum(counts.values())

    report = json.loads(out_json.read_text())
    rows = report["triton_kernels"]
    some = int(summary.group(3))
    assert len(rows) == total * len(FULL) + some
    per_target = {t: sum(r["target"] == t for r in rows) for t in report["targets"]}
    assert report["targets"] == [f"sm_{cc}" for cc in TARGETS]
    assert all(per_target[f"sm_{cc}"] == total for cc in FULL)
    assert all(0 < per_target[f"sm_{cc}"] < total for cc in TARGETS if cc not in FULL)
    assert {r["module"] for r in rows} == {m.rsplit(".", 1)[-1] for m in MODULES}
    assert all(r["status"] == "ok" and not r["violations"] for r in rows)
    # The check has teeth: tensor-core rows it holds to the rules exist for every target, with
    # that target's MMA (tcgen05 on sm_100, which takes mma.sync too).
    checked = [r for r in rows if r["tensor_cores"] and r["shape_class"] != "unspecialised"
               and not r["pruned"]]
    assert {(r["target"], r["mma"]) for r in checked} - {("sm_100", "HMMA")} == {
        ("sm_80", "HMMA"), ("sm_89", "HMMA"), ("sm_90", "HGMMA"), ("sm_100", "UTCHMMA"),
        ("sm_120", "HMMA")}
    # forward and backward convolutions alike (conv_bwd: dgrad, wgrad and the stem's flat wgrad,
    # with the block-fusion join and prologue variants)
    assert {r["module"] for r in checked} == {"conv", "conv_bwd"}
    bwd = {tuple(r["spec"].split("-")[i] for i in (0, 2)) for r in checked
           if r["module"] == "conv_bwd"}
    assert bwd >= {("dgrad_gemm", "full"), ("dgrad_gemm", "join"), ("wgrad_gemm", "full"),
                   ("wgrad_gemm", "prologue"), ("wgrad_gemm_flat", "full")}
    assert not any(r["violations"] for r in report["cuda_kernels"])

    committed = json.loads(COMMITTED.read_text())
    stale = ("bench/kernel_report.json is stale: regenerate it with "
             "`python -m fastres.analysis.kernel_report`")
    held = _spec_keys(committed["triton_kernels"])
    assert _spec_keys(rows) <= held, stale
    for cc in FULL:  # the same configurations, none gone
        assert {k for k in held if k[2] == f"sm_{cc}"} == {
            k for k in _spec_keys(rows) if k[2] == f"sm_{cc}"}, stale
