"""`kvengine bench cache` on a tiny random model: files, JSON fields, FLOPs that match the accounting module,
identical greedy tokens with and without the cache, and the no-cache cap. No speed is asserted."""

from __future__ import annotations

import pytest

from kvengine.accounting.flops import completion_flops
from kvengine.bench.cache import TimedRun
from kvengine.weights.source import open_model_source


def test_bench_cache_writes_report_json_and_plots(bench_folder, run_bench, check_common):
    result, last, data, out = run_bench("cache", "-m", str(bench_folder), "-n", "12", "--warmup", "1",
                                        "--sample-interval", "0.02")
    check_common(data, last, out, "cache")
    assert {"token_latency.png", "cumulative_time.png", "resources.png"} <= set(data["files"])
    assert last["new_tokens"] == last["no_cache_tokens"] == 12 and last["same_tokens"] is True
    cached, uncached = data["results"]["cached"], data["results"]["no_cache"]
    assert cached["token_ids"] == uncached["token_ids"] and len(cached["times_s"]) == 12
    assert cached["times_s"] == sorted(cached["times_s"]) and cached["times_s"][0] > 0
    # the analytic FLOPs come from kvengine.accounting, and the engine counted the same step by step
    config = open_model_source(str(bench_folder)).model_config()
    flops = completion_flops(config, last["prompt_tokens"], 12, lm_head="last")
    assert last["flop_ratio"] == pytest.approx(flops.ratio)
    assert data["results"]["flops"]["with_cache"] == flops.with_cache == cached["engine_flops"]
    assert data["results"]["flops"]["without_cache"] == flops.without_cache == uncached["engine_flops"]
    assert last["speedup"] == pytest.approx(uncached["total_s"] / cached["total_s"])
    for run in (cached, uncached):
        assert run["resources"]["samples"] >= 1 and run["resources"]["peak_rss_bytes"] > 0
    report = (out / "report.md").read_text()
    assert f"{last['speedup']:,.2f}x in wall time beside {last['flop_ratio']:,.2f}x in matmul FLOPs" in report
    assert "with KV cache" in result.stdout and "without cache" in result.stdout


def test_bench_cache_caps_the_no_cache_run(bench_folder, run_bench):
    _, last, data, out = run_bench("cache", "-m", str(bench_folder), "-n", "10", "--no-cache-max-tokens", "4",
                                   "--warmup", "0")
    assert last["new_tokens"] == 10 and last["no_cache_tokens"] == 4 and data["results"]["capped"] is True
    assert len(data["results"]["no_cache"]["times_s"]) == 4
    assert data["results"]["flops_no_cache_run"]["new_tokens"] == 4
    assert "capped at 4 tokens" in (out / "report.md").read_text()
    # the speedup compares the first 4 tokens of both runs
    cached = data["results"]["cached"]["times_s"]
    assert last["speedup"] == pytest.approx(data["results"]["no_cache"]["total_s"] / cached[3])


def test_timed_run_latency_growth_flat_and_growing():
    flat = TimedRun("flat", True, 5, list(range(40)), [0.5 + 0.1 * i for i in range(40)])
    assert flat.per_token_s[0] == pytest.approx(0.5) and flat.latency_growth() == pytest.approx(1.0)
    assert flat.positions[:2] == [5, 6] and flat.decode_tokens_per_s == pytest.approx(10.0)
    times, t = [], 0.0
    for i in range(40):  # each step takes longer the longer the text (no cache)
        t += 0.01 * (i + 1)
        times.append(t)
    grows = TimedRun("grows", False, 5, list(range(40)), times)
    # tokens 1..39 take 0.02 .. 0.40 s: median of the last 3 (0.39) / of the first 3 (0.03)
    assert grows.latency_growth() == pytest.approx(0.39 / 0.03)
    assert TimedRun("short", True, 5, [1], [0.1]).latency_growth() is None
