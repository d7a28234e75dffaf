"""The same `visiontune train` under torchrun with 2 processes (gloo on CPU): DDP, rank-0-only writing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from visiontune import samples

SETTINGS = ["--views", "1", "--head-epochs", "8", "--epochs", "1", "--val", "0.2", "--test", "0.2", "--quiet"]


def train(out: Path, processes: int) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [str(Path(sys.executable).with_name("visiontune")), "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "visiontune.cli", "train"]
    return subprocess.run([*cmd, str(samples.path("flowers-mini")), "--out", str(out), *SETTINGS],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_in_quality_and_write_one_run(tmp_path):
    single, double = tmp_path / "single", tmp_path / "ddp"
    one = train(single, 1)
    assert one.returncode == 0, one.stderr
    two = train(double, 2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("run: ") == 1  # only rank 0 reports
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["images"] == m1["images"]  # every image counted once, not per process
    assert abs(m2["val"]["top1"] - m1["val"]["top1"]) <= 0.1
    assert abs(m2["test"]["top1"] - m1["test"]["top1"]) <= 0.1
    assert m2["test"]["top1"] >= 0.6
    assert (double / "model.safetensors").is_file() and not (double / "checkpoint").exists()
    assert not (double / "cache").exists()
