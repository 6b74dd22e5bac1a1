"""Run a group of GPU tests in parallel shards, within a time cap, and say what failed.

    python bench/run_gpu_tests.py {triton,cuda} --timeout SECONDS --logs DIR [--jobs N]

Groups: ``cuda`` is tests/backends/test_cuda.py (the compiled extension); ``triton`` is every
other ``gpu``-marked test (Triton kernels, the op, modules and models on the GPU).

Why shards: the GPU tests spend most of their time compiling Triton kernels, single-threaded,
~0.3 s (BN) to ~2 s (tensor-core conv) each. Recording the specialisation key of every launch in
the interpreter mirror of the GPU grid gives 283 distinct kernel variants (conv GEMM 114, direct
21, BN 148); on the GPU with ``FASTRES_TRITON_AUTOTUNE=0`` the first fitting tile varies with
the channel count and the all-configs test adds ~100: some 450 compilations, ~10 CPU-minutes,
which one pytest process would not fit in its cap. The test ids are cut into ``--jobs``
shards (default: up to 12, two cores left over; see :func:`deal`) run as parallel pytest
processes, which share Triton's on-disk cache.

Within the cap: at the deadline each shard gets SIGINT, on which pytest stops and still prints
its summary with the failures so far (``-rfE``); SIGKILL follows after a grace period. Each
shard logs one line per test (``-v``), so even a killed shard's log says how far it got.
Prints one summary line per shard and for the group, then the failing tests; exit status 0 only
if every shard passed (skips allowed) and none was stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = "tests/backends/test_cuda.py"
GRACE_S = 15


def collect(group: str) -> list[str]:
    """Node ids of the group's ``gpu``-marked tests."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
           "-p", "no:cacheprovider"]
    cmd += [CUDA_TESTS] if group == "cuda" else ["tests", f"--ignore={CUDA_TESTS}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"collection failed (exit {out.returncode}):\n{out.stdout[-3000:]}"
                         f"{out.stderr[-3000:]}")
    return ids


# Model-level tests (whole networks, CUDA graphs, spawned processes): each compiles many kernel
# variants of its own, so they are spread over the shards and run first in each.
HEAVY = ("tests/models/", "tests/nn/", "tests/test_swap.py", "tests/test_served_backend.py",
         "tests/test_distributed.py", "tests/test_sync_batchnorm_nccl.py",
         "tests/ops/test_block.py::test_block_op_on_cuda",
         "tests/ops/test_block_gate.py::test_gated_block_op_on_cuda",
         "tests/test_graph_block.py::test_regnety_block_on_cuda")


def deal(ids: list[str], jobs: int) -> list[list[str]]:
    """``jobs`` shards: the heavy tests round-robin at the front, then contiguous runs of the
    rest in collected order (neighbouring tests, same case and dtype, launch the same kernel
    variants, so each shard compiles mostly its own share)."""
    heavy = [i for i in ids if i.startswith(HEAVY)]
    light = [i for i in ids if not i.startswith(HEAVY)]
    jobs = max(1, min(jobs, len(ids)))
    return [heavy[j::jobs] + light[j * len(light) // jobs:(j + 1) * len(light) // jobs]
            for j in range(jobs)]


def _counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 passed, 1 failed, 2 skipped in ...``)."""
    counts: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                           line)
        if found and re.search(r" in [\d.]+s", line):
            for n, what in found:
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
            break
    return counts


def run(group: str, timeout_s: float, logs: Path, jobs: int) -> int:
    start = time.monotonic()
    ids = collect(group)
    logs.mkdir(parents=True, exist_ok=True)
    if not ids:
        print(f"{group}: no gpu tests collected")
        return 1
    shards = deal(ids, jobs)
    procs = []
    # the float64 references run on the CPU: share the cores instead of oversubscribing them
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(shards))))
    for i, shard in enumerate(shards):
        log = (logs / f"{group}-{i}.log").open("w")
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *shard]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = start + timeout_s
    stopped = set()
    for i, (proc, _) in enumerate(procs):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped.add(i)
            proc.send_signal(signal.SIGINT)  # pytest prints its summary on KeyboardInterrupt
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    failures: list[str] = []
    total: dict[str, int] = {}
    ok = True
    for i, (proc, log) in enumerate(procs):
        log.close()
        text = (logs / f"{group}-{i}.log").read_text(errors="replace")
        counts = _counts(text)
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        failures += [line for line in text.splitlines()
                     if line.startswith(("FAILED ", "ERROR "))]
        state = "STOPPED at the cap" if i in stopped else f"exit {proc.returncode}"
        ran = sum(1 for line in text.splitlines() if re.search(r"::\S+ (PASSED|FAILED|"
                                                                 r"SKIPPED|ERROR)", line))
        print(f"  {group}-{i}: {state}; {ran}/{len(shards[i])} tests reported; "
              + ", ".join(f"{v} {k}" for k, v in counts.items()))
        ok &= i not in stopped and proc.returncode == 0
    took = time.monotonic() - start
    print(f"{group}: {len(ids)} tests in {len(shards)} shards, {took:.0f} s of {timeout_s:.0f}: "
          + ", ".join(f"{v} {k}" for k, v in sorted(total.items())))
    for line in failures:
        print("  " + line)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=("triton", "cuda"))
    parser.add_argument("--timeout", type=float, required=True, help="seconds for the group")
    parser.add_argument("--logs", type=Path, required=True, help="folder for the shard logs")
    # compiling is single-threaded per process: most of the cores, two left for the rest
    parser.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args(argv)
    return run(args.group, args.timeout, args.logs, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
