"""A real 2-node Ray cluster on loopback addresses: `phases submit`, `phases jobs`, a lost node.

The cluster comes from cluster/local_cluster.sh (head on 127.0.0.2, worker on 127.0.0.3, token
authentication on), so the script users run is the one tested. Nothing listens beyond 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from phases.spec import load
from phases.sweep import plan_sweep
from tests.conftest import REPO, SMOKE_SPEC, free_port

pytestmark = pytest.mark.slow
SCRIPT = REPO / "cluster" / "local_cluster.sh"


class Cluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.environment = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "CLUSTER_DIR": str(directory),
            "GCS_PORT": str(self.gcs_port),
            "DASHBOARD_PORT": str(self.dashboard_port),
            "AGENT_PORT": str(free_port()),
            "CPUS_PER_NODE": "1",
        }
        self.address = f"http://127.0.0.2:{self.dashboard_port}"
        # What `start` prints for clients: token authentication with the generated token file.
        self.client_environment = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(directory / "auth_token")}

    def script(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *arguments], env=self.environment, capture_output=True, text=True, timeout=300)

    def phases(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "phases.cli", *arguments], env=self.client_environment,
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    def submit(self, spec: Path, storage: Path) -> str:
        submitted = self.phases("submit", str(spec), "--address", self.address, "--storage", str(storage))
        assert submitted.returncode == 0, submitted.stderr
        return submitted.stdout.strip().splitlines()[-1]

    def wait(self, job_id: str, timeout_s: float = 400) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.phases("jobs", "status", job_id, "--address", self.address)
            assert status.returncode == 0, status.stderr
            if not any(state in status.stdout for state in ("PENDING", "RUNNING")):
                return status.stdout
            time.sleep(3)
        self.phases("jobs", "stop", job_id, "--address", self.address)
        raise AssertionError(f"job {job_id} still running after {timeout_s} s")


@pytest.fixture(scope="module")
def cluster():
    # A short directory: Ray's Unix socket paths under it must stay within 107 bytes, which
    # pytest's own temporary paths can exceed.
    directory = Path(tempfile.mkdtemp(prefix="phc-", dir="/tmp"))
    cluster = Cluster(directory)
    started = cluster.script("start", "1")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield cluster
    finally:
        stopped = cluster.script("stop")
        assert stopped.returncode == 0, stopped.stderr
        shutil.rmtree(directory, ignore_errors=True)


def _node_ips(sweep_dir: Path) -> set[str]:
    return {pq.read_schema(path).metadata[b"phases.node_ip"].decode() for path in (sweep_dir / "parts").glob("*.parquet")}


def test_submit_runs_on_both_nodes(cluster, tmp_path):
    storage = tmp_path / "runs"
    job_id = cluster.submit(SMOKE_SPEC, storage)
    final = cluster.wait(job_id)
    logs = cluster.phases("jobs", "logs", job_id, "--address", cluster.address).stdout
    assert "SUCCEEDED" in final, final + logs

    sweep_dir = storage / "ideal_gas_smoke"
    assert _node_ips(sweep_dir) == {"127.0.0.2", "127.0.0.3"}
    points = pl.read_parquet(sweep_dir / "points.parquet")
    planned = {point.point_id for point in plan_sweep(SMOKE_SPEC, storage=tmp_path / "plan").points}
    assert set(points["point_id"]) == planned
    assert points.height == len(planned)
    assert json.loads((sweep_dir / "fits.json").read_text())["n_points"] == len(planned)


def test_jobs_commands_report_errors(cluster, tmp_path):
    unknown = cluster.phases("jobs", "status", "raysubmit_doesnotexist", "--address", cluster.address)
    assert unknown.returncode == 2
    assert "not found" in unknown.stderr
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("name: bad\nkind: isotropic\nsteps: -1\ngrids: [{protocol: elr, axes: {lr: [0.1], wd: [0.1]}}]\n")
    rejected = cluster.phases("submit", str(bad_spec), "--address", cluster.address)
    assert rejected.returncode == 2
    assert "steps" in rejected.stderr


def test_stopped_job_resumes(cluster, tmp_path):
    # A driver stopped mid-sweep (`phases jobs stop`) loses nothing written: `phases submit
    # --resume` runs only the chunks without a part file, and every point ends up present once.
    raw = yaml.safe_load(SMOKE_SPEC.read_text())
    raw.update(name="resumed", steps=60000, chunk_size=4)
    spec = tmp_path / "resumed.yaml"
    spec.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "runs"
    parts = storage / "resumed" / "parts"
    first = cluster.submit(spec, storage)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(parts.glob("*.parquet")):
        time.sleep(0.5)
    stopped = cluster.phases("jobs", "stop", first, "--address", cluster.address)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in cluster.wait(first)
    done_before = {path.name for path in parts.glob("*.parquet")}
    planned = plan_sweep(load(spec), storage=tmp_path / "plan")
    assert 0 < len(done_before) < len(planned.chunks)

    resumed = cluster.phases("submit", str(spec), "--address", cluster.address, "--storage", str(storage), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = cluster.wait(resumed.stdout.strip().splitlines()[-1])
    assert "SUCCEEDED" in final, final
    points = pl.read_parquet(storage / "resumed" / "points.parquet")
    assert sorted(points["point_id"]) == sorted(point.point_id for point in planned.points)
    assert done_before <= {path.name for path in parts.glob("*.parquet")}


def test_lost_worker_node_is_survived(cluster, tmp_path):
    # Chunks long enough to be running when the worker node is killed; each checkpoints every
    # second. The sweep finishes on the head with every point present exactly once.
    raw = yaml.safe_load(SMOKE_SPEC.read_text())
    raw.update(name="lost_node", steps=60000, chunk_size=4, checkpoint_every_s=1.0, max_failures=3)
    spec = tmp_path / "lost_node.yaml"
    spec.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "runs"
    job_id = cluster.submit(spec, storage)

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list((storage / "lost_node" / "parts").glob("*.parquet")):
        time.sleep(1)
    killed = cluster.script("kill-worker", "1")
    assert killed.returncode == 0, killed.stderr

    final = cluster.wait(job_id, timeout_s=600)
    logs = cluster.phases("jobs", "logs", job_id, "--address", cluster.address).stdout
    assert "SUCCEEDED" in final, final + logs[-3000:]
    points = pl.read_parquet(storage / "lost_node" / "points.parquet")
    planned = [point.point_id for point in plan_sweep(load(spec), storage=tmp_path / "plan").points]
    assert sorted(points["point_id"]) == sorted(planned)
    assert points["point_id"].n_unique() == points.height
