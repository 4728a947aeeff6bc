"""Submit a sweep to an existing Ray cluster as a Ray Job, and follow or stop the job.

The job's driver runs `phases sweep` on the cluster. Its `runtime_env` uploads a staging copy of
this package (`phases/`, `analysis/`, `pyproject.toml`) together with the spec, so the cluster runs
the submitter's code, and the entrypoint calls the same module with the same options. The cluster's
Python environment must provide the dependencies (an image built from this project, or
`--pip`, which installs the project's pinned dependency list into the job's environment).

Token authentication: the Jobs client sends the token Ray finds in RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or its default token file, when RAY_AUTH_MODE=token is set.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phases.spec import load

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
STAGED = ("phases", "analysis", "pyproject.toml")
# Variables every job gets, so that its driver and trials behave as a local run does.
JOB_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


class JobError(RuntimeError):
    """A job request that failed; the message names the address or job and what to do."""


@dataclass
class Submission:
    """Record of a submitted job: its id and the command its driver runs."""

    job_id: str
    entrypoint: str


def project_dependencies() -> list[str]:
    """Return the dependency specifiers of pyproject.toml, as `--pip` installs them on the cluster."""
    with (PACKAGE_ROOT / "pyproject.toml").open("rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def sweep_entrypoint(spec_file: str, *, storage: str, name: str | None, resume: bool, tracking_uri: str | None, track: bool) -> str:
    """Return the shell command the job runs: `python -m phases.cli sweep ...` on the staged spec.

    The driver first copies the working directory to a private one, runs there, and removes it on
    exit. Ray deletes a node's copy of the job's working_dir when the last worker using it exits,
    which happens when Tune's trial actors stop while the driver is still running in it (seen with
    Ray 2.60).
    """
    arguments = ["python", "-m", "phases.cli", "sweep", spec_file, "--storage", storage]
    if name:
        arguments += ["--name", name]
    if resume:
        arguments.append("--resume")
    if tracking_uri:
        arguments += ["--tracking-uri", tracking_uri]
    if not track:
        arguments.append("--no-track")
    private_copy = (
        'driver_dir="$(mktemp -d "${TMPDIR:-/tmp}/phases-driver-XXXXXX")" && trap \'rm -rf "$driver_dir"\' EXIT INT TERM'
        ' && cp -r . "$driver_dir" && cd "$driver_dir"'
    )
    return f"{private_copy} && {shlex.join(arguments)}"


def stage(spec_path: Path) -> Path:
    """Copy the package and the spec into a fresh directory, the job's working_dir."""
    directory = Path(tempfile.mkdtemp(prefix="phases-job-"))
    for item in STAGED:
        source = PACKAGE_ROOT / item
        if source.is_dir():
            shutil.copytree(source, directory / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, directory / item)
    shutil.copy2(spec_path, directory / "spec.yaml")
    return directory


def client(address: str) -> Any:
    """Return a Ray Jobs client for `address` (http://HEAD:8265); raises JobError if it is unreachable."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # the client raises ConnectionError, RuntimeError or ValueError by version
        raise JobError(
            f"cannot reach the Ray Jobs API at {address}: {error}. Check the dashboard address (http://HEAD:8265) "
            "and, on a cluster with token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
        ) from None


def submit(
    spec_path: str | Path,
    address: str,
    *,
    storage: str,
    name: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    track: bool = True,
    pip: bool = False,
    job_id: str | None = None,
) -> Submission:
    """Validate the spec here, then submit `phases sweep` on it as a Ray Job; return the submission.

    Raises SpecError for an invalid spec (before anything is sent) and JobError when the cluster
    does not accept the job.
    """
    spec_path = Path(spec_path)
    spec = load(spec_path, name=name)
    working_dir = stage(spec_path)
    entrypoint = sweep_entrypoint("spec.yaml", storage=storage, name=spec.name, resume=resume, tracking_uri=tracking_uri, track=track)
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "env_vars": dict(JOB_ENVIRONMENT)}
    if pip:
        runtime_env["pip"] = project_dependencies()
    try:
        jobs = client(address)
        try:
            submitted = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        except Exception as error:  # the client wraps HTTP failures in RuntimeError
            raise JobError(f"the Ray cluster at {address} did not accept the job: {error}") from None
    finally:
        shutil.rmtree(working_dir, ignore_errors=True)  # submit_job has uploaded it by now
    logger.info("submitted job %s to %s: %s", submitted, address, entrypoint)
    return Submission(submitted, entrypoint)


def status(address: str, job_id: str) -> dict[str, Any]:
    """Return the job's status, message and times as a dict; raises JobError for an unknown job."""
    jobs = client(address)
    try:
        info = jobs.get_job_info(job_id)
    except Exception as error:
        raise JobError(f"job {job_id!r} not found at {address}: {error}") from None
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(address: str, job_id: str) -> str:
    """Return the job's driver output so far."""
    jobs = client(address)
    try:
        return jobs.get_job_logs(job_id)
    except Exception as error:
        raise JobError(f"cannot read the logs of job {job_id!r} at {address}: {error}") from None


def stop(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job; return False when it had already finished."""
    jobs = client(address)
    try:
        return bool(jobs.stop_job(job_id))
    except Exception as error:
        raise JobError(f"cannot stop job {job_id!r} at {address}: {error}") from None
