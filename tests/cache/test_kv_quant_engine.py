"""The engine with every quantized KV dtype, on a tiny random Llama (head_dim 64, like the default model):
a fixed byte budget admits more sequences by the byte ratio, prefix-cache hits give the same tokens as misses,
preemption completes with the same tokens, and verify mode reports a small, nonzero logit difference."""

from __future__ import annotations

import pytest
from kvtest import tiny_pair

from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

QUANTIZED = ["fp8", "int8", "int8-token", "int4"]
PER_TOKEN = ["bfloat16", "fp8", "int8-token"]  # each token's stored K/V depends on that token alone
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    ours, _ = tiny_pair(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                        intermediate_size=128)
    return ours


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * seed * j + 3 * j + seed + 1) % 96 for j in range(n)]


def llm_for(model, kv_dtype: str, **kw) -> LLM:
    return LLM.from_model(model, None, kv_cache_dtype=kv_dtype, block_size=8, **{"kv_cache_memory": 1 << 22, **kw})


def test_fixed_budget_admits_sequences_by_the_byte_ratio(model):
    """64-token sequences (63 prompt tokens, then the first new one) into one budget: after one step the engine
    runs as many at once as the blocks allow, and a dtype with fewer bytes per token runs proportionally more."""
    bf16_block = kv_cache_spec_for(model.config, "bfloat16", 8).bytes_per_block
    budget = int(6 * 8 * bf16_block)  # exactly six bf16 sequences of 8 blocks
    running = {}
    for name in ["float32", "bfloat16", *QUANTIZED]:
        llm = llm_for(model, name, kv_cache_memory=budget, max_num_seqs=256, max_num_batched_tokens=1 << 16,
                      enable_prefix_caching=False)
        for i in range(30):
            llm.engine.add_request(None, SamplingParams(max_tokens=2), prompt_token_ids=prompt(63, i))
        llm.engine.step()
        running[name] = llm.engine.stats().running
        per_block = kv_cache_spec_for(model.config, name, 8).bytes_per_block
        assert running[name] == min(30, int(budget // per_block) // 8)
    assert running["bfloat16"] == 6 and running["float32"] == 3
    # bytes per token vs bf16: fp8/int8-token 132/256, int8 148/256, int4 88/256 (head_dim 64, block 8:
    # per-block key scales cost 32 B/token here, twice what block 16 costs)
    assert running["fp8"] == running["int8-token"] == 11
    assert running["int8"] == 9 and running["int4"] == 14


@pytest.mark.parametrize("name", QUANTIZED)
def test_prefix_cache_hits_give_the_tokens_of_misses(model, name):
    shared = prompt(43, 1)
    llm = llm_for(model, name)
    first = llm.generate(prompt_token_ids=[shared], sampling_params=GREEDY)[0]
    again, other = llm.generate(prompt_token_ids=[shared, shared[:40] + [5, 9, 11]], sampling_params=GREEDY)
    assert first.metrics.cached_tokens == 0
    assert again.metrics.cached_tokens == 40 and other.metrics.cached_tokens == 40
    fresh = llm_for(model, name).generate(prompt_token_ids=[shared, shared[:40] + [5, 9, 11]],
                                          sampling_params=GREEDY)
    assert again.token_ids == first.token_ids == fresh[0].token_ids
    assert other.token_ids == fresh[1].token_ids
    assert llm.engine.block_tables.num_used_blocks == 0


def _preempted_run(model, name: str, prefix_caching: bool):
    prompts = [prompt(20 + 5 * i, i) for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref = llm_for(model, name).generate(prompt_token_ids=prompts, sampling_params=params)
    per_block = kv_cache_spec_for(model.config, name, 8).bytes_per_block
    small = llm_for(model, name, kv_cache_memory=int(16 * per_block), enable_prefix_caching=prefix_caching)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=params, verify=True)
    assert small.engine.stats().preemptions >= 2
    assert small.engine.block_tables.num_used_blocks == 0
    small.engine.block_tables.check_invariants()
    return ref, outs


@pytest.mark.parametrize("name", QUANTIZED)
def test_preemption_completes_with_the_same_tokens(model, name):
    """Default engine (prefix caching on): a preempted sequence gets its full blocks back from the prefix
    cache and recomputes only the rest, so its tokens are those of an uninterrupted run."""
    ref, outs = _preempted_run(model, name, prefix_caching=True)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


@pytest.mark.parametrize("name", PER_TOKEN)
def test_recompute_without_prefix_cache_is_exact_for_per_token_dtypes(model, name):
    ref, outs = _preempted_run(model, name, prefix_caching=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_recompute_without_prefix_cache_stays_close_for_block_scaled_keys(model, name):
    """int8/int4 keys share a range per block: a block refilled by a recompute prefill is quantized once over
    its tokens, where decode grew its range token by token, so recomputed logits move by about one
    quantization step (documented in docs/kv-dtypes.md). The run completes; logits stay within the dtype's
    usual verify difference."""
    _ref, outs = _preempted_run(model, name, prefix_caching=False)
    assert all(len(o.token_ids) == 40 for o in outs)
    assert max(o.verify.max_abs_logit_diff for o in outs) < {"int8": 0.02, "int4": 0.2}[name]


def test_verify_reports_a_small_nonzero_logit_difference(model):
    """Verify recomputes without any cache (full precision): the difference it reports is the KV dtype's error,
    ordered by precision."""
    prompts = [prompt(30, 3), prompt(45, 4)]
    diffs = {}
    for name in ["float32", "bfloat16", *QUANTIZED]:
        outs = llm_for(model, name).generate(prompt_token_ids=prompts, sampling_params=GREEDY, verify=True)
        assert all(o.verify.tokens_checked == 24 for o in outs)
        diffs[name] = max(o.verify.max_abs_logit_diff for o in outs)
    assert diffs["float32"] < 1e-5
    assert 0 < diffs["bfloat16"] < diffs["int8"] < diffs["fp8"] < diffs["int4"] < 0.2
    assert diffs["int8"] < 0.02
