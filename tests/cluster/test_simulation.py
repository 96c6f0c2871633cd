"""The simulation drives the router's BlockIndex and policy over simulated replicas (real BlockManagers)."""

from __future__ import annotations

import pytest

from kvengine.cluster.simulation import SIM_ROUTERS, SimConfig, simulate
from kvengine.cluster.trace import TraceConfig, ideal_hit_rate, make_trace


@pytest.fixture(scope="module")
def results():
    trace = make_trace(TraceConfig(tenants=32, system_tokens=128, requests=600), (10, 5000))
    config = SimConfig(replicas=16, blocks_per_replica=4 * 8 + 12)  # room for 4 of the 32 system prompts
    return ideal_hit_rate(trace, 128, 16), {r: simulate(trace, config, r) for r in SIM_ROUTERS}


def test_kvengine_routing_beats_load_only_routing_on_hits(results):
    ideal, by_router = results
    kv, rr, p2 = by_router["kvengine"], by_router["round_robin"], by_router["power_of_two"]
    assert kv.hit_rate <= ideal
    assert kv.hit_rate > 2 * rr.hit_rate and kv.hit_rate > 2 * p2.hit_rate
    assert rr.max_over_mean_requests == pytest.approx(1.0, abs=0.07)  # 600 requests over 16 replicas in turn


def test_kvengine_routing_keeps_every_replica_near_the_mean(results):
    _, by_router = results
    kv = by_router["kvengine"]
    assert kv.max_over_mean_requests < 1.5
    assert all(0 <= r.hit_rate <= 1 and r.mean_wait_s >= 0 for r in by_router.values())


def test_bench_cluster_simulate_ends_with_its_json_line(monkeypatch, capsys, tmp_path):
    import json

    from kvtest import run_main

    code, out, _ = run_main(monkeypatch, capsys, "bench", "cluster", "--simulate", "--replicas", "8,16",
                            "--system-tokens", "64", "--out", str(tmp_path))
    assert code in (0, None)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bench"] == "cluster" and summary["mode"] == "simulation"
    for count in ("8", "16"):
        routers = summary["replicas"][count]["routers"]
        assert set(routers) == {"kvengine", "kvengine_no_pending", "round_robin", "power_of_two"}
        assert routers["kvengine"]["hit_rate"] > routers["round_robin"]["hit_rate"]
    assert (tmp_path / "sim_hit_rate.png").is_file() and (tmp_path / "report.md").is_file()


def test_bench_cluster_refuses_bad_input(monkeypatch, capsys):
    from kvtest import run_main

    code, _, err = run_main(monkeypatch, capsys, "bench", "cluster", "--replicas", "2,4")
    assert code == 2 and err.strip() == "error: --replicas takes one count without --simulate"
    code, _, err = run_main(monkeypatch, capsys, "bench", "cluster", "--routers", "kvengine,magic")
    assert code == 2 and "unknown router(s) magic" in err
