"""`kvengine serve` (the OpenAI-compatible server) and `kvengine bench serve` (its load benchmark)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kvengine.cli.app import app, bench_app
from kvengine.cli.options import FAST_WEIGHTS, EngineOptions, engine_options
from kvengine.cli.values import parse_int_list
from kvengine.errors import ConfigError

if TYPE_CHECKING:  # (the bench modules load only when a bench runs)
    from kvengine.bench.report import Report
    from kvengine.bench.serving import ServeBenchConfig

ApiKeyOpt = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes (repeatable; "
                         "each key is its own prefix-cache tenant).")
MaxWaitingOpt = typer.Option(256, "--max-waiting", help="Requests waiting for a slot at most (per replica in a "
                             "cluster); more get HTTP 429 with Retry-After.")
ServedNameOpt = typer.Option(None, "--served-model-name", help="Model id clients send (default: the model's name).")


SERVE_OPTIONS = ("model", "max_num_seqs", "max_model_len", "dtype", "weights", "device", "num_threads",
                 "kv_cache_dtype", "kv_cache_memory", "kv_window", "sink_tokens", "kv_disk_dir", "kv_disk_budget")


@app.command()
@engine_options(*SERVE_OPTIONS, weights=FAST_WEIGHTS)
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    api_key: list[str] | None = ApiKeyOpt,
    open_observability: bool = typer.Option(False, "--open-observability", help="With --api-key, leave /metrics "
                                            "and /dashboard/state open (they need a key otherwise)."),
    max_waiting: int = MaxWaitingOpt,
    served_model_name: str | None = ServedNameOpt,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    *, engine: EngineOptions,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with /metrics and a live KV-cache /dashboard."""
    import uvicorn

    from kvengine.server.app import create_app

    _check_port(port)
    warn_if_open(host, api_key)
    llm = engine.open_llm()
    application = create_app(llm, model_name=served_model_name, api_keys=api_key or None, max_waiting=max_waiting,
                             open_observability=open_observability)
    spec = llm.kv_cache_spec
    print(f"kvengine serving '{served_model_name or llm.model_name}' on http://{host}:{port} "
          f"(KV pool {llm.engine.block_tables.num_blocks} blocks of {spec.block_size} tokens, {spec.dtype}"
          f"{disk_note(llm)}); dashboard: http://{host}:{port}/dashboard", file=sys.stderr)
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@bench_app.command("serve")
@engine_options("model", "max_num_seqs", "max_model_len", "dtype", "weights", "num_threads", "kv_cache_memory",
                "kv_disk_dir", weights=FAST_WEIGHTS)
def bench_serve(
    concurrency: str = typer.Option("1,8,32,64", "--concurrency", "-c", help="Comma-separated client counts."),
    requests: int | None = typer.Option(None, "--requests", help="Requests per level (default: max(8, 2 x clients))."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", help="Tokens per request (EOS ignored)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per level at most."),
    url: str | None = typer.Option(None, "--url", help="Benchmark a running server instead of starting one."),
    out: Path | None = typer.Option(None, "--out", help="Results folder (default: results/serve-<timestamp>/)."),
    compare_disk: bool = typer.Option(False, "--compare-disk", help="Run every level twice, without and with the "
                                      "KV disk tier (in --kv-disk-dir, else a temporary directory), and compare "
                                      "decode speed."),
    *, engine: EngineOptions,
) -> None:
    """Load benchmark: streaming chat clients against a server on 127.0.0.1; req/s, tok/s, TTFT and ITL."""
    from kvengine.bench.report import open_report
    from kvengine.bench.serving import ServeBenchConfig, run_serving_bench, serving_report

    levels = parse_int_list(concurrency, "--concurrency")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    if compare_disk and url is not None:
        raise ConfigError("--compare-disk starts its own two servers; it cannot be used with --url")
    # the server starts in a child: say what is wrong with its settings here, in one line
    config = ServeBenchConfig(model=engine.model, engine=engine.config(device="cpu") if url is None else None,
                              levels=levels, requests=requests, max_tokens=max_tokens, timeout_s=timeout, url=url)
    if config.engine is not None:
        config.engine.resolved_dtype()
    report = open_report("serve", "kvengine serve under load", out,
                         {"model": engine.model or "default", "concurrency": levels,
                          "requests": requests or "max(8, 2 x clients)", "max_tokens": max_tokens,
                          "max_num_seqs": engine.max_num_seqs, "dtype": engine.dtype, "weights": engine.weights,
                          "url": url or "child", "kv_disk_dir": engine.kv_disk_dir, "compare_disk": compare_disk})
    if not compare_disk:
        name, results, final = run_serving_bench(config)
        serving_report(report, name, results, final, max_tokens).finish()
        return
    _compare_disk(report, config, engine.kv_disk_dir, max_tokens)


def _compare_disk(report: Report, config: ServeBenchConfig, disk_dir: str | None, max_tokens: int) -> None:
    """The levels against a server without the disk tier, then against one with it; one report of both."""
    import dataclasses
    import tempfile

    from kvengine.bench.serving import disk_comparison, run_serving_bench, serving_report

    with tempfile.TemporaryDirectory(prefix="kvengine-bench-disk-") as tmp:
        directory = disk_dir or tmp
        plain = dataclasses.replace(config, engine=dataclasses.replace(config.engine, kv_disk_dir=None,
                                                                       kv_disk_budget=None))
        name, results, final = run_serving_bench(plain)
        with_disk = dataclasses.replace(config, engine=dataclasses.replace(config.engine, kv_disk_dir=directory))
        _, disk_results, _ = run_serving_bench(with_disk)
        serving_report(report, name, results, final, max_tokens)
        disk_comparison(report, results, disk_results, directory).finish()


def disk_note(llm) -> str:
    disk = llm.engine.disk
    if disk is None:
        return ""
    s = disk.store.stats
    return (f"; KV disk tier {disk.store.root}: {s.files} blocks, {s.bytes / 2**30:.2f} of "
            f"{s.budget / 2**30:.2f} GiB")


def warn_if_open(host: str, api_keys: list[str] | None) -> None:
    """One warning line when a server without keys listens beyond this machine."""
    if not api_keys and not _is_loopback(host):
        print(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
