"""A local cluster listens on loopback only: Ray's GCS, raylet, object manager, agents and workers, Serve's proxy
and every replica's gRPC server (kvengine/cluster/loopback.py), since the endpoint's --host is 127.0.0.1 here."""

from __future__ import annotations

import os

import pytest
from clustertest import needs_ray

from kvengine.cluster.loopback import is_loopback

pytestmark = [needs_ray, pytest.mark.ray]


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in `pid` and the processes below it."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for process in [root] + root.children(recursive=True):
        try:
            for c in process.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((process.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker exiting meanwhile
    return found


def test_nothing_started_listens_beyond_loopback(cluster):
    cluster.client().completions.create(model=cluster.client().models.list().data[0].id, prompt="x", max_tokens=1)
    listening = _listening(os.getpid())
    port = int(cluster.url.rsplit(":", 1)[1])
    assert any(p == port for _, _, p in listening)  # the walk does reach Ray's processes (the proxy's port)
    assert len(listening) >= 5  # GCS, raylet, agents, controller, proxy, replicas
    assert [s for s in listening if not is_loopback(s[1])] == []


def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "::1", "localhost", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "192.0.2.2", "::ffff:10.0.0.1"))
