"""examples/train_ddp.py under torchrun (gloo, CPU): a run resumed from a checkpoint takes
bitwise the same steps as the run that never stopped, and its checkpoint loads into the plain
model and back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

torchvision = pytest.importorskip("torchvision")

import fastres

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(tmp: Path, nproc: int, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(SCRIPT), "--resolution", "32", "--batch", "3",
           "--num-classes", "5", "--lr", "0.02", *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("nproc, extra", [(2, ("--sync-bn", "--accumulate", "2")),
                                          (2, ("--static-graph",))],
                         ids=["syncbn-accumulate", "static-graph"])
def test_resume_equals_uninterrupted(tmp_path: Path, nproc: int, extra: tuple[str, ...]):
    torchrun(tmp_path, nproc, *extra, "--steps", "4", "--save-every", "4",
             "--checkpoint", "whole.pt", "--loss-log", "whole.log")
    torchrun(tmp_path, nproc, *extra, "--steps", "2", "--save-every", "2",
             "--checkpoint", "split.pt", "--loss-log", "split.log")
    torchrun(tmp_path, nproc, *extra, "--steps", "4", "--save-every", "2",
             "--checkpoint", "split.pt", "--loss-log", "split.log", "--resume")
    assert losses(tmp_path / "whole.log") == losses(tmp_path / "split.log")
    assert [s for s, _ in losses(tmp_path / "whole.log")] == [0, 1, 2, 3]
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    split = torch.load(tmp_path / "split.pt", weights_only=False)
    assert whole["step"] == split["step"] == 4
    assert whole["model"].keys() == split["model"].keys()
    for key, t in whole["model"].items():
        assert torch.equal(t, split["model"][key]), key
    for key, state in whole["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           split["optimizer"]["state"][key]["momentum_buffer"]), key
    # the fused model's checkpoint is the plain model's: it loads there, and back
    plain = torchvision.models.resnet18(num_classes=5)
    plain.load_state_dict(whole["model"])
    fused = fastres.fuse(torchvision.models.resnet18(num_classes=5))
    fused.load_state_dict(plain.state_dict())
    for key, t in fused.state_dict().items():
        assert torch.equal(t, whole["model"][key]), key
