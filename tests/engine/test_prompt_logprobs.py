"""Prompt log-probabilities (SamplingParams.prompt_logprobs) through LLM.generate: each prompt token's
log-probability and top-k equal the log-softmax of one full no-cache forward pass over the same tokens,
whether the prefill ran in one chunk or several, with or without the KV cache, and even when the prompt's
prefix sits in the prefix cache (such a request skips reuse; the next plain request reuses again)."""

from __future__ import annotations

import pytest
import torch
from kvtest import make_tiny_hf_folder

from kvengine.errors import RequestError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

TOLERANCE = 1e-4  # fp32: the cached chunks and the one-pass reference differ only by accumulation order
PROMPT = list(range(5, 45))  # 40 tokens: three chunks of 16 with max_num_batched_tokens=16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = make_tiny_hf_folder(tmp_path_factory.mktemp("plp") / "tiny", max_position_embeddings=512)
    return LLM(str(folder), weights="fp32", kv_cache_memory=4 << 20, max_num_batched_tokens=16)


def _reference(llm, ids):
    """log_softmax of one no-cache pass: row i predicts token i + 1. [len(ids) - 1, vocab]"""
    logits = llm.engine.runner.full_logits_no_cache(ids[:-1], 0)
    return torch.log_softmax(logits.float(), dim=-1)


def _check(out, llm, ids, k):
    ref = _reference(llm, ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == ids[i + 1]
        assert entry.logprob == pytest.approx(float(ref[i, ids[i + 1]]), abs=TOLERANCE)
        values, top_ids = torch.topk(ref[i], k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=TOLERANCE)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_logprobs_equal_a_full_forward(llm, use_cache):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=3)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_cache=use_cache)[0]
    _check(out, llm, PROMPT, 3)
    plain = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True), use_cache=use_cache)[0]
    assert out.token_ids == plain.token_ids  # asking for them changes nothing generated
    assert out.logprobs is None and plain.prompt_logprobs is None


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_and_reused_after(llm):
    ids = list(range(50, 90))
    plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[ids], sampling_params=plain)  # its full blocks are now cached
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=1))[0]
    assert out.metrics.cached_tokens == 0 and out.metrics.miss_reason == "prompt_logprobs"
    _check(out, llm, ids, 0)
    assert len(out.logprobs) == 2  # the generated tokens' own logprobs come too
    rows = len(ids) - 1
    vocab, hidden = llm.engine.model_config.vocab_size, llm.engine.model_config.hidden_size
    assert out.metrics.prompt_logprobs_flops == 2 * rows * hidden * vocab  # one LM-head matmul over the rows
    again = llm.generate(prompt_token_ids=[ids], sampling_params=plain)[0]
    assert again.metrics.cached_tokens == 32  # its blocks were registered for others


def test_batched_with_other_requests(llm):
    """A prompt_logprobs request next to plain ones in the same steps: each gets its own rows."""
    prompts = [PROMPT, list(range(60, 75)), list(range(7, 30))]
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=k) for k in (2, None, 1)]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    _check(outs[0], llm, prompts[0], 2)
    assert outs[1].prompt_logprobs is None
    _check(outs[2], llm, prompts[2], 1)


def test_out_of_range_is_a_request_error():
    with pytest.raises(RequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
