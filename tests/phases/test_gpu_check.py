"""bench/gpu_check.py runs the trial's population code, and without CUDA it exits with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "bench" / "gpu_check.py")


def test_gpu_check_runs_on_cpu():
    run = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--width", "2", "--points", "4", "--steps", "3"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["finite"] is True
    assert report["points_steps_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_explains():
    run = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
