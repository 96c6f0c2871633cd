"""The sampler's logits processing against hand-written reference formulas (OpenAI's presence / frequency
penalties, vLLM's repetition penalty and min_p, logit_bias, min_tokens), its logprobs against log_softmax,
and a property test: any SamplingParams the constructor accepts samples a token in the vocabulary."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.errors import RequestError
from kvengine.sampling import (
    Sample,
    Sampler,
    SampleRow,
    SamplingParams,
    finite_rows,
    processed_logits,
    row_argmax,
    sampling_probs,
)

VOCAB = 12


def _row(**kw) -> SampleRow:
    return SampleRow(SamplingParams(**kw), torch.Generator().manual_seed(0), prompt_ids=[2, 7], output_ids=[3, 3, 5],
                     end_ids=[0])


def test_penalties_and_bias_follow_the_reference_formulas():
    logits = torch.linspace(-3, 3, VOCAB)  # [vocab]
    got = processed_logits(logits, _row(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                                        logit_bias={9: 1.5}))
    want = logits.clone()
    for t in {2, 7, 3, 5}:  # repetition: prompt and output tokens
        want[t] = want[t] / 2.0 if want[t] > 0 else want[t] * 2.0
    counts = {3: 2, 5: 1}  # presence / frequency: output tokens only
    for t, c in counts.items():
        want[t] -= 0.25 * c + 0.5
    want[9] += 1.5
    torch.testing.assert_close(got, want)


def test_min_tokens_masks_end_and_stop_tokens_until_reached():
    logits = torch.zeros(VOCAB)
    masked = processed_logits(logits, _row(min_tokens=4, max_tokens=8, stop_token_ids=[6]))
    assert masked[0] == -math.inf and masked[6] == -math.inf and torch.isfinite(masked[1:6]).all()
    assert torch.isfinite(processed_logits(logits, _row(min_tokens=3, max_tokens=8))).all()  # 3 already out


def test_min_p_and_top_p_truncate_the_distribution():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = sampling_probs(x, SamplingParams(temperature=1.0, min_p=0.5))
    assert (probs > 0).tolist() == [True, True, False, False]  # 0.15 < 0.5 * 0.5
    probs = sampling_probs(x, SamplingParams(temperature=1.0, top_p=0.7))
    assert (probs > 0).tolist() == [True, True, False, False]


def test_logprobs_equal_log_softmax_greedy_and_sampled():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))  # [2, vocab]
    rows = [SampleRow(SamplingParams(temperature=0, logprobs=3), None, [1], []),
            SampleRow(SamplingParams(temperature=0.5, logprobs=2), torch.Generator().manual_seed(0), [1], [])]
    greedy, sampled = Sampler()(logits, rows)
    ref = torch.log_softmax(logits[0], -1)
    assert greedy.token_id == int(logits[0].argmax())
    assert greedy.logprob.logprob == pytest.approx(float(ref.max()), abs=1e-6)
    assert [v for _, v in greedy.logprob.top] == pytest.approx(torch.topk(ref, 3).values.tolist(), abs=1e-6)
    ref = torch.log_softmax(logits[1] / 0.5, -1)
    assert sampled.logprob.logprob == pytest.approx(float(ref[sampled.token_id]), abs=1e-5)


@pytest.mark.parametrize("vocab", [12, 32, 96, 49152, 1000])
def test_row_argmax_is_argmax_first_index_on_ties(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (9, vocab), generator=g).float()  # [9, vocab]: many ties for the max
    logits[0] = -2.0  # a row that is all one value
    logits[1, -1] = 50.0  # the max in the last column
    assert row_argmax(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert row_argmax(logits[:0]).shape == (0,)


def test_finite_rows_flags_exactly_the_rows_with_a_non_finite_value():
    logits = torch.zeros(6, 64)  # [6, vocab]
    logits[1, 3], logits[2, 5], logits[3, 7] = math.nan, math.inf, -math.inf
    logits[4, :2] = 3e38  # finite values whose sum overflows
    logits[5, 0], logits[5, 1] = math.inf, -math.inf  # (their sum is NaN)
    assert finite_rows(logits) == torch.isfinite(logits).all(dim=-1).tolist() == [True, False, False, False, True,
                                                                                  False]


def _sampler_property():
    """Built by a factory: hypothesis must not see parameters with defaults on the test function."""
    values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5))

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(temperature=values, top_p=values, min_p=values, presence=values, frequency=values, repetition=values,
           bias=st.dictionaries(st.integers(0, VOCAB - 1), values, max_size=3), top_k=st.integers(-3, 20),
           seed=st.integers(0, 2**32))
    def check(temperature, top_p, min_p, presence, frequency, repetition, bias, top_k, seed):
        try:
            params = SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, presence_penalty=presence,
                                    frequency_penalty=frequency, repetition_penalty=repetition, logit_bias=bias,
                                    top_k=top_k, seed=seed, logprobs=2)
        except RequestError as e:
            assert e.param is not None
            return
        logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed))
        row = SampleRow(params, torch.Generator().manual_seed(seed), [1, 2], [3])
        (out,) = Sampler()(logits, [row])
        assert isinstance(out, Sample), out  # accepted parameters never fail a row
        assert 0 <= out.token_id < VOCAB and math.isfinite(out.logprob.logprob)
    return check


test_accepted_parameters_always_sample_a_token = _sampler_property()
