"""Engine behaviour on a tiny random Llama (real model code, real pool; no tokenizer: token ids in and out).

Greedy decoding, so outputs must be token-for-token identical across batching, prefix hits, preemption
and the no-cache baseline.
"""

from __future__ import annotations

import pytest
import torch
from kvtest import tiny_pair

from kvengine.errors import RequestError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tiny_llm(**engine_args) -> LLM:
    model, _ = tiny_pair("llama", num_hidden_layers=2)
    engine_args.setdefault("kv_cache_memory", 1 << 20)
    engine_args.setdefault("block_size", 4)
    return LLM.from_model(model, None, **engine_args)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [3, 17, 8, 30, 1, 12]


@pytest.fixture(scope="module")
def reference():
    """One-at-a-time greedy outputs: the reference every other mode must equal."""
    llm = tiny_llm()
    return [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts(LENGTHS)]


def test_batched_equals_one_at_a_time_in_input_order(reference):
    llm = tiny_llm()
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)
    assert llm.engine.block_tables.num_used_blocks == 0


def test_no_cache_baseline_gives_identical_tokens(reference):
    llm = tiny_llm()
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY, use_cache=False)
    assert [o.token_ids for o in outs] == reference
    assert all(o.metrics.kv_cache_bytes == 0 and not o.metrics.use_cache for o in outs)
    assert llm.engine.block_tables.num_used_blocks == 0  # the baseline never touches the pool


def test_prefix_hit_gives_identical_output():
    llm = tiny_llm()
    shared = prompts([20], seed=5)[0]
    first = llm.generate(prompt_token_ids=[shared + [1, 2]], sampling_params=GREEDY)[0]
    assert first.metrics.cached_tokens == 0 and first.metrics.miss_reason == "no_match"
    second = llm.generate(prompt_token_ids=[shared + [1, 2]], sampling_params=GREEDY)[0]
    assert second.metrics.cached_tokens == 20  # 5 full blocks of 4; the partial block is recomputed
    assert second.metrics.miss_reason == "partial_block"
    assert second.token_ids == first.token_ids
    cold = tiny_llm(enable_prefix_caching=False).generate(prompt_token_ids=[shared + [1, 2]], sampling_params=GREEDY)
    assert cold[0].token_ids == first.token_ids and cold[0].metrics.miss_reason == "disabled"


def test_cache_salt_separates_tenants():
    llm = tiny_llm()
    p = prompts([16], seed=6)[0]
    llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, cache_salt="tenant-a")
    other = llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, cache_salt="tenant-b")[0]
    assert other.metrics.cached_tokens == 0 and other.metrics.miss_reason == "cache_salt"
    same = llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, cache_salt="tenant-a")[0]
    assert same.metrics.cached_tokens == 12  # 16 tokens = 4 full blocks; the last is recomputed for logits


def test_preemption_completes_everything_identically(reference):
    # 12 blocks of 4 slots = 48 tokens for six requests that need 86 together: preemption must happen.
    llm = tiny_llm(kv_cache_memory=12 * 4 * 512, max_num_batched_tokens=64)
    assert llm.engine.block_tables.num_blocks == 12
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert llm.engine.block_tables.num_used_blocks == 0
    llm.engine.block_tables.check_invariants()


def test_chunked_prefill_under_small_token_budget(reference):
    llm = tiny_llm(max_num_batched_tokens=5)
    outs = llm.generate(prompt_token_ids=prompts(LENGTHS), sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_abort_mid_generation_frees_blocks():
    llm = tiny_llm()
    engine = llm.engine
    free_before = engine.block_tables.num_free_blocks
    rid = engine.add_request(None, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                             prompt_token_ids=prompts([25])[0])
    other = engine.add_request(None, GREEDY, prompt_token_ids=prompts([9])[0])
    for _ in range(4):
        engine.step()
    assert engine.block_tables.num_used_blocks > 0
    assert engine.abort(rid) and not engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert other not in engine.requests
    assert engine.block_tables.num_free_blocks == free_before and engine.block_tables.num_used_blocks == 0


def test_verify_mode_reports_identical_logits():
    llm = tiny_llm()
    out = llm.generate(prompt_token_ids=prompts([10]), sampling_params=GREEDY, verify=True)[0]
    assert out.verify.tokens_checked == 12 and out.verify.first_divergence is None
    assert out.verify.max_abs_logit_diff < 1e-4 and out.verify.passed


def test_verify_reports_where_and_by_how_much_a_run_diverged(monkeypatch):
    """A cached run made to pick token 7 at its third token (its logits nudged there: a bookkeeping test) is
    reported diverging at that token, with how far the no-cache run ranks its own pick above token 7, and the
    run summary says so."""
    import io

    from kvengine.cli.report import run_summary
    from kvengine.engine.runner import ModelRunner

    llm = tiny_llm()
    real_run = ModelRunner.run
    decode_steps = []

    def run(self, batch):
        out = real_run(self, batch)
        if batch.uses_cache and batch.is_decode:
            decode_steps.append(1)
            if len(decode_steps) == 2:  # the third token (the first comes from the prefill step)
                out = out.clone()
                out[0, 7] = out[0].max() + 5
        return out

    monkeypatch.setattr(ModelRunner, "run", run)
    prompt = prompts([10])[0]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, verify=True)[0]
    assert out.token_ids[2] == 7 and out.verify.first_divergence == 2 and not out.verify.passed
    ref = llm.engine.runner.full_logits_no_cache(prompt + out.token_ids[:2], len(prompt) + 1)[0]  # [vocab]
    assert int(ref.argmax()) != 7
    assert out.verify.divergence_margin == pytest.approx(float(ref.max() - ref[7]))
    buf = io.StringIO()
    run_summary(llm, out, buf)
    assert (f"first diverging token: token 2, where the no-cache run ranks its own pick "
            f"{out.verify.divergence_margin:.3g} above this run's") in buf.getvalue()


def test_stream_yields_every_token():
    llm = tiny_llm()
    chunks = list(llm.stream(prompt_token_ids=prompts([6])[0], sampling_params=GREEDY))
    assert [c.delta_token_ids[0] for c in chunks] == chunks[-1].token_ids
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def test_seeded_sampling_is_reproducible():
    llm = tiny_llm()
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=123, ignore_eos=True)
    a = llm.generate(prompt_token_ids=prompts([7]), sampling_params=p)[0].token_ids
    b = llm.generate(prompt_token_ids=prompts([7]), sampling_params=p)[0].token_ids
    assert a == b


@pytest.mark.parametrize("tokens, max_tokens, message", [
    (250, 10, "this model's context is 256 tokens, but 260 were requested (250 in the prompt, 10 in max_tokens)"),
    (256, 1, "the prompt has 256 tokens, but the context is 256 tokens (at most 255 leave room for one new token)"),
    (0, 1, "the prompt is empty"),
])
def test_bad_requests_are_refused_with_one_clear_line(tokens, max_tokens, message):
    llm = tiny_llm()
    with pytest.raises(RequestError) as e:
        llm.generate(prompt_token_ids=[[1] * tokens], sampling_params=SamplingParams(max_tokens=max_tokens))
    assert str(e.value) == message
    assert not llm.engine.has_unfinished() and llm.engine.block_tables.num_used_blocks == 0


def test_max_tokens_below_one_is_refused():
    with pytest.raises(RequestError, match="max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0)
