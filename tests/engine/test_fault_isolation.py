"""A step failure that belongs to one sequence finishes that sequence with an error; the others in the step
finish with their normal output. The faults are injected (a wrapped model forward that raises, or NaN logits
for one row: mocks of the fault, the engine and model are real)."""

from __future__ import annotations

import pytest
import torch
from kvtest import poisoned_run, tiny_pair

from kvengine.llm import LLM
from kvengine.sampling import Sample, Sampler, SampleRow, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
POISON = [95, 94, 93]  # the poisoned prompt starts with these ids; no other prompt does
PROMPTS = [[1, 5, 9, 2], [7, 3], [4, 4, 8, 15, 16, 23, 42]]


def _llm() -> LLM:
    model, _ = tiny_pair("llama")
    return LLM.from_model(model, None, block_size=4, kv_cache_memory=1 << 20)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("fault", ["forward", "nan_logits"])
def test_one_failing_sequence_fails_alone(fault, use_cache):
    llm = _llm()
    want = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_cache=use_cache)[0].token_ids
            for p in PROMPTS]
    runner = llm.engine.runner
    real_run = runner.run
    runner.run = poisoned_run(real_run, POISON, fault)
    outs = llm.generate(prompt_token_ids=[PROMPTS[0], POISON + [1, 2], PROMPTS[1], PROMPTS[2]],
                        sampling_params=GREEDY, use_cache=use_cache)
    runner.run = real_run
    assert [o.token_ids for o in (outs[0], outs[2], outs[3])] == want
    assert all(o.finish_reason == "length" and o.error is None for o in (outs[0], outs[2], outs[3]))
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert ("injected fault" if fault == "forward" else "non-finite logits") in bad.error
    assert llm.engine.block_tables.num_used_blocks == 0 and not llm.engine.has_unfinished()


def test_sampler_isolates_a_failing_row():
    logits = torch.randn(3, 16)  # [3, vocab]
    logits[1, 4] = float("inf")
    rows = [SampleRow(SamplingParams(temperature=t), torch.Generator().manual_seed(0), [1], [])
            for t in (0.0, 0.7, 0.7)]
    out = Sampler()(logits, rows)
    assert isinstance(out[0], Sample) and out[0].token_id == int(logits[0].argmax())
    assert isinstance(out[1], FloatingPointError)
    assert isinstance(out[2], Sample) and 0 <= out[2].token_id < 16
