"""Cached and uncached runs give the same tokens in the fast format (int4 weights on kvengine's kernel tier), on
each tier this CPU runs (the `kernel_tier` fixture), by construction: a model that runs the fused layer op runs
every step through it (decode, prefill of any length in chunks or whole, and the no-cache recomputation over a
scratch K/V dropped with the step), and the op computes each row on its own. So the no-cache run's logits equal
the cached run's bit for bit, and verify mode finds no difference at all. The no-cache baseline stays honest: each
step still sends the whole text through every layer (one op call per layer with every token as a row), and its
FLOPs are the same as layer by layer."""

from __future__ import annotations

import pytest
import torch
from kvtest import fused_op_rows, step_outputs, tiny_pair

from kvengine.accounting.flops import request_flops
from kvengine.layers import native
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("kernel_tier")

# every linear layer fits the int4 tiles (hidden 128 in 4 heads of 32, 2 kv heads); a larger vocabulary and more
# layers than the fused-op tests so greedy tokens vary
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7],
           [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 2, 8, 1], [200, 17, 99]]
NEW_TOKENS = 24


def _fast_engine(fused: bool = True, **kw) -> LLM:
    """A tiny random Llama in the fast format on the forced tier: int4 weights, the tier's activations."""
    tier = native.chosen()
    assert tier is not None
    model, _ = tiny_pair("llama", seed=3, **TINY)
    kw.setdefault("kv_cache_memory", 1 << 22)
    return LLM.from_model(model.to(tier.act_dtype), None, weights="int4", block_size=4, fused_layers=fused, **kw)


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("kv", ["auto", "float32", "float16"])
def test_cached_and_uncached_tokens_and_logits_identical(kv):
    """Prompts prefilled together and in chunks (a small token budget), a prefix-cache hit, then the same prompts
    without any cache, then verify mode: the same tokens, and logits equal bit for bit. With the default KV dtype
    (auto: bf16 on every tier, the fp32 tiers' narrow cache or the bf16 tier's own), and with an fp32 or fp16
    cache on the fp32 tiers (a no-cache step's scratch K/V take the pool's dtype, so its keys are rounded alike);
    the bf16 tier's op reads neither (that engine runs layer by layer)."""
    llm = _fast_engine(max_num_batched_tokens=8, max_num_seqs=3, kv_cache_dtype=kv)
    kept = llm.engine.pool.plain_dtype()
    assert kept == (torch.bfloat16 if kv == "auto" else getattr(torch, kv))
    if not native.chosen().reads_kv(kept):
        assert not llm.engine.model.fused_layers_enabled
        return
    assert llm.engine.model.fused_layers_enabled
    cached = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy())]
    uncached = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy(),
                                                  use_cache=False)]
    assert cached == uncached and all(len(t) == NEW_TOKENS for t in cached)
    assert len({t for toks in cached for t in toks}) > 4  # the tokens vary: the comparison can fail
    for out in llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy(), verify=True):
        assert out.metrics.cached_tokens > 0 or len(out.prompt_token_ids) < 4  # the second round hit the cache
        assert out.verify.tokens_checked == NEW_TOKENS and out.verify.first_divergence is None
        assert out.verify.max_abs_logit_diff == 0.0
    assert llm.engine.block_tables.num_used_blocks == 0


def test_long_prompt_prefill_runs_through_the_op(monkeypatch):
    """A prompt whose prefill reads many keys still runs through the op (one path for every step), its MLP in more
    than one block of rows (tier.h's kMlpRows, 256), and its tokens equal the no-cache run's."""
    llm = _fast_engine()
    prompt = [(7 * i + 3) % 256 for i in range(300)]
    calls = fused_op_rows(monkeypatch, llm.model_config.num_layers)
    cached = llm.generate(prompt_token_ids=[prompt], sampling_params=_greedy())[0].token_ids
    assert calls == [len(prompt)] + [1] * (NEW_TOKENS - 1)
    assert llm.generate(prompt_token_ids=[prompt], sampling_params=_greedy(), use_cache=False)[0].token_ids == cached


def test_no_cache_recomputes_every_token_and_counts_the_same_flops(monkeypatch):
    """Each no-cache step sends every sequence's whole text through every layer (the op's rows: all of them), and
    the run's FLOPs are those of the no-cache baseline, the same as the layer-by-layer engine counts."""
    prompts = PROMPTS[1:]
    llm = _fast_engine(max_num_seqs=2)
    calls = fused_op_rows(monkeypatch, llm.model_config.num_layers)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(), use_cache=False)
    assert calls == [sum(len(p) + k for p in prompts) for k in range(NEW_TOKENS)]  # both whole texts, step by step
    assert llm.engine.pool.nbytes and llm.engine.block_tables.num_used_blocks == 0
    monkeypatch.undo()
    plain = _fast_engine(fused=False, max_num_seqs=2).generate(prompt_token_ids=prompts, sampling_params=_greedy(),
                                                               use_cache=False)
    for out, ref, prompt in zip(outs, plain, prompts, strict=True):
        want = request_flops(llm.model_config, len(prompt), NEW_TOKENS)[1]
        assert out.metrics.flops == out.metrics.flops_no_cache == ref.metrics.flops == want
        assert out.metrics.kv_cache_bytes == ref.metrics.kv_cache_bytes


def test_no_cache_step_matches_cached_rows_bit_for_bit():
    """The no-cache pass (verify's reference) equals the cached run's logits at every position of the text, its
    rows computed in one step of many rows against the cached run's one-token steps."""
    llm = _fast_engine()
    with step_outputs(lambda batch: batch.uses_cache) as steps:
        out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=_greedy())[0]
    text = PROMPTS[0] + out.token_ids[:-1]
    ref = llm.engine.runner.full_logits_no_cache(text, len(PROMPTS[0]) - 1)  # [NEW_TOKENS, vocab]
    assert torch.equal(torch.cat(steps), ref)
