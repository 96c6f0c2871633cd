"""The kvengine router on 2 real replicas: a prefix lands where it is cached, a burst spills, a killed replica is
replaced, forgotten by the router, and its requests end cleanly (never hang)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from clustertest import needs_ray

pytestmark = [needs_ray, pytest.mark.ray]


def prompt(prefix: str, suffix: str) -> list[int]:
    """Token ids: a shared prefix of 6 full blocks, then a short suffix (ids in the tiny vocabulary)."""
    base = [10 + (ord(c) * 7 + i) % 300 for i, c in enumerate(prefix * 96)][:96]
    return base + [10 + (ord(c) % 300) for c in suffix]


def complete(cluster, ids: list[int], max_tokens: int = 2, **extra) -> tuple[str, dict]:
    r = httpx.post(cluster.url + "/v1/completions", timeout=120,
                   json={"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.headers["x-kvengine-replica"], r.json()


def test_requests_sharing_a_prefix_land_on_its_holder(cluster):
    first, _ = complete(cluster, prompt("holder", "a"))
    later = [complete(cluster, prompt("holder", s)) for s in "bcd"]  # within the load bound's slack
    assert {replica for replica, _ in later} == {first}
    assert all(body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96 for _, body in later)


def test_a_burst_on_one_prefix_spills_to_the_other_replica(cluster):
    ids = [prompt("burst", f"{i:02d}") for i in range(14)]
    with ThreadPoolExecutor(14) as pool:  # all in flight at once: the holder passes the load bound
        served = list(pool.map(lambda p: complete(cluster, p, max_tokens=96), ids))
    replicas = [replica for replica, _ in served]
    assert len(set(replicas)) == 2, replicas
    assert max(replicas.count(r) for r in set(replicas)) < len(replicas)


def test_a_killed_replica_fails_its_stream_cleanly_then_is_replaced_and_forgotten(cluster):
    pids = cluster.replica_pids()
    with httpx.stream("POST", cluster.url + "/v1/completions", timeout=120,
                      json={"prompt": prompt("doomed", "x"), "max_tokens": 900, "ignore_eos": True,
                            "stream": True}) as response:
        victim = response.headers["x-kvengine-replica"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(pids[victim], signal.SIGKILL)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and victim in error["message"]
    served = {complete(cluster, prompt("after", str(i)))[0] for i in range(4)}  # later requests succeed
    assert victim not in served
    deadline = time.monotonic() + 60
    while victim in cluster.state()["replicas"]:  # the router forgets the dead replica's blocks
        assert time.monotonic() < deadline, "the router still indexes the dead replica"
        time.sleep(0.2)
    cluster.wait_ready()  # Ray Serve replaced it
    assert victim not in cluster.replica_pids() and len(cluster.replica_pids()) == 2
