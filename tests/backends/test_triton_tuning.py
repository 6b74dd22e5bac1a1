"""FASTRES_TRITON_AUTOTUNE=0 offers the autotuners one configuration per kernel and shape."""

import os
import subprocess
import sys

SCRIPT = """
import triton
from fastres.backends.triton import _tuning, bn, conv
configs = conv.GPU_GEMM_CONFIGS
kept = conv._prune_gemm(configs, {"Kg": 64, "Cg": 64})
print(_tuning.AUTOTUNE, len(kept), len(bn._configs(bn._ELEMENTWISE_BLOCKS)))
"""


def _run(value: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTRES_TRITON_AUTOTUNE"] = value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_autotune_off_keeps_the_first_fitting_config():
    assert _run("0") == ["False", "1", "1"]


def test_autotune_on_offers_every_fitting_config():
    on, n_gemm, n_bn = _run("1")
    assert on == "True" and int(n_gemm) > 1 and int(n_bn) > 1
