"""MLflow through a real `mlflow server` on 127.0.0.1: unreachable first, then logged once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from phases import run_sweep
from phases.cli import app
from tests.conftest import free_port

pytestmark = pytest.mark.slow

TINY = """
name: {name}
kind: isotropic
steps: 2000
replicas: 16
chunk_size: 4
grids:
  - protocol: elr
    axes: {{lr: [0.05, 0.1], wd: [0.1, 1.0]}}
"""


def _start_server(port: int, folder: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]
    server = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 180  # generous: a loaded 2-core machine starts it slowly
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    _stop_server(server)
    raise RuntimeError(f"mlflow server on 127.0.0.1:{port} did not answer within 180 s")


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _runs(uri: str, uid_prefix: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("phases")
    if experiment is None:
        return [], []
    parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`phases.sweep_uid` LIKE '{uid_prefix}-%'")
    children = []
    for parent in parents:
        children += client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parents, children


def test_unreachable_server_then_track_once(ray_local, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = tmp_path / "offline.yaml"
    spec.write_text(TINY.format(name="offline"))
    storage = tmp_path / "runs"

    # No server yet: the sweep finishes, writes every file, and prints how to log it later.
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(storage), "--tracking-uri", uri])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "MLflow logging failed" in output
    assert f"phases track {storage / 'offline'}" in output
    for name in ("points.parquet", "diagram.parquet", "trajectories.parquet", "fits.json"):
        assert (storage / "offline" / name).is_file()

    server = _start_server(port, tmp_path / "server")
    try:
        for _ in range(2):  # the second call must not duplicate anything
            tracked = CliRunner().invoke(app, ["track", str(storage / "offline"), "--tracking-uri", uri])
            assert tracked.exit_code == 0, tracked.output
        parents, children = _runs(uri, "offline")
        assert len(parents) == 1
        assert len(children) == 4
        assert parents[0].info.status == "FINISHED"
        assert "equation_of_state.elr.continuous_median_abs_rel_error" in parents[0].data.metrics

        # The server path during a sweep: the driver logs as soon as the sweep finishes.
        online = run_sweep(TINY.format(name="online"), storage=storage, tracking_uri=uri)
        assert online.tracking_error is None
        parents, children = _runs(uri, "online")
        assert [p.info.run_id for p in parents] == [online.parent_run_id]
        assert len(children) == 4
        artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(online.parent_run_id)}
        assert {"fits.json", "diagram.parquet"} <= artifacts
    finally:
        _stop_server(server)


def test_server_stopped_mid_sweep(tmp_path):
    # The tracking server goes away while the sweep runs: the sweep still finishes and writes every
    # file, and once the server is back `phases track` logs the parent and nested runs exactly once.
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = tmp_path / "interrupted.yaml"
    spec.write_text(TINY.format(name="interrupted").replace("steps: 2000", "steps: 400000").replace("chunk_size: 4", "chunk_size: 1"))
    storage = tmp_path / "runs"
    server = _start_server(port, tmp_path / "server")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "phases.cli", "sweep", str(spec), "--storage", str(storage), "--tracking-uri", uri],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((storage / "interrupted" / "parts").glob("*.parquet")):
            assert sweep.poll() is None, sweep.stdout.read()
            time.sleep(0.5)
        _stop_server(server)
        output, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    output = " ".join(output.split())
    assert sweep.returncode == 0, output
    assert "MLflow logging failed" in output
    for name in ("points.parquet", "diagram.parquet", "trajectories.parquet", "fits.json"):
        assert (storage / "interrupted" / name).is_file()
    assert len(list((storage / "interrupted" / "parts").glob("*.parquet"))) == 4

    server = _start_server(port, tmp_path / "server")
    try:
        for _ in range(2):
            tracked = CliRunner().invoke(app, ["track", str(storage / "interrupted"), "--tracking-uri", uri])
            assert tracked.exit_code == 0, tracked.output
        parents, children = _runs(uri, "interrupted")
        assert len(parents) == 1
        assert len(children) == 4
    finally:
        _stop_server(server)
