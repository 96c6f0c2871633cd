"""`kvengine bench throughput` on a tiny random model: every level and mode ran every token, prefix sharing
shows up as prefix-cache hits only when it is on, and the percentiles are what the token times say."""

from __future__ import annotations

import pytest

from kvengine.bench.report import percentile
from kvengine.bench.throughput import ConcurrentRun


def test_bench_throughput_levels_modes_and_files(bench_folder, run_bench, check_common):
    _, last, data, out = run_bench("throughput", "-m", str(bench_folder), "-n", "4", "-c", "1,3",
                                   "--prefix-tokens", "40", "--warmup", "1")
    check_common(data, last, out, "throughput")
    assert "throughput.png" in data["files"]
    runs = data["results"]["runs"]
    assert [(r["label"], r["concurrency"]) for r in runs] == [
        ("prefix sharing on", 1), ("prefix sharing on", 3), ("prefix sharing off", 1), ("prefix sharing off", 3)]
    for r in runs:
        assert r["output_tokens"] == 4 * r["concurrency"]
        assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert len(set(r["prompt_tokens"])) >= 1 and min(r["prompt_tokens"]) > 40
        # the shared system message (40 tokens) was cached by the untimed first conversation: at least
        # two full 16-token blocks of every prompt come from the cache when sharing is on
        if r["label"] == "prefix sharing on":
            assert r["prefix_hit_rate"] >= 32 / max(r["prompt_tokens"])
        else:
            assert r["prefix_hit_rate"] == 0
    assert set(last["tokens_per_s"]) == {"prefix sharing on@1", "prefix sharing on@3", "prefix sharing off@1",
                                         "prefix sharing off@3"}


def test_bench_throughput_rejects_bad_levels(bench_folder, run_bench):
    from kvengine.errors import ConfigError

    with pytest.raises(ConfigError, match="--concurrency takes positive integers"):
        run_bench("throughput", "-m", str(bench_folder), "-c", "0,4")
    with pytest.raises(ConfigError, match="--sharing must be both, on or off"):
        run_bench("throughput", "-m", str(bench_folder), "--sharing", "maybe")


def test_concurrent_run_percentiles_from_token_times():
    run = ConcurrentRun("x", 2, 1.0, [[0.1, 0.2, 0.4], [0.3, 0.35, 0.45]], [5, 5])
    assert run.output_tokens == 6 and run.tokens_per_s == 6.0
    assert run.ttfts == [0.1, 0.3]
    assert run.itls == pytest.approx([0.1, 0.2, 0.05, 0.1])
    d = run.to_dict()
    assert d["ttft_p50_s"] == pytest.approx(0.2) and d["itl_p50_s"] == pytest.approx(0.1)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([], 50) is None


def test_fresh_engine_keeps_the_kv_dtype_and_room_for_every_sequence():
    """The concurrency benches build a new engine on the same (already quantized) model: it keeps the first
    engine's KV dtype, the fast path's bf16 "auto" included (the new config, without a weights format, would
    resolve "auto" to fp32 and fit half the sequences in the budget sized for bf16), and holds max_num_seqs whole
    sequences at once."""
    from kvtest import tiny_pair

    from kvengine.bench.throughput import fresh_engine
    from kvengine.layers import native
    from kvengine.llm import LLM

    tier = native.chosen()
    model, _ = tiny_pair("llama", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2)
    llm = LLM.from_model(model.to(tier.act_dtype), None, weights="int4", block_size=4, kv_cache_memory=1 << 20)
    assert llm.kv_cache_spec.dtype == "bfloat16" and llm.engine.model.fused_layers_enabled
    fresh = fresh_engine(llm, 4, 30)
    assert fresh.kv_cache_spec.dtype == "bfloat16"
    assert fresh.engine.block_tables.num_free_blocks >= 4 * 8  # four sequences of 30 tokens in blocks of 4
