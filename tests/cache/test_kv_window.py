"""Bounded KV caches: windowed layers free the blocks that left their window (pool counts checked), a hybrid
model holds what the accounting says, and a sink+window bound (StreamingLLM) runs past the model's context
with a constant block count and scores exactly as StreamingLLM's cache-position rule says.
"""

from __future__ import annotations

import pytest
import torch
from kvtest import cached_step, make_runner, tiny_gemma_pair, tiny_pair

from kvengine.cache.retention import Retention, kv_groups, layer_retentions
from kvengine.engine.sequence import Sequence
from kvengine.errors import ConfigError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

TOL = 2e-4  # fp32 logits: a different summation order (gathered keys, chunk boundaries) only
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_retention_reads_sinks_and_window_and_drops_the_rest():
    r = Retention(window=8, sinks=2)
    assert r.key_positions(20, 21) == (range(2), range(13, 21))  # the query at 20: sinks 0-1, recent 13-20
    assert r.key_positions(5, 9) == (range(2), range(2, 9))  # no gap yet: every key
    assert r.key_positions(14, 20) == (range(2), range(7, 20))  # a chunk: the union of its queries' windows
    assert (r.cache_position(20), r.cache_position(6)) == (9, 6)  # S + W - 1 once the window slid past the sinks
    assert r.droppable_blocks(20, 4) == range(1, 3)  # block 0 holds the sinks; blocks 1-2 end before 13
    assert list(Retention(8).droppable_blocks(20, 4)) == [0, 1, 2]
    assert Retention(8, 2).tokens_held(100) == 10 and Retention().tokens_held(100) == 100
    with pytest.raises(ConfigError, match="sink_tokens needs kv_window"):
        Retention(None, 4)


def test_layers_group_by_retention_in_equal_groups():
    gemma_270m = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))  # 15 local, 3 global
    groups = kv_groups(layer_retentions(gemma_270m, 18))
    assert [len(g.layers) for g in groups] == [3] * 6
    assert [g.retention.window for g in groups] == [512] * 5 + [None]
    assert sorted(i for g in groups for i in g.layers) == list(range(18))
    # a 256-token bound with sinks is tighter than every layer's own window: one group again
    (group,) = kv_groups(layer_retentions(gemma_270m, 18, kv_window=256, sink_tokens=4))
    assert group.retention == Retention(256, 4) and len(group.layers) == 18
    # a bound wider than the local window leaves local layers alone
    assert {g.retention for g in kv_groups(layer_retentions(gemma_270m, 18, 1024, 4))} == {Retention(512),
                                                                                           Retention(1024, 4)}


def _run_tracking_blocks(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """Step one request to the end; (its tokens, the most blocks it held after any step)."""
    engine = llm.engine
    rid = engine.add_request(None, params, prompt_token_ids=prompt)
    most, tokens = 0, []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.delta_token_ids
        most = max([most] + [r.blocks for r in engine.stats().requests if r.request_id == rid])
    assert engine.block_tables.num_used_blocks == 0
    engine.block_tables.check_invariants()
    return tokens, most


def test_sliding_window_layers_free_blocks_and_keep_tokens():
    model, _ = tiny_pair("mistral", sliding_window=8)
    llm = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20)
    prompt = list(range(3, 9))
    tokens, most = _run_tracking_blocks(llm, prompt, GREEDY)
    reference = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_cache=False)[0].token_ids
    assert tokens == reference and len(tokens) == 40
    # window 8, blocks of 4: a decode step reads 8 keys spanning at most 3 blocks; the full text needs 12
    assert most == 3 < -(-(len(prompt) + 40) // 4)


def test_hybrid_model_holds_what_the_accounting_says():
    model, _ = tiny_gemma_pair()  # 4 layers: window 4 and global, alternating
    llm = LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20)
    spec = llm.kv_cache_spec
    assert len(spec.groups) == 2 and spec.layers_per_group == 2
    prompt = list(range(5, 19))
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    reference = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_cache=False)[0]
    assert out.token_ids == reference.token_ids
    context = len(prompt) + 40 - 1  # the last token is sampled, never computed
    held = out.metrics.blocks_held * spec.bytes_per_block
    accounted = spec.bytes_for_sequence(context)  # global layers every token, windowed ones 4
    assert accounted == 2 * (context + 4) * spec.bytes_per_token_per_layer
    assert out.metrics.kv_cache_bytes == accounted
    # blocks round up: at most one partial block in the global group and the window's straddle in the local one
    assert accounted <= held <= accounted + 3 * spec.bytes_per_block
    full = -(-context // 4) * 2 * spec.bytes_per_block  # what one table for every layer would hold
    assert held < 0.6 * full


def _streaming_reference(model, ids: list[int], p: int, r: Retention) -> torch.Tensor:
    """StreamingLLM by definition: the keys a query at p sees, recomputed at cache positions 0, 1, ... .
    Exact for a one-layer model, whose keys depend on their token and position only."""
    sinks, recent = r.key_positions(p, p + 1)
    kept = [ids[i] for i in (*sinks, *recent)]
    runner, _ = make_runner(model)
    batch = runner.build_no_cache([Sequence(0, kept, SamplingParams())])
    return runner.run(batch)[-1]  # [vocab]


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_sink_window_scores_equal_streamingllm_past_the_context(kind, sinks):
    if kind == "llama":
        model, _ = tiny_pair(num_hidden_layers=1, max_position_embeddings=32)
    else:
        model, _ = tiny_gemma_pair(num_hidden_layers=1, layer_types=["full_attention"], max_position_embeddings=32)
    r = Retention(window=8, sinks=sinks)
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (48,)).tolist()  # 48 positions: past the 32-position RoPE table
    runner, blocks = make_runner(model, num_blocks=8, kv_window=8, sink_tokens=sinks)
    seq = Sequence(0, ids, SamplingParams())
    chunks = [13, 5] + [1] * 30  # a chunk that straddles the window's separation from the sinks, then decode
    rows = torch.cat([cached_step(runner, blocks, [seq], chunk=n) for n in chunks])  # [48, vocab]
    assert blocks.num_held(0) <= 1 + 3  # the sink block and the window's 3
    for p in (5, 12, 14, 17, 18, 30, 47):
        assert (rows[p] - _streaming_reference(model, ids, p, r)).abs().max() <= TOL, p


def test_sink_run_past_the_context_keeps_a_constant_block_count():
    model, _ = tiny_pair(max_position_embeddings=32)
    llm = LLM.from_model(model, None, block_size=4, kv_window=8, sink_tokens=2, kv_cache_memory=1 << 20)
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    tokens, most = _run_tracking_blocks(llm, list(range(3, 8)), params)
    assert len(tokens) == 120  # 125 positions through a model with 32
    assert most == 4  # the sink block plus the window's at most 3, from step 3 to step 120
    with pytest.raises(Exception, match="context is 32 tokens"):
        LLM.from_model(model, None, block_size=4).generate(prompt_token_ids=[[3, 4, 5]], sampling_params=params)


def test_windowed_batch_with_chunked_prefill_and_preemption_matches_one_at_a_time():
    model, _ = tiny_pair("mistral", sliding_window=6)
    prompts = [list(range(3, 3 + n)) for n in (4, 19, 9, 13)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [LLM.from_model(model, None, block_size=4).generate(prompt_token_ids=[p], sampling_params=params)[0]
             .token_ids for p in prompts]
    # 10 blocks for 4 sequences that each need up to 4 during decode, and 7-token prefill chunks
    small = LLM.from_model(model, None, block_size=4, kv_cache_memory=10 * 4 * 2 * 2 * 2 * 16 * 4 // 1,
                           max_num_batched_tokens=7)
    assert small.engine.block_tables.num_blocks == 10
    outs = small.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in outs] == alone
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_tables.num_used_blocks == 0
    small.engine.block_tables.check_invariants()


def test_bad_window_settings_are_one_line_errors():
    model, _ = tiny_pair()
    with pytest.raises(ConfigError, match="sink_tokens needs kv_window"):
        LLM.from_model(model, None, sink_tokens=4)
    with pytest.raises(ConfigError, match="kv_window must be at least 1 token, got 0"):
        LLM.from_model(model, None, kv_window=0)
    with pytest.raises(ConfigError, match="sink_tokens must be >= 0, got -1"):
        LLM.from_model(model, None, kv_window=8, sink_tokens=-1)


def test_bounded_run_counts_the_flops_its_attention_reads():
    """A sink+window query reads min(p + 1, S + W) keys: the live FLOP count is a window of S + W's."""
    from dataclasses import replace

    from kvengine.accounting.flops import step_flops

    model, _ = tiny_pair(max_position_embeddings=64)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    llm = LLM.from_model(model, None, block_size=4, kv_window=8, sink_tokens=2)
    out = llm.generate(prompt_token_ids=[list(range(3, 8))], sampling_params=params)[0]
    window_10 = replace(model.config, layer_windows=(10,) * model.config.num_layers)
    expected = step_flops(window_10, 5, 5, lm_head_tokens=1).total + sum(
        step_flops(window_10, 1, c, lm_head_tokens=1).total for c in range(6, 5 + 30))
    assert out.metrics.flops == expected
    full = LLM.from_model(model, None, block_size=4).generate(prompt_token_ids=[list(range(3, 8))],
                                                              sampling_params=params)[0]
    assert out.metrics.flops < full.metrics.flops and out.metrics.flops_no_cache == full.metrics.flops_no_cache
