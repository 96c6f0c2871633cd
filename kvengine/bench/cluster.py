"""`kvengine bench cluster`: request routers compared on one multi-tenant trace (cluster/trace.py).

Real mode: N replicas of a model on a local Ray instance; for each router the application is deployed anew
(fresh KV caches) and the same trace is replayed by `concurrency` streaming clients against the endpoint.
Per router: prefix hit rate (cached prompt tokens / prompt tokens, from each response's usage), TTFT p50/p99,
output tokens/s, and how evenly requests spread (largest replica's share over the mean). The KV pool of each
replica is sized so that it holds about half of the tenants' system prompts: routing decides what is cached.

Simulation mode: the same trace shape at 64-128 simulated replicas (cluster/simulation.py), no models.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvengine.bench import plots
from kvengine.bench.report import Report, Table, ms, num, percentile
from kvengine.cluster.trace import TraceConfig, TraceRequest, ideal_hit_rate, make_trace
from kvengine.engine.config import EngineConfig

REAL_ROUTERS = ("kvengine", "round_robin", "power_of_two", "prefix_affinity")


@dataclass(slots=True)
class ClusterBenchConfig:
    model: str | None = None
    replicas: int = 2
    routers: tuple[str, ...] = REAL_ROUTERS
    trace: TraceConfig = field(default_factory=TraceConfig)
    concurrency: int = 2
    kv_blocks: int | None = None  # per replica; None = about half the tenants' system prompts plus the running
    engine: EngineConfig = field(default_factory=EngineConfig)  # each replica's, before its KV budget
    timeout_s: float = 900.0


@dataclass(slots=True)
class RouterResult:
    router: str
    requests: int
    failed: int
    hit_rate: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tokens_per_s: float
    duration_s: float
    per_replica: dict[str, int]

    @property
    def max_over_mean(self) -> float:
        counts = list(self.per_replica.values())
        return max(counts) / (sum(counts) / len(counts)) if counts else 0.0

    def summary(self) -> dict[str, Any]:
        return {"hit_rate": round(self.hit_rate, 4), "ttft_p50_s": self.ttft_p50_s, "ttft_p99_s": self.ttft_p99_s,
                "tokens_per_s": round(self.tokens_per_s, 2), "max_over_mean_requests": round(self.max_over_mean, 3),
                "failed": self.failed}


def auto_kv_blocks(config: ClusterBenchConfig, block_size: int) -> int:
    t = config.trace
    system_blocks = t.system_tokens // block_size
    request_blocks = math.ceil((t.system_tokens + t.user_tokens[1] + t.max_tokens) / block_size)
    return math.ceil(0.55 * t.tenants * system_blocks) + config.concurrency * request_blocks


def run_real(config: ClusterBenchConfig) -> tuple[float, dict[str, RouterResult], dict[str, Any]]:
    """(ideal hit rate, result per router, settings used). Starts and stops a local Ray instance."""
    from kvengine.accounting.memory import kv_cache_spec_for
    from kvengine.cluster import require_ray
    from kvengine.cluster.app import ClusterConfig, free_port, prepare, start, stop
    from kvengine.weights.source import open_model_source

    require_ray()
    source = open_model_source(config.model)
    model_config = source.model_config()
    engine = config.engine
    block_size = engine.block_size
    spec = kv_cache_spec_for(model_config, engine.resolved_dtype(), block_size)
    blocks = config.kv_blocks or auto_kv_blocks(config, block_size)
    vocab = model_config.vocab_size
    trace = make_trace(config.trace, (256 if vocab > 1024 else 10, vocab - 1))
    kv_bytes = int(blocks * spec.bytes_per_block)
    results: dict[str, RouterResult] = {}
    port = free_port("127.0.0.1")  # Serve's proxy keeps the port it started with: every deployment uses it
    try:
        for router in config.routers:
            cluster = prepare(ClusterConfig(replicas=config.replicas, model=config.model, port=port, router=router,
                                            engine=replace(engine, kv_cache_memory=kv_bytes)))
            url = start(cluster)
            results[router] = asyncio.run(_replay(url, trace, config.concurrency, config.timeout_s, router))
    finally:
        stop()
    settings = {"kv_blocks_per_replica": blocks, "kv_bytes_per_replica": kv_bytes,
                "model": source.name, "threads_per_replica": cluster.engine.num_threads}
    return ideal_hit_rate(trace, config.trace.system_tokens, block_size), results, settings


async def _replay(url: str, trace: list[TraceRequest], concurrency: int, timeout_s: float,
                  router: str) -> RouterResult:
    """The trace through `concurrency` streaming clients (closed loop): hit rate, TTFT, tokens/s, per replica."""
    import httpx

    queue: asyncio.Queue[TraceRequest] = asyncio.Queue()
    for r in trace:
        queue.put_nowait(r)
    ttfts: list[float] = []
    per_replica: dict[str, int] = {}
    totals = {"cached": 0, "prompt": 0, "tokens": 0, "failed": 0}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            answer = await _stream(http, url, queue.get_nowait())
            if answer is None:
                totals["failed"] += 1
                continue
            replica, first, usage = answer
            per_replica[replica] = per_replica.get(replica, 0) + 1
            if first is not None:
                ttfts.append(first)
            totals["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
            totals["prompt"] += usage["prompt_tokens"]
            totals["tokens"] += usage["completion_tokens"]

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(concurrency))), timeout_s)
    duration = time.perf_counter() - began
    return RouterResult(router, len(trace), totals["failed"], totals["cached"] / max(totals["prompt"], 1),
                        percentile(ttfts, 50), percentile(ttfts, 99), totals["tokens"] / duration, duration,
                        per_replica)


async def _stream(http: Any, url: str, request: TraceRequest) -> tuple[str, float | None, dict[str, Any]] | None:
    """One streamed completion: (the replica that served it, time to first text, usage); None if it failed."""
    import httpx

    body = {"prompt": request.token_ids, "max_tokens": request.max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = usage = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return None
            replica = response.headers.get("x-kvengine-replica", "?")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or usage
    except httpx.HTTPError:
        return None
    return None if usage is None else (replica, first, usage)


def real_report(report: Report, config: ClusterBenchConfig, ideal: float, results: dict[str, RouterResult],
                settings: dict[str, Any]) -> Report:
    report.params.update(settings)
    rr = results.get("round_robin")
    rows = []
    for name, r in results.items():
        vs_rr = f"{r.hit_rate / rr.hit_rate:.2f}x" if rr and rr.hit_rate else "-"
        rows.append([name, f"{r.hit_rate:.3f}", f"{r.hit_rate / ideal:.1%}" if ideal else "-", vs_rr,
                     ms(r.ttft_p50_s), ms(r.ttft_p99_s), num(r.tokens_per_s, 1), f"{r.max_over_mean:.2f}",
                     str(r.failed)])
    report.tables.append(Table(f"{config.replicas} replicas, {config.trace.requests} requests, {config.concurrency} "
                               f"clients; ideal hit rate {ideal:.3f}",
                               ["router", "hit rate", "of ideal", "vs round robin", "TTFT p50", "TTFT p99",
                                "output tok/s", "max/mean requests", "failed"], rows))
    names = list(results)
    footer = report.machine.describe()
    plots.bars(report.plot_path("hit_rate.png", "Prefix hit rate per router"), ["hit rate"],
               {n: [results[n].hit_rate] for n in names}, "cached prompt tokens / prompt tokens",
               f"Prefix hit rate, {config.replicas} replicas (ideal {ideal:.3f})", footer, "{:.3f}")
    plots.bars(report.plot_path("ttft.png", "Time to first token per router"), ["p50", "p99"],
               {n: [results[n].ttft_p50_s or 0, results[n].ttft_p99_s or 0] for n in names}, "seconds",
               "Time to first token", footer, "{:.2f}")
    report.results = {"ideal_hit_rate": ideal, "routers": {n: {**r.summary(), "per_replica": r.per_replica,
                                                               "duration_s": r.duration_s}
                                                           for n, r in results.items()}}
    report.summary = {"mode": "replicas", "replicas": config.replicas, "ideal_hit_rate": round(ideal, 4),
                      "routers": {n: r.summary() for n, r in results.items()}}
    return report


def run_simulation(counts: list[int], trace_config: TraceConfig, requests_per_replica: int,
                   tenants_per_replica: float, prompts_per_pool: float) -> tuple[dict[int, float], dict[int, dict]]:
    """For each replica count: the ideal hit rate and every simulated router's result."""
    from kvengine.cluster.simulation import SIM_ROUTERS, SimConfig, simulate

    ideals, results = {}, {}
    for n in counts:
        trace_n = TraceConfig(tenants=max(2, round(tenants_per_replica * n)), system_tokens=trace_config.system_tokens,
                              user_tokens=trace_config.user_tokens, max_tokens=trace_config.max_tokens,
                              requests=requests_per_replica * n, zipf_s=trace_config.zipf_s, seed=trace_config.seed)
        trace = make_trace(trace_n, (10, 50_000))
        bs = 16
        request_blocks = math.ceil((trace_n.system_tokens + trace_n.user_tokens[1] + trace_n.max_tokens) / bs)
        blocks = math.ceil(prompts_per_pool * trace_n.system_tokens / bs) + 2 * request_blocks
        ideals[n] = ideal_hit_rate(trace, trace_n.system_tokens, bs)
        results[n] = {r: simulate(trace, SimConfig(replicas=n, blocks_per_replica=blocks), r) for r in SIM_ROUTERS}
    return ideals, results


def simulation_report(report: Report, ideals: dict[int, float], results: dict[int, dict]) -> Report:
    rows = []
    for n, by_router in results.items():
        rr = by_router["round_robin"].hit_rate
        for name, r in by_router.items():
            rows.append([str(n), name, f"{r.hit_rate:.3f}", f"{r.hit_rate / ideals[n]:.1%}",
                         f"{r.hit_rate / rr:.2f}x" if rr else "-", f"{r.max_over_mean_requests:.2f}",
                         f"{r.max_over_mean_work:.2f}", ms(r.mean_wait_s)])
    report.tables.append(Table("Simulated replicas (no models): hit rate against load balance",
                               ["replicas", "router", "hit rate", "of ideal", "vs round robin", "max/mean requests",
                                "max/mean work", "mean queue wait"], rows))
    counts = list(results)
    routers = list(next(iter(results.values())))
    footer = report.machine.describe()
    plots.lines(report.plot_path("sim_hit_rate.png", "Hit rate as replicas grow"),
                {r: (counts, [results[n][r].hit_rate for n in counts]) for r in routers},
                "replicas", "prefix hit rate", "Simulated hit rate", footer)
    plots.lines(report.plot_path("sim_balance.png", "Largest replica's requests over the mean"),
                {r: (counts, [results[n][r].max_over_mean_requests for n in counts]) for r in routers},
                "replicas", "max / mean requests", "Simulated load balance", footer, hline=(1.5, "1.5x goal"))
    report.results = {"ideal_hit_rate": ideals, "replicas": {n: {r: res.to_dict() for r, res in by.items()}
                                                             for n, by in results.items()}}
    report.summary = {"mode": "simulation", "replicas": {
        str(n): {"ideal_hit_rate": round(ideals[n], 4),
                 "routers": {r: {"hit_rate": round(res.hit_rate, 4),
                                 "max_over_mean_requests": round(res.max_over_mean_requests, 3),
                                 "max_over_mean_work": round(res.max_over_mean_work, 3)}
                             for r, res in by.items()}} for n, by in results.items()}}
    return report
