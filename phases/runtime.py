"""Process-wide settings for Ray and MLflow, and starting or attaching to Ray.

The embedded default is a local Ray instance bound to 127.0.0.1: on Linux Ray binds to the
machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before `ray.init`.
Usage statistics and MLflow telemetry are off.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENVIRONMENT_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # An unreachable tracking server should fail within seconds, not minutes of retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "RAY_AIR_NEW_OUTPUT": "0",
    # With num_to_keep set, every trial checkpoint forces an experiment snapshot. That is intended
    # because checkpoints are rare and small, so Tune's warning about frequent snapshots is noise.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def apply_environment_defaults() -> None:
    """Set the defaults above unless the user has set them."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError if a HOST:PORT (or ray://HOST:PORT) Ray address does not accept connections.

    `ray.init` retries an unreachable address for minutes, so a quick TCP check turns a typo into
    an immediate error. "auto", http:// addresses and None are not checked.
    """
    import socket

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address == "auto" or address.startswith(("http://", "https://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"invalid Ray address {address!r}; use HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address} ({error}); check that `ray start --head` runs there "
            "and that --address (or RAY_ADDRESS) names its GCS port, usually 6379"
        ) from None


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Start an embedded Ray instance or attach to a cluster; returns True if this call started it.

    `address` None (and no RAY_ADDRESS) starts Ray locally on 127.0.0.1. An already initialised Ray
    (a notebook or a test that started it) is reused as it is.
    """
    apply_environment_defaults()
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
