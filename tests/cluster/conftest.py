"""Cluster fixtures: one local Ray instance (loopback only) serving 2 replicas of a tiny random model, shared by
every Ray test of the session and shut down at its end. Without the cluster extra the Ray tests are skipped."""

from __future__ import annotations

import time

import pytest
from clustertest import HAVE_RAY, SKIP_REASON
from kvtest import make_tiny_hf_folder

TINY_KV_BYTES = 4 << 20  # 512 blocks of 16 tokens per replica


@pytest.fixture(scope="session")
def cluster_model(tmp_path_factory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("cluster") / "tiny", max_position_embeddings=1024)


class Cluster:
    """A running cluster: its url and how to reach its replicas' processes."""

    def __init__(self, url: str, replicas: int) -> None:
        self.url = url
        self.replicas = replicas

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every replica answers (after start, or after Ray replaced one)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200 and len(self.replica_pids()) == \
                        self.replicas:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the cluster was not ready within {timeout} s")

    def state(self) -> dict:
        import httpx

        return httpx.get(self.url + "/dashboard/state", timeout=30).json()

    def replica_pids(self) -> dict[str, int]:
        """Engine replicas the router has heard from: unique id -> pid (empty unless Serve calls it healthy)."""
        from ray import serve

        if serve.status().applications["kvengine"].deployments["engine"].status != "HEALTHY":
            return {}
        return {rid: info["pid"] for rid, info in self.state()["replicas"].items()}


@pytest.fixture(scope="session")
def cluster(cluster_model):
    if not HAVE_RAY:
        pytest.skip(SKIP_REASON)
    from kvengine.cluster.app import ClusterConfig, prepare, start, stop
    from kvengine.engine.config import EngineConfig

    config = prepare(ClusterConfig(replicas=2, model=str(cluster_model), port=0, stats_period_s=0.2,
                                   engine=EngineConfig(kv_cache_memory=TINY_KV_BYTES, num_threads=1)))
    try:
        running = Cluster(start(config), replicas=2)
        running.wait_ready()
        yield running
    finally:
        stop()
