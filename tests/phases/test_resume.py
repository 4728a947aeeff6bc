"""Killing the driver mid-sweep (SIGKILL) and resuming runs only the missing chunks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import psutil
import pytest
import yaml

from tests.conftest import cli_environment

pytestmark = pytest.mark.slow

# 12 points in 6 chunks of a few seconds each, run one at a time so the kill lands mid-sweep.
SPEC = {
    "name": "resume",
    "kind": "isotropic",
    "steps": 20000,
    "replicas": 16,
    "chunk_size": 2,
    "grids": [{"protocol": "elr", "axes": {"lr": {"log": [0.02, 0.1, 6]}, "wd": [0.1, 1.0]}}],
}


def _sweep_command(spec_path, storage, *extra):
    return [sys.executable, "-m", "phases.cli", "sweep", str(spec_path), "--storage", str(storage), "--max-concurrent", "1", "--no-track", *extra]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then any descendant (Ray daemons) that left the group."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)


def test_resume_after_sigkill(tmp_path):
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    storage = tmp_path / "runs"
    parts = storage / "resume" / "parts"

    driver = subprocess.Popen(
        _sweep_command(spec_path, storage), env=cli_environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = list(parts.glob("*.parquet")) if parts.exists() else []
            if len(done) >= 2 or driver.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        _kill_tree(driver)

    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert 2 <= len(before) < 6, f"the kill should land mid-sweep, found {len(before)} finished chunks"
    assert not (storage / "resume" / "points.parquet").exists()

    resumed = subprocess.run(
        _sweep_command(spec_path, storage, "--resume"), env=cli_environment(), capture_output=True, text=True, timeout=600,
    )
    output = " ".join((resumed.stdout + resumed.stderr).split())
    assert resumed.returncode == 0, output
    already = int(re.search(r"\((\d+) already done\)", output).group(1))
    ran = int(re.search(r"(\d+) chunks run", output).group(1))
    assert already >= len(before)
    assert already + ran == 6

    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert len(after) == 6
    for name, mtime in before.items():
        assert after[name] == mtime, f"{name} was rewritten by the resumed run"

    points = pl.read_parquet(storage / "resume" / "points.parquet")
    assert points.height == 12
    assert points["point_id"].n_unique() == 12
    assert not list((storage / "resume").rglob("*.tmp-*"))


def test_failure_description_names_the_cause():
    # Ray wraps a trial's exception (RayTaskError keeps it as `cause`) and colours its text; the
    # failures file records the original exception on one plain line.
    from phases.sweep import describe_error

    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\nTraceback ...")
            self.cause = cause

    text = describe_error(Wrapped(ValueError("CIFAR file x/data_batch_1 is malformed")))
    assert text == "ValueError: CIFAR file x/data_batch_1 is malformed"
    assert describe_error(RuntimeError("\x1b[31mplain\x1b[0m\nmore")) == "RuntimeError: plain"
