"""Static kernel report: what every GPU kernel compiles to, checked, without a GPU.

    python -m fastres.analysis.kernel_report [--out bench/kernel_report.json] [--only TEXT]
        [--targets 80,89,90,100,120] [--representative 89,100,120]

Compiles every Triton kernel configuration (the ``compile_specs()`` of each module in
``fastres.analysis.compile.MODULES``) for each target of ``compile.TARGETS`` (sm_80, sm_89,
sm_90, sm_100, sm_120; for the ``--representative`` ones only one per kernel, dtype and flag set:
``compile.representative``) with the real compiler, as a launch specialises it, reads the SASS
of each and of every kernel in the CUDA extension ``fastres._C``, and for each gives registers,
shared memory, local memory and spill stores, the MMA instruction (UTCHMMA / HGMMA / HMMA /
none), how global memory reaches shared memory (UTMALDG TMA / LDGSTS cp.async / plain loads) and
the theoretical occupancy. Writes the JSON to ``--out``,
prints a table, and exits 1 when a kernel fails to compile or breaks a rule:

* a Triton configuration the autotuner may pick (not pruned for that target), compiled for a
  specialised shape class, must not use local memory (spills), must need no more shared memory
  than that target's limit per block (its device class's) and fit on an SM and, if it is a
  tensor-core kernel, must use the target's MMA (its device class's: HMMA on sm_80 / sm_89 /
  sm_120, HGMMA on sm_90, UTCHMMA on sm_100, which takes HMMA too) and an asynchronous
  global-to-shared copy (cp.async or TMA);
* unspecialised compiles (odd shapes, unaligned pointers) only have to compile;
* a CUDA C++ kernel must not use local memory;
* a conv kernel's PTX has no ``max.f32`` (its only float max would be a ReLU as max(v, 0), which
  turns NaN into 0 on a GPU; the interpreter's max propagates NaN, so no CPU test sees it).

The interpreter cannot run this (``TRITON_INTERPRET=1`` is refused).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from typing import Any

from ..backends import devices
from . import sass
from .compile import MODULES, TARGETS, UNSPECIALISED, CompileSpec, launch_source, representative

DEFAULT_OUT = os.path.join("bench", "kernel_report.json")
# PTX max.f32 returns the non-NaN operand (max.NaN.f32 would propagate): in modules whose only
# float max would be a ReLU written as max(v, 0), it means NaN turned into 0 (torch.relu keeps it)
NAN_DROPPING_MAX = re.compile(r"\bmax(?:\.ftz)?\.f32\b")
NO_FLOAT_MAX = {"conv"}


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def accepted_mma(cc: int) -> tuple[str, ...]:
    """The tensor-core instructions a kernel may use on target ``cc``: its device class's
    (HMMA on sm_80/86/89/120, HGMMA on sm_90, UTCHMMA on sm_100); on sm_100 also HMMA, which
    Triton emits (mma.sync still runs there) for tiles its tcgen05 lowering does not take."""
    want = devices.for_target(cc).mma
    return (want, "HMMA") if want == "UTCHMMA" else (want,)


def triton_violations(row: dict[str, Any]) -> list[str]:
    """The rules of the module docstring broken by one Triton (spec, target) row."""
    if row["status"] != "ok":
        return [row["status"]]
    found = []
    if row["module"] in NO_FLOAT_MAX and row["ptx_max_f32"]:
        found.append("max.f32 in the PTX: a ReLU as max(v, 0), which turns NaN into 0")
    if row["pruned"] or row["shape_class"] == UNSPECIALISED:
        return found
    if row["local_bytes"] or row["spill_store_bytes"]:
        found.append(f"spills ({row['local_bytes']} B local, {row['spill_store_bytes']} B STL)")
    cc = int(row["target"].removeprefix("sm_"))
    limit = sass.smem_limit(cc)
    if row["shared"] > limit:
        found.append(f"{row['shared'] / 1024:.1f} KB of shared memory, over the {limit // 1024} KB "
                     f"per block of sm_{cc}")
    elif row["occupancy"] == 0:
        found.append("does not fit on an SM")
    if row["tensor_cores"]:
        want = accepted_mma(cc)
        if row["mma"] not in want:
            found.append(f"no {' / '.join(want)} (got {row['mma']})")
        if row["g2s"] == "plain":
            found.append("no asynchronous copy (LDGSTS / UTMALDG)")
    return found


def cuda_violations(row: dict[str, Any]) -> list[str]:
    """The rules of the module docstring broken by one CUDA C++ kernel row."""
    if row["local_bytes"] or row["spill_store_bytes"]:
        return [f"local memory ({row['local_bytes']} B frame, {row['spill_store_bytes']} B STL)"]
    return []


def _compile_row(task: tuple[str, int, int]) -> tuple[dict[str, Any], float, str]:
    """Compile spec ``index`` of ``module`` for compute capability ``cc`` (a worker process)."""
    module, index, cc = task
    return compile_row(importlib.import_module(module).compile_specs()[index], cc, module)


def compile_row(spec: CompileSpec, cc: int, module: str) -> tuple[dict[str, Any], float, str]:
    """Compile ``spec`` (of kernel module ``module``) for compute capability ``cc`` and read its
    SASS. Returns the report row, the seconds taken and the traceback of a failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = dict(
        module=_short(module), spec=spec.name, shape_class=spec.shape_class, target=f"sm_{cc}",
        warps=spec.num_warps, stages=spec.num_stages, tensor_cores=spec.tensor_cores,
        pruned=spec.pruned.get(cc),
    )
    t0 = time.perf_counter()
    trace = ""
    try:
        signature, constexprs, attrs = launch_source(spec)
        kernel = triton.compile(
            ASTSource(spec.kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        stats = sass.inspect_cubin(kernel.asm["cubin"])
        shared = kernel.metadata.shared + stats.shared_static  # dynamic (Triton's) + static
        row.update(
            status="ok", regs=stats.regs, shared=shared, local_bytes=stats.local_bytes,
            spill_store_bytes=stats.spill_store_bytes, mma=stats.mma, g2s=stats.g2s,
            # None where sass has no per-SM limits for the target
            occupancy=round(sass.occupancy(cc, stats.regs, shared, 32 * spec.num_warps), 3)
            if cc in sass.ARCHS else None,
            ptx_max_f32=bool(NAN_DROPPING_MAX.search(kernel.asm["ptx"])),
        )
    except Exception as e:  # report every failure, not just the first
        first = str(e).splitlines()[0] if str(e) else ""
        row["status"] = f"FAILED {type(e).__name__}: {first}"
        trace = traceback.format_exc()
    row["violations"] = triton_violations(row)
    return row, time.perf_counter() - t0, trace


def cuda_rows() -> list[dict[str, Any]]:
    """One row per kernel and target of the CUDA extension; [] when it is not built."""
    spec = importlib.util.find_spec("fastres._C")
    if spec is None or spec.origin is None:
        return []
    rows = []
    bounds = sass.launch_bounds(spec.origin)
    for arch, function, stats in sass.inspect_binary(spec.origin):
        threads = bounds.get((arch, function))
        cc = int(arch.removeprefix("sm_").rstrip("a"))
        row: dict[str, Any] = dict(
            kernel=function, target=arch, regs=stats.regs, shared=stats.shared_static,
            local_bytes=stats.local_bytes, spill_store_bytes=stats.spill_store_bytes,
            mma=stats.mma, g2s=stats.g2s, threads=threads,
            # at the __launch_bounds__ block size; unknown where the launch sets it
            occupancy=None if threads is None else round(
                sass.occupancy(cc, stats.regs, stats.shared_static, threads), 3),
        )
        row["violations"] = cuda_violations(row)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel"], r["target"]))


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON with one kernel row per line (short, readable diffs)."""
    parts = []
    for key, value in report.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n".join("  " + json.dumps(row) for row in value)
            parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _table(triton_rows: list[dict[str, Any]], cuda: list[dict[str, Any]]) -> str:
    head = f"{'kernel':58s} {'class':14s} {'target':6s} {'regs':>4s} {'smem KB':>7s} " \
           f"{'spill B':>7s} {'mma':5s} {'g2s':7s} {'occ':>5s}  notes"
    lines = [head, "-" * len(head)]
    for r in triton_rows:
        if r["status"] != "ok":
            lines.append(f"{r['module'] + ':' + r['spec']:58s} {r['shape_class']:14s} "
                         f"{r['target']:6s} {r['status']}")
            continue
        notes = "; ".join(r["violations"]) or (f"pruned: {r['pruned']}" if r["pruned"] else "")
        lines.append(
            f"{r['module'] + ':' + r['spec']:58s} {r['shape_class']:14s} {r['target']:6s} "
            f"{r['regs']:4d} {r['shared'] / 1024:7.1f} {r['spill_store_bytes']:7d} "
            f"{r['mma']:5s} {r['g2s']:7s} {r['occupancy']:5.2f}  {notes}"
        )
    names = sass.short_names([r["kernel"] for r in cuda])
    for r in cuda:
        lines.append(
            f"{'_C:' + names[r['kernel']]:58s} {'cuda':14s} {r['target']:6s} "
            f"{r['regs']:4d} {r['shared'] / 1024:7.1f} {r['spill_store_bytes']:7d} "
            f"{r['mma']:5s} {r['g2s']:7s} "
            f"{'-' if r['occupancy'] is None else format(r['occupancy'], '.2f'):>5s}  "
            f"{'; '.join(r['violations'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--only", default="", help="only Triton specs whose name contains this")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)),
                        help="compute capabilities to compile for, comma-separated")
    parser.add_argument("--representative", default="",
                        help="of these targets (comma-separated, among --targets) compile only "
                             "one spec per kernel, dtype and flag set (compile.representative)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, the report needs the real compiler")
        return 2

    targets = _ints(args.targets)
    subset = _ints(args.representative)
    if not set(subset) <= set(targets):
        parser.error(f"--representative {args.representative}: not among --targets")
    full = tuple(cc for cc in targets if cc not in subset)
    counts = {}
    tasks = []
    for module in MODULES:
        specs = importlib.import_module(module).compile_specs()
        chosen = [i for i, s in enumerate(specs) if args.only in s.name]
        counts[_short(module)] = len(chosen)
        for cc in targets:
            keep = set(chosen) if cc in full else set(representative(specs, cc)) & set(chosen)
            tasks.extend((module, i, cc) for i in sorted(keep))
    tasks.sort(key=lambda task: (task[0], task[1], targets.index(task[2])))
    start = time.perf_counter()
    rows = []
    # Compiling is CPU-bound and independent per spec: one process per core.
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row, took, trace in pool.map(_compile_row, tasks):
            rows.append(row)
            print(f"{row['module']:5s} {row['target']:6s} {took:6.2f}s {row['status']}  "
                  f"{row['spec']}  {'; '.join(row['violations'])}{trace and chr(10) + trace}",
                  flush=True)
    took = time.perf_counter() - start
    cuda = cuda_rows()
    report = {
        "generated_by": "python -m fastres.analysis.kernel_report",
        "triton": importlib.import_module("triton").__version__,
        "targets": [f"sm_{cc}" for cc in targets],
        # targets compiled for a representative subset only (compile.representative)
        "representative_targets": [f"sm_{cc}" for cc in subset],
        "triton_kernels": rows,
        "cuda_kernels": cuda,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(to_json(report))
    print(_table(rows, cuda))
    bad = [r for r in (*rows, *cuda) if r["violations"]]
    for r in bad:
        print(f"VIOLATION {r.get('spec') or r.get('kernel')} {r['target']}: "
              f"{'; '.join(r['violations'])}")
    total = sum(counts.values())
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
    names = lambda ccs: ", ".join(f"sm_{cc}" for cc in ccs)
    some = len(rows) - total * len(full)
    print(f"compiled {total} specs ({detail}) for {names(full)}"
          + (f" and {some} representative ones for {names(subset)}" if subset else "")
          + f" in {took:.1f}s; {len(cuda)} CUDA kernels; {len(bad)} violations; "
            f"wrote {args.out}")
    return 1 if bad or total == 0 else 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


if __name__ == "__main__":
    sys.exit(main())
