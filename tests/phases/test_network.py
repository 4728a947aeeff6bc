"""In embedded mode every Ray socket listens on the loopback interface."""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_embedded_ray_listens_on_loopback_only(ray_local):
    import ray

    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    driver = psutil.Process()
    listening: list[tuple[str, str, int]] = []
    for process in [driver, *driver.children(recursive=True)]:
        try:
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    listening.append((process.name(), connection.laddr.ip, connection.laddr.port))
        except psutil.NoSuchProcess:
            continue
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"Ray's processes were not found among {names}"
    outside = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert not outside, f"sockets listening beyond loopback: {outside}"
