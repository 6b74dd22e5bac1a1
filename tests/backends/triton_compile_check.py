"""Compile every Triton kernel configuration for real GPU targets, without a GPU.

The interpreter the CPU tests run under accepts code the real compiler rejects (shape limits of
tl.dot, layouts, register pressure, type rules), so each ``compile_specs()`` entry of
``fastres.backends.triton.conv``, ``.bn`` and ``.conv_bwd`` is compiled here for sm_80 and sm_90
with ``triton.compile``. Run without ``TRITON_INTERPRET`` (the test removes it)::

    python tests/backends/triton_compile_check.py [--only SUBSTRING]

Prints one line per spec and target, then a summary
``compiled N specs (conv: a, bn: b, conv_bwd: c)``; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
import traceback

TARGETS = (80, 90)  # compute capabilities: A100 and H100


def _compile(task: tuple[str, int, int]) -> tuple[str, str, str, float, str]:
    """Compile spec ``index`` of module ``mod_name`` for compute capability ``cc`` (a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastres.backends.triton import bn, conv, conv_bwd

    mod_name, index, cc = task
    spec = {"conv": conv, "bn": bn, "conv_bwd": conv_bwd}[mod_name].compile_specs()[index]
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        triton.compile(
            src, target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        status = "ok"
    except Exception as e:  # report every failure, not just the first
        first = str(e).splitlines()[0] if str(e) else ""
        status = f"FAILED {type(e).__name__}: {first}\n{traceback.format_exc()}"
    return mod_name, spec.name, f"sm_{cc}", time.perf_counter() - t0, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, the check needs the real compiler")
        return 2

    from fastres.backends.triton import bn, conv, conv_bwd

    modules = {"conv": conv, "bn": bn, "conv_bwd": conv_bwd}
    counts = dict.fromkeys(modules, 0)
    tasks = []
    for mod_name, module in modules.items():
        for index, spec in enumerate(module.compile_specs()):
            if args.only in spec.name:
                counts[mod_name] += 1
                tasks.extend((mod_name, index, cc) for cc in TARGETS)
    start = time.perf_counter()
    failures = 0
    # Compiling is CPU-bound and independent per spec: one process per core.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for mod_name, name, label, took, status in pool.map(_compile, tasks):
            failures += status != "ok"
            print(f"{mod_name:8s} {label} {took:6.2f}s {status}  {name}", flush=True)
    total = sum(counts.values())
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
    print(f"compiled {total} specs ({detail}) for {len(TARGETS)} targets in "
          f"{time.perf_counter() - start:.1f}s; {failures} failures")
    return 1 if failures or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
