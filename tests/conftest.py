"""Shared fixtures: one embedded Ray instance per test session, bound to 127.0.0.1."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from phases.runtime import apply_environment_defaults

apply_environment_defaults()

REPO = Path(__file__).resolve().parents[1]
SMOKE_SPEC = REPO / "search_spaces" / "ideal_gas_smoke.yaml"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for in-process sweeps; `run_sweep` reuses it."""
    from phases.runtime import start_ray, stop_ray

    started = start_ray(None, num_cpus=2)
    yield
    if started:
        stop_ray()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
