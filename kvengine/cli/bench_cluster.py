"""`kvengine bench cluster`: request routers on one multi-tenant trace, on real replicas (Ray Serve) or simulated."""

from __future__ import annotations

from pathlib import Path

import typer

from kvengine.cli.app import bench_app
from kvengine.cli.bench import DtypeOpt, ModelOpt, OutOpt, _report, parse_int_list
from kvengine.cli.generate import WeightsOpt
from kvengine.errors import ConfigError


@bench_app.command("cluster")
def cluster(
    model: str | None = ModelOpt,
    replicas: str = typer.Option("2", "--replicas", "-r", help="Replicas (real), or comma-separated counts with "
                                 "--simulate (e.g. 64,128)."),
    routers: str = typer.Option("kvengine,round_robin,power_of_two,prefix_affinity", "--routers",
                                help="Comma-separated routers to compare (real mode)."),
    simulate: bool = typer.Option(False, "--simulate", help="Simulated replicas (no models): block events and "
                                  "queues only."),
    tenants: int = typer.Option(8, "--tenants", help="System prompts (real mode; simulation: 2 per replica)."),
    system_tokens: int = typer.Option(384, "--system-tokens", help="Tokens of each system prompt."),
    requests: int = typer.Option(96, "--requests", help="Requests in the trace (simulation: 30 per replica)."),
    max_tokens: int = typer.Option(8, "--max-tokens", "-n", help="Output tokens per request (EOS ignored)."),
    concurrency: int = typer.Option(2, "--concurrency", "-c", help="Clients sending at once (real mode)."),
    zipf: float = typer.Option(0.6, "--zipf", help="Zipf exponent of the tenants' popularity."),
    kv_blocks: int | None = typer.Option(None, "--kv-blocks", help="KV blocks per replica (default: about half "
                                         "the system prompts plus the running requests)."),
    dtype: str = DtypeOpt,
    weights: str = WeightsOpt,
    seed: int = typer.Option(0, "--seed", help="Trace seed."),
    out: Path | None = OutOpt,
) -> None:
    """Compare request routers (kvengine's KV-aware one, round robin, power of two, Ray's prefix affinity): prefix
    hit rate, TTFT, tokens/s; or, with --simulate, hit rate against load balance at 64-128 replicas."""
    from kvengine.bench.cluster import (
        REAL_ROUTERS,
        ClusterBenchConfig,
        real_report,
        run_real,
        run_simulation,
        simulation_report,
    )
    from kvengine.cluster.trace import TraceConfig

    counts = parse_int_list(replicas, "--replicas")
    for name, value in (("--requests", requests), ("--tenants", tenants), ("--system-tokens", system_tokens),
                        ("--max-tokens", max_tokens), ("--concurrency", concurrency)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    trace = TraceConfig(tenants=tenants, system_tokens=system_tokens, max_tokens=max_tokens, requests=requests,
                        zipf_s=zipf, seed=seed)
    if simulate:
        report = _report("cluster", "kvengine bench cluster --simulate: routers at scale", out,
                         {"replicas": counts, "tenants": "2 per replica", "system_tokens": system_tokens,
                          "requests": "30 per replica", "zipf": zipf, "pool": "4 system prompts + 2 requests",
                          "utilization": 0.7, "seed": seed})
        ideals, results = run_simulation(counts, trace, 30, 2.0, 4.0)
        simulation_report(report, ideals, results).finish()
        return
    if len(counts) != 1:
        raise ConfigError("--replicas takes one count without --simulate")
    chosen = tuple(r.strip() for r in routers.split(",") if r.strip())
    unknown = [r for r in chosen if r not in REAL_ROUTERS]
    if unknown or not chosen:
        raise ConfigError(f"unknown router(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(REAL_ROUTERS)}")
    config = ClusterBenchConfig(model=model, replicas=counts[0], routers=chosen, trace=trace, concurrency=concurrency,
                                kv_blocks=kv_blocks, engine_args={"dtype": dtype, "weights": weights})
    report = _report("cluster", f"kvengine bench cluster: {counts[0]} replicas, routers compared", out,
                     {"model": model or "default", "replicas": counts[0], "routers": list(chosen), "tenants": tenants,
                      "system_tokens": system_tokens, "requests": requests, "max_tokens": max_tokens,
                      "concurrency": concurrency, "zipf": zipf, "dtype": dtype, "weights": weights, "seed": seed})
    ideal, results, settings = run_real(config)
    real_report(report, config, ideal, results, settings).finish()
