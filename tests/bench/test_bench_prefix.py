"""`kvengine bench prefix` on a tiny random model: batched / one-at-a-time / transformers batched token counts,
a warm request that really got its prefix from the cache, and the memory-waste arithmetic."""

from __future__ import annotations

import pytest

from kvengine.bench.prefix import held_tokens
from kvengine.engine.stats import EngineStats, RequestBlocks


def test_bench_prefix_files_and_fields(bench_folder, run_bench, check_common):
    _, last, data, out = run_bench("prefix", "-m", str(bench_folder), "-r", "4", "-n", "5", "--sequential", "2",
                                   "--cached-prefix-tokens", "64", "--repeats", "1")
    check_common(data, last, out, "prefix")
    assert {"prefix_throughput.png", "prefix_ttft.png", "prefix_waste.png"} <= set(data["files"])
    res = data["results"]
    assert res["batched"]["output_tokens"] == 4 * 5 and res["batched"]["concurrency"] == 4
    assert [r["output_tokens"] for r in res["sequential"]] == [5, 5]
    assert res["transformers_batched"]["tokens"] == 4 * 5
    # the warm request reused at least the 64-token system message, in whole 16-token blocks
    assert res["cached_tokens"] >= 64 and res["cached_tokens"] % 16 == 0
    assert len(res["ttft_cold_s"]) == len(res["ttft_warm_s"]) == 1
    assert last["ttft_speedup"] == pytest.approx(res["ttft_cold_s"][0] / res["ttft_warm_s"][0])
    steady = [w for w in res["waste"] if w["steady"]]
    assert steady, "the batched run had steps with every request decoding"
    for w in res["waste"]:
        assert 0 <= w["waste"] < 1 and w["allocated_bytes"] >= w["held_bytes"] > 0
    assert last["steady_waste_mean"] == pytest.approx(sum(w["waste"] for w in steady) / len(steady))


def _stats(requests: list[RequestBlocks], blocks_used: int, blocks_shared: int) -> EngineStats:
    return EngineStats(running=len(requests), waiting=0, blocks_total=64, blocks_used=blocks_used,
                       blocks_cached_free=0, blocks_free=64 - blocks_used, blocks_shared=blocks_shared,
                       block_size=16, kv_dtype="float32", bytes_per_token=512.0, bytes_per_block=8192.0,
                       pool_bytes=64 * 8192, prefix_hit_tokens=0, prefix_query_tokens=0, prefix_evictions=0,
                       tokens_generated=0, preemptions=0, steps=1, requests=requests)


def test_held_tokens_counts_shared_blocks_once():
    # two requests share their first two blocks (32 tokens); each then holds its own 10 and 20 tokens
    a = RequestBlocks("a", "running", blocks=3, shared_blocks=2, tokens=43, computed_tokens=42, cached_tokens=32)
    b = RequestBlocks("b", "running", blocks=4, shared_blocks=2, tokens=53, computed_tokens=52, cached_tokens=32)
    st = _stats([a, b], blocks_used=5, blocks_shared=2)
    assert held_tokens(st) == 32 + 10 + 20
    alone = _stats([RequestBlocks("c", "running", 2, 0, 20, 19, 0)], blocks_used=2, blocks_shared=0)
    assert held_tokens(alone) == 19
