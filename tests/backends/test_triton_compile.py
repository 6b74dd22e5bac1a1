"""Every Triton kernel configuration compiles for sm_80 and sm_90 with the real compiler.

The CPU tests run the kernels under the interpreter, which accepts code the GPU compiler rejects;
this runs tests/backends/triton_compile_check.py in a fresh process without TRITON_INTERPRET
(a GPU is not needed to compile). Compiled kernels land in Triton's cache, so a rerun with
unchanged kernels is quick.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("triton_compile_check.py")
ROOT = Path(__file__).resolve().parents[2]


def test_every_triton_kernel_compiles_for_sm80_and_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"compile check failed (rc={proc.returncode}):\n{out[-8000:]}"
    summary = re.search(
        r"compiled (\d+) specs \(conv: (\d+), bn: (\d+), conv_bwd: (\d+)\)", out
    )
    assert summary, f"no summary line in the compile check's output:\n{out[-4000:]}"
    total, n_conv, n_bn, n_bwd = map(int, summary.groups())
    assert total == n_conv + n_bn + n_bwd > 0
    assert n_conv > 0, "no conv kernel configuration was compiled"
    assert n_bn > 0, "no BN kernel configuration was compiled"
    assert n_bwd > 0, "no convolution backward kernel configuration was compiled"
    assert "FAILED" not in out
