"""Mutation check: plant each bug of ``plants.py`` in a scratch copy and run its tests.

A plant is *killed* when its selected tests fail, and *survives* when they pass: then the suite
cannot see that bug. First each distinct test selection runs on the unplanted copy (it must
pass, or a kill would prove nothing). Exits 1 if any plant survives, a snippet is missing or a
baseline fails. Not part of CI (a few minutes on two cores)::

    python tests/mutation/run.py [--only SUBSTRING] [--list] [--keep]

Runs pytest with ``-m "not slow" -x``: the default CI selection must kill every plant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.mutation.plants import PLANTS, Plant


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, plus the built extension."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in [*filter(None, listed), *(str(p.relative_to(ROOT))
                                         for p in ROOT.glob("fastres/_C*.so"))]:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _pytest(scratch: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
         *tests],
        cwd=scratch, env=env, capture_output=True, text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _plant(scratch: Path, plant: Plant) -> str:
    """Apply the plant; return the original text to restore."""
    path = scratch / plant.path
    text = path.read_text()
    if text.count(plant.original) != 1:
        raise LookupError(
            f"{plant.path}: the original snippet occurs {text.count(plant.original)} times"
        )
    path.write_text(text.replace(plant.original, plant.replacement))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="plants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the plants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    plants = [p for p in PLANTS if args.only in p.name]
    if args.list:
        for p in plants:
            print(f"{p.name:40s} {p.path}  ->  {' '.join(p.tests)}")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="fastres-mutation-"))
    problems = 0
    try:
        _copy_repo(scratch)
        for tests in dict.fromkeys(p.tests for p in plants):
            rc, out, took = _pytest(scratch, tests)
            ok = rc == 0
            problems += not ok
            print(f"baseline {'ok    ' if ok else 'FAILED'} {took:6.1f}s  {' '.join(tests)}",
                  flush=True)
            if not ok:
                print(out[-3000:])
        for plant in plants:
            try:
                original = _plant(scratch, plant)
            except LookupError as e:
                problems += 1
                print(f"MISSING         {plant.name}: {e}", flush=True)
                continue
            try:
                rc, out, took = _pytest(scratch, plant.tests)
            finally:
                (scratch / plant.path).write_text(original)
            # pytest: 1 = tests failed; 2-5 = interrupted, internal or usage error, none collected
            verdict = "killed" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR rc={rc}"
            problems += verdict != "killed"
            print(f"{verdict:9s} {took:6.1f}s  {plant.name}", flush=True)
            if verdict.startswith("ERROR"):
                print(out[-3000:])
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(plants)} plants; {problems} problems" if problems else
          f"{len(plants)} plants, all killed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
