"""`kvengine bench cluster`: request routers on one multi-tenant trace, on real replicas (Ray Serve) or simulated."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kvengine.bench.report import open_report
from kvengine.cli.app import bench_app
from kvengine.cli.bench import OutOpt
from kvengine.cli.options import FAST_WEIGHTS, EngineOptions, engine_options
from kvengine.cli.values import at_least_one, parse_int_list
from kvengine.errors import ConfigError

if TYPE_CHECKING:
    from kvengine.cluster.trace import TraceConfig


@bench_app.command("cluster")
@engine_options("model", "dtype", "weights", weights=FAST_WEIGHTS)
def cluster(
    replicas: str = typer.Option("2", "--replicas", "-r", help="Replicas (real), or comma-separated counts with "
                                 "--simulate (e.g. 64,128)."),
    routers: str = typer.Option("kvengine,round_robin,power_of_two,prefix_affinity", "--routers",
                                help="Comma-separated routers to compare (real mode)."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulated replicas (no models): block events and "
                                  "queues only."),
    tenants: int = typer.Option(16, "--tenants", help="System prompts (real mode; simulation: 2 per replica)."),
    system_tokens: int = typer.Option(384, "--system-tokens", help="Tokens of each system prompt."),
    requests: int = typer.Option(128, "--requests", help="Requests in the trace (simulation: 30 per replica)."),
    max_tokens: int = typer.Option(8, "--max-tokens", "-n", help="Output tokens per request (EOS ignored)."),
    concurrency: int = typer.Option(2, "--concurrency", "-c", help="Clients sending at once (real mode)."),
    zipf: float = typer.Option(0.3, "--zipf", help="Zipf exponent of the tenants' popularity."),
    kv_blocks: int | None = typer.Option(None, "--kv-blocks", help="KV blocks per replica (default: about half "
                                         "the system prompts plus the running requests)."),
    seed: int = typer.Option(0, "--seed", help="Trace seed."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Compare request routers (kvengine's KV-aware one, round robin, power of two, Ray's prefix affinity): prefix
    hit rate, TTFT, tokens/s; or, with --simulate, hit rate against load balance at 64-128 replicas."""
    from kvengine.cluster.trace import TraceConfig

    counts = parse_int_list(replicas, "--replicas")
    for name, value in (("--requests", requests), ("--tenants", tenants), ("--system-tokens", system_tokens),
                        ("--max-tokens", max_tokens), ("--concurrency", concurrency)):
        at_least_one(value, name)
    trace = TraceConfig(tenants=tenants, system_tokens=system_tokens, max_tokens=max_tokens, requests=requests,
                        zipf_s=zipf, seed=seed)
    if simulate:
        _simulated(counts, trace, out)
        return
    if len(counts) != 1:
        raise ConfigError("--replicas takes one count without --simulate")
    _real(engine, counts[0], _routers(routers), trace, concurrency, kv_blocks, out)


def _routers(text: str) -> tuple[str, ...]:
    from kvengine.bench.cluster import REAL_ROUTERS

    chosen = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in chosen if r not in REAL_ROUTERS]
    if unknown or not chosen:
        raise ConfigError(f"unknown router(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(REAL_ROUTERS)}")
    return chosen


def _simulated(counts: list[int], trace: TraceConfig, out: Path | None) -> None:
    """Every simulated router at each replica count (2 tenants and 30 requests per replica)."""
    from kvengine.bench.cluster import run_simulation, simulation_report

    report = open_report("cluster", "kvengine bench cluster --simulate: routers at scale", out,
                         {"replicas": counts, "tenants": "2 per replica", "system_tokens": trace.system_tokens,
                          "requests": "30 per replica", "zipf": trace.zipf_s, "pool": "4 system prompts + 2 requests",
                          "utilization": 0.7, "seed": trace.seed})
    ideals, results = run_simulation(counts, trace, 30, 2.0, 4.0)
    simulation_report(report, ideals, results).finish()


def _real(engine: EngineOptions, replicas: int, routers: tuple[str, ...], trace: TraceConfig, concurrency: int,
          kv_blocks: int | None, out: Path | None) -> None:
    """Each router in turn in front of `replicas` real engines (Ray Serve)."""
    from kvengine.bench.cluster import ClusterBenchConfig, real_report, run_real

    config = ClusterBenchConfig(model=engine.model, replicas=replicas, routers=routers, trace=trace,
                                concurrency=concurrency, kv_blocks=kv_blocks,
                                engine=engine.config())
    report = open_report("cluster", f"kvengine bench cluster: {replicas} replicas, routers compared", out,
                         {"model": engine.model or "default", "replicas": replicas, "routers": list(routers),
                          "tenants": trace.tenants, "system_tokens": trace.system_tokens, "requests": trace.requests,
                          "max_tokens": trace.max_tokens, "concurrency": concurrency, "zipf": trace.zipf_s,
                          "dtype": engine.dtype, "weights": engine.weights, "seed": trace.seed})
    ideal, results, settings = run_real(config)
    real_report(report, config, ideal, results, settings).finish()
