"""`kvengine cluster`'s refusals, each one `error:` line before anything starts (no Ray needed for most)."""

from __future__ import annotations

import sys

from kvtest import run_main


def test_zero_replicas(monkeypatch, capsys, cluster_model):
    code, _, err = run_main(monkeypatch, capsys, "cluster", "--replicas", "0", "--model", str(cluster_model))
    assert code == 2 and err.strip() == "error: --replicas must be at least 1, got 0"


def test_more_replicas_than_memory(monkeypatch, capsys, cluster_model):
    monkeypatch.setattr("kvengine.cluster.require_ray", lambda: None)
    monkeypatch.setattr("kvengine.cache.pool.available_memory", lambda device: 8 << 30)
    code, _, err = run_main(monkeypatch, capsys, "cluster", "--replicas", "64", "--model", str(cluster_model),
                            "--kv-cache-memory", "1e8")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: 64 replicas need about") and "8.0 GiB is available" in err


def test_ray_missing(monkeypatch, capsys, cluster_model):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = run_main(monkeypatch, capsys, "cluster", "--model", str(cluster_model))
    assert code == 2 and err.strip() == ("error: Ray Serve is not installed; install the cluster extra: "
                                         "pip install 'kvengine[cluster]'")
