"""Serving benchmark: N streaming chat clients (the real `openai` client) against a kvengine server on
127.0.0.1, at several concurrency levels. Reports requests/s, output tokens/s, p50/p99 time to first token
and inter-token latency (gaps between streamed chunks) in a results folder (report.md, result.json, a plot),
prints the table and ends stdout with one JSON line (kvengine.bench.report).

The server runs in a child process (its own interpreter, so the clients do not share its GIL) on a random
free port; `--url` benchmarks a server that is already running instead.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from kvengine.bench import plots
from kvengine.bench.report import Report, Table, ms, num, percentile
from kvengine.engine.config import EngineConfig
from kvengine.errors import ConfigError

TOPICS = ["the ocean", "volcanoes", "honey bees", "the moon", "trains", "chess", "bread", "rivers", "owls",
          "glaciers", "violins", "deserts", "lighthouses", "tea", "comets", "forests", "bridges", "coral reefs",
          "penguins", "clocks", "maps", "rain", "gardens", "kites", "castles", "salt", "thunder", "libraries",
          "bicycles", "mushrooms", "windmills", "snow"]
STYLES = ["Write two sentences about", "Give three facts about", "Describe", "Tell a very short story about"]
STARTUP_TIMEOUT_S = 180.0


@dataclass(slots=True)
class ServeBenchConfig:
    model: str | None = None
    engine: EngineConfig | None = None  # the child server's engine (None with `url`: a server already running)
    levels: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    requests: int | None = None  # per level; None = max(8, 2 x clients)
    max_tokens: int = 32
    timeout_s: float = 600.0
    url: str | None = None


@dataclass(slots=True)
class LevelResult:
    clients: int
    requests: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None


def prompts(count: int) -> list[str]:
    return [f"{STYLES[(i // len(TOPICS)) % len(STYLES)]} {TOPICS[i % len(TOPICS)]}." for i in range(count)]


async def _one(client: Any, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """Stream one chat request: (time to first content, gaps between content chunks, completion tokens)."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if not stamps:
        raise RuntimeError("the stream carried no text")
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], tokens


async def run_level(base_url: str, model: str, clients: int, count: int, max_tokens: int,
                    timeout_s: float) -> LevelResult:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=timeout_s)
    todo = list(reversed(prompts(count)))
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0
    failed = 0

    async def worker() -> None:
        nonlocal tokens, failed
        while todo:
            prompt = todo.pop()
            try:
                ttft, itl, n = await _one(client, model, prompt, max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported, the level goes on
                failed += 1
                print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            ttfts.append(ttft)
            gaps.extend(itl)
            tokens += n

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout_s)
    finally:
        await client.close()
    duration = time.perf_counter() - start
    ok = len(ttfts)
    return LevelResult(clients, ok, failed, duration, ok / duration, tokens / duration, percentile(ttfts, 50),
                       percentile(ttfts, 99), percentile(gaps, 50), percentile(gaps, 99))


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(model: str | None, engine: EngineConfig) -> tuple[subprocess.Popen, str]:
    """A `kvengine serve` child on 127.0.0.1 and a free port serving `model` with `engine`; returns (process,
    base url) once healthy."""
    args = json.dumps({"model": model, "engine": asdict(engine)})
    code = "from kvengine.bench.serving import serve_child; serve_child()"
    proc = subprocess.Popen([sys.executable, "-c", code, args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise ConfigError(f"the benchmark server did not start (exit code {proc.wait()})")
    url = f"http://127.0.0.1:{int(line.split()[1])}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            _get_json(url + "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ConfigError("the benchmark server did not become healthy") from None
            time.sleep(0.2)


def serve_child() -> None:
    """Child process entry: load the model with the parent's EngineConfig, bind 127.0.0.1:0, print 'PORT n',
    serve until killed."""
    import socket

    import uvicorn

    from kvengine.llm import LLM
    from kvengine.server.app import create_app

    a = json.loads(sys.argv[1])
    llm = LLM(a["model"], **a["engine"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = create_app(llm, max_waiting=4096)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def run_serving_bench(config: ServeBenchConfig) -> tuple[str, list[LevelResult], dict[str, Any]]:
    """Every level in turn against one server: (model id, results, the server's final dashboard state)."""
    proc = None
    url = config.url
    if url is None:
        assert config.engine is not None, "a child server needs its EngineConfig"
        proc, url = start_server(config.model, config.engine)
    try:
        model = _get_json(url + "/v1/models")["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 1, 2, config.timeout_s))  # untimed warm-up
        results = []
        for clients in config.levels:
            count = config.requests or max(8, 2 * clients)
            r = asyncio.run(run_level(url, model, clients, count, config.max_tokens, config.timeout_s))
            print(f"{clients} clients: {r.requests} requests in {r.duration_s:.1f} s, "
                  f"{r.output_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
            results.append(r)
        final = _get_json(url + "/dashboard/state")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return model, results, final


def serving_report(report: Report, model: str, results: list[LevelResult], final: dict[str, Any],
                   max_tokens: int) -> Report:
    rows = [[str(r.clients), str(r.requests), str(r.failed), f"{r.duration_s:,.2f} s", num(r.requests_per_s),
             num(r.output_tokens_per_s, 1), ms(r.ttft_p50_s), ms(r.ttft_p99_s), ms(r.itl_p50_s), ms(r.itl_p99_s)]
            for r in results]
    report.tables.append(Table(
        f"{model}: streaming chat clients over HTTP, {max_tokens} new tokens per request",
        ["clients", "requests", "failed", "wall time", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
         "ITL p99"], rows))
    report.notes += [
        "Each client sends its next request as soon as the previous one finished (closed loop), through the "
        "`openai` client over loopback HTTP with server-sent events; greedy, end-of-sequence ignored; one "
        "untimed warm-up request first. The clients share one Python process (the server runs in another).",
        "TTFT: from sending a request to its first streamed text. ITL: gaps between consecutive text chunks of "
        "one request as the client sees them, over all requests (chunks read in one burst give gaps near 0, so "
        "with many clients p50 can fall below the engine's step time). p50/p99 by linear interpolation.",
        f"After the run the pool held {final['blocks_used']} used blocks (0 = nothing leaked); prefix hit rate "
        f"{final['prefix_hit_rate']:.0%}; KV dtype {final['kv_dtype']}.",
    ]
    levels = [{"concurrency": r.clients, "tokens_per_s": r.output_tokens_per_s, "ttft_p50_s": r.ttft_p50_s,
               "ttft_p99_s": r.ttft_p99_s, "itl_p50_s": r.itl_p50_s, "itl_p99_s": r.itl_p99_s} for r in results]
    plots.throughput(report.plot_path("serving.png", "Output tok/s and latency percentiles against concurrent "
                                      "HTTP clients"), {"kvengine serve": levels},
                     f"{model}: kvengine serve, {max_tokens} new tokens per request", report.machine.describe())
    report.results = {"levels": [asdict(r) for r in results], "final_state": {
        k: final[k] for k in ("blocks_used", "blocks_total", "prefix_hit_rate", "kv_dtype", "tokens_generated")}}
    report.summary = {"model": model, "max_tokens": max_tokens, "blocks_used_after": final["blocks_used"],
                      "levels": [{**lv, "requests_per_s": r.requests_per_s, "failed": r.failed}
                                 for lv, r in zip(levels, results, strict=True)]}
    return report


def disk_comparison(report: Report, no_disk: list[LevelResult], disk: list[LevelResult], disk_dir: str) -> Report:
    """Decode speed with and without the KV disk tier (`bench serve --compare-disk`): the same levels against
    two servers, one writing every full block to `disk_dir` off the step path; the ratio should stay near 1."""
    rows, summary = [], []
    for a, b in zip(no_disk, disk, strict=True):
        ratio = b.output_tokens_per_s / a.output_tokens_per_s if a.output_tokens_per_s else None
        rows.append([str(a.clients), num(a.output_tokens_per_s, 1), num(b.output_tokens_per_s, 1),
                     f"{ratio:.3f}" if ratio is not None else "–", ms(a.itl_p50_s), ms(b.itl_p50_s)])
        summary.append({"concurrency": a.clients, "tokens_per_s_no_disk": a.output_tokens_per_s,
                        "tokens_per_s_disk": b.output_tokens_per_s, "ratio": ratio,
                        "itl_p50_s_no_disk": a.itl_p50_s, "itl_p50_s_disk": b.itl_p50_s})
    report.tables.append(Table(
        "Decode speed with and without the KV disk tier (same levels, two servers in turn)",
        ["clients", "out tok/s, no disk", "out tok/s, disk", "disk / no disk", "ITL p50, no disk", "ITL p50, disk"],
        rows))
    report.notes.append(f"The disk server wrote full blocks to {disk_dir} from its writer thread (cache/disk_tier.py); "
                        "the first server ran without a disk tier. Runs are noisy on a shared machine: compare the "
                        "ratio over several runs before reading a difference into it.")
    report.results["disk_comparison"] = {"levels": [asdict(r) for r in disk], "dir": disk_dir}
    report.summary["disk_comparison"] = summary
    return report

