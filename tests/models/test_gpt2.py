"""Our GPT-2 against transformers' GPT2LMHeadModel on tiny random configs (fp32), and through the engine.

Tolerance: max |logit difference| <= 1e-4, as for the Llama family (fp32 accumulation-order noise is ~1e-6).
Covers uncached prefill, cached decode through the paged pool, chunked prefill, mixed batches; then the engine:
greedy tokens with and without the cache, batched against one at a time, prefix-cache hits, verify mode and
quantized KV dtypes, with no KV block leaked.
"""

from __future__ import annotations

import pytest
import torch
from gpt2test import VOCAB, tiny_gpt2_pair
from kvtest import cached_step, make_runner

from kvengine.engine.sequence import Sequence
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

TOL = 1e-4
CONFIGS = {
    "gelu_new": {},
    "exact gelu, 3 layers, 8 heads, n_inner": {"activation_function": "gelu", "n_layer": 3, "n_head": 8,
                                               "n_inner": 96},
    "relu, eps 1e-3": {"activation_function": "relu", "layer_norm_epsilon": 1e-3},
}
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LENGTHS = [3, 17, 8, 30, 1, 12]


def reference_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0]  # [len, vocab]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(name):
    ours, hf = tiny_gpt2_pair(**CONFIGS[name])
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf, ids)
    runner, bm = make_runner(ours)
    nc = runner.build_no_cache([Sequence(0, ids.tolist(), SamplingParams())])
    nc.logits_indices = torch.arange(20)
    assert (runner.run(nc) - ref).abs().max() <= TOL
    seq = Sequence(1, ids.tolist(), SamplingParams())  # cached: a 7-token chunk, a 5-token chunk, 8 decode steps
    got = [cached_step(runner, bm, [seq], chunk=n) for n in [7, 5] + [1] * 8]
    assert (torch.cat(got) - ref).abs().max() <= TOL


def test_mixed_batch_matches_transformers():
    ours, hf = tiny_gpt2_pair()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (5, 17, 11)]
    runner, bm = make_runner(ours)
    seqs = [Sequence(i, p.tolist(), SamplingParams()) for i, p in enumerate(prompts)]
    got = cached_step(runner, bm, seqs)  # one step, three prompts of different lengths
    assert (got - torch.cat([reference_logits(hf, p) for p in prompts])).abs().max() <= TOL


def tiny_llm(**engine_args) -> LLM:
    model, _ = tiny_gpt2_pair()
    engine_args.setdefault("kv_cache_memory", 1 << 20)
    engine_args.setdefault("block_size", 4)
    return LLM.from_model(model, None, **engine_args)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference():
    llm = tiny_llm()
    return [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts(LENGTHS)]


def test_greedy_tokens_equal_transformers_generate(reference):
    _, hf = tiny_gpt2_pair()
    for p, ours in zip(prompts(LENGTHS), reference, strict=True):
        out = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long), pad_token_id=1)
        assert out[0, len(p):].tolist() == ours


def test_batched_equals_one_at_a_time_and_no_cache(reference):
    llm = tiny_llm()
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY, use_cache=False)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.block_tables.num_used_blocks == 0


def test_prefix_hit_changes_nothing():
    llm = tiny_llm()
    shared = prompts([20], seed=5)[0]
    first = llm.generate(prompt_token_ids=[shared + [1, 2]], sampling_params=GREEDY)[0]
    second = llm.generate(prompt_token_ids=[shared + [3]], sampling_params=GREEDY)[0]
    again = llm.generate(prompt_token_ids=[shared + [1, 2]], sampling_params=GREEDY)[0]
    assert again.metrics.cached_tokens == 20 and second.metrics.cached_tokens == 20
    assert again.token_ids == first.token_ids
    cold = tiny_llm(enable_prefix_caching=False).generate(prompt_token_ids=[shared + [3]], sampling_params=GREEDY)
    assert cold[0].token_ids == second.token_ids
    assert llm.engine.block_tables.num_used_blocks == 0


def test_verify_mode_reports_identical_logits():
    out = tiny_llm().generate(prompt_token_ids=prompts([10]), sampling_params=GREEDY, verify=True)[0]
    assert out.verify.tokens_checked == 10 and out.verify.first_divergence is None
    assert out.verify.max_abs_logit_diff < 1e-4 and out.verify.passed


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_quantized_kv_cache_tracks_fp32(kv_dtype, reference):
    llm = tiny_llm(kv_cache_dtype=kv_dtype)
    out = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY, verify=True)
    assert all(o.verify.tokens_checked == 10 for o in out)
    assert max(o.verify.max_abs_logit_diff for o in out) < 0.05
    assert llm.engine.block_tables.num_used_blocks == 0
