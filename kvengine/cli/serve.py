"""`kvengine serve` (the OpenAI-compatible server) and `kvengine bench serve` (its load benchmark)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import typer

from kvengine.cli.app import app, bench_app
from kvengine.cli.generate import (
    DeviceOpt,
    DiskBudgetOpt,
    DiskDirOpt,
    DtypeOpt,
    FastWeightsOpt,
    KVDtypeOpt,
    KVMemOpt,
    KVWindowOpt,
    ModelOpt,
    SinkOpt,
    ThreadsOpt,
    WeightsOpt,
    _open_llm,
)
from kvengine.errors import ConfigError

MaxSeqsOpt = typer.Option(64, "--max-num-seqs", help="Requests in the running batch at most.")
MaxLenOpt = typer.Option(None, "--max-model-len", help="Context limit (default: the model's).")
ApiKeyOpt = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes (repeatable; "
                         "each key is its own prefix-cache tenant).")
MaxWaitingOpt = typer.Option(256, "--max-waiting", help="Requests waiting for a slot at most (per replica in a "
                             "cluster); more get HTTP 429 with Retry-After.")
ServedNameOpt = typer.Option(None, "--served-model-name", help="Model id clients send (default: the model's name).")


@app.command()
def serve(
    model: str | None = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    api_key: list[str] | None = ApiKeyOpt,
    open_observability: bool = typer.Option(False, "--open-observability", help="With --api-key, leave /metrics "
                                            "and /dashboard/state open (they need a key otherwise)."),
    max_num_seqs: int = MaxSeqsOpt,
    max_waiting: int = MaxWaitingOpt,
    max_model_len: int | None = MaxLenOpt,
    served_model_name: str | None = ServedNameOpt,
    dtype: str = DtypeOpt,
    weights: str = FastWeightsOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    kv_dtype: str = KVDtypeOpt,
    kv_memory: float | None = KVMemOpt,
    kv_window: int | None = KVWindowOpt,
    sink_tokens: int = SinkOpt,
    kv_disk_dir: str | None = DiskDirOpt,
    kv_disk_budget: float | None = DiskBudgetOpt,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with /metrics and a live KV-cache /dashboard."""
    import uvicorn

    from kvengine.server.app import create_app

    _check_port(port)
    warn_if_open(host, api_key)
    llm = _open_llm(model, dtype, device, threads, kv_dtype, kv_memory, weights, kv_window, sink_tokens,
                    kv_disk_dir=kv_disk_dir, kv_disk_gib=kv_disk_budget, max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len)
    application = create_app(llm, model_name=served_model_name, api_keys=api_key or None, max_waiting=max_waiting,
                             open_observability=open_observability)
    spec = llm.kv_cache_spec
    print(f"kvengine serving '{served_model_name or llm.model_name}' on http://{host}:{port} "
          f"(KV pool {llm.engine.bm.num_blocks} blocks of {spec.block_size} tokens, {spec.dtype}"
          f"{disk_note(llm)}); dashboard: http://{host}:{port}/dashboard", file=sys.stderr)
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@bench_app.command("serve")
def bench_serve(
    model: str | None = ModelOpt,
    concurrency: str = typer.Option("1,8,32,64", "--concurrency", "-c", help="Comma-separated client counts."),
    requests: int | None = typer.Option(None, "--requests", help="Requests per level (default: max(8, 2 x clients))."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", help="Tokens per request (EOS ignored)."),
    max_num_seqs: int = MaxSeqsOpt,
    max_model_len: int | None = MaxLenOpt,
    dtype: str = DtypeOpt,
    weights: str = WeightsOpt,
    threads: int | None = ThreadsOpt,
    kv_memory: float | None = KVMemOpt,
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per level at most."),
    url: str | None = typer.Option(None, "--url", help="Benchmark a running server instead of starting one."),
    out: Path | None = typer.Option(None, "--out", help="Results folder (default: results/serve-<timestamp>/)."),
    kv_disk_dir: str | None = DiskDirOpt,
) -> None:
    """Load benchmark: streaming chat clients against a server on 127.0.0.1; req/s, tok/s, TTFT and ITL."""
    from kvengine.bench.report import Report, default_out_dir
    from kvengine.bench.serving import ServeBenchConfig, run_serving_bench, serving_report
    from kvengine.cli.bench import parse_int_list

    levels = parse_int_list(concurrency, "--concurrency")
    config = ServeBenchConfig(model=model, levels=levels, requests=requests, max_tokens=max_tokens,
                              max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype, weights=weights,
                              threads=threads,
                              kv_cache_memory=kv_memory, timeout_s=timeout, url=url, kv_disk_dir=kv_disk_dir)
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    if url is None:  # the server starts in a child: say what is wrong with its settings here, in one line
        from kvengine.config import EngineConfig

        EngineConfig(weights=weights, dtype=dtype).resolved_dtype()
    report = Report("serve", "kvengine serve under load", out if out is not None else default_out_dir("serve"),
                    {"model": model or "default", "concurrency": levels, "requests": requests or "max(8, 2 x clients)",
                     "max_tokens": max_tokens, "max_num_seqs": max_num_seqs, "dtype": dtype, "weights": weights,
                     "url": url or "child", "kv_disk_dir": kv_disk_dir})
    name, results, final = run_serving_bench(config)
    serving_report(report, name, results, final, max_tokens).finish()


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
