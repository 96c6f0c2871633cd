"""Analytic FLOP counts: seeds 000 and 004 reproduced, causal/window key counts, live request figures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvengine.accounting.flops import (
    FLOP_CONVENTION,
    _keys_seen,
    completion_flops,
    completion_steps,
    request_flops,
    step_flops,
    sum_steps,
)
from kvengine.accounting.presets import get_preset
from kvengine.errors import ConfigError

SEED000 = get_preset("seed000")
GPT3_MEDIUM = get_preset("gpt3-medium")

# Seed 004's table: sequence length -> (without cache, with cache, reduction %).
SEED004_TABLE = {
    10: (1.11e10, 7.07e9, 36.29),
    100: (5.64e11, 7.07e10, 87.46),
    500: (1.29e13, 3.53e11, 97.26),
    1000: (5.09e13, 7.07e11, 98.61),
    2000: (2.03e14, 1.41e12, 99.30),
    4000: (8.08e14, 2.83e12, 99.65),
    8000: (3.23e15, 5.66e12, 99.82),
}


def test_seed000_sixth_token_from_five_token_prompt():
    step = step_flops(SEED000, 5, 5)
    assert step.total == pytest.approx(4.8e9, rel=0.01)  # "around five billion"
    # The seed's first matmul: Q projection of 5 positions in one layer, 5 × 1280 × 2 × 1280.
    assert step.q_proj // SEED000.num_layers == 16_384_000
    assert step_flops(SEED000, 6, 6).total == pytest.approx(5.7e9, rel=0.01)  # the 7th token


def test_seed000_twenty_token_completion_with_and_without_cache():
    run = completion_flops(SEED000, 5, 20)
    assert run.without_cache == pytest.approx(277e9, rel=0.01)
    assert run.with_cache == pytest.approx(23e9, rel=0.01)
    assert len(run.steps_without) == len(run.steps_with) == 20
    assert run.steps_without[0] == run.steps_with[0]  # the first step is the prefill either way
    assert run.ratio == pytest.approx(run.without_cache / run.with_cache)


def test_seed000_attention_at_six_tokens_and_at_twenty_thousand():
    six = step_flops(SEED000, 1, 6)
    assert (six.qk + six.av) // SEED000.num_layers == 30_720  # "around 30,000 FLOPs for the 10 heads"
    assert six.qk + six.av == 614_400  # "600,000 FLOPs" for 20 blocks
    assert six.total == pytest.approx(0.95e9, rel=0.01)  # "nearly billion"
    assert step_flops(SEED000, 1, 20_000).total == pytest.approx(3e9, rel=0.01)


@pytest.mark.parametrize("s", sorted(SEED004_TABLE))
def test_seed004_gpt3_medium_table_under_kv_only(s):
    without, with_, reduction = SEED004_TABLE[s]
    run = completion_flops(GPT3_MEDIUM, 1, s, convention="kv-only")
    assert run.without_cache == pytest.approx(without, rel=0.01)
    assert run.with_cache == pytest.approx(with_, rel=0.01)
    assert 100 * run.reduction == pytest.approx(reduction, rel=0.01)
    d, layers, vocab = 1024, 24, 50257  # the closed form itself, b = 1
    assert run.without_cache == (2 * d * d * s * s + 20 * d * d * s) * layers + 2 * d * vocab * s
    assert run.with_cache == 24 * d * d * s * layers + 2 * d * vocab * s
    assert sum(run.steps_without) == run.without_cache and len(run.steps_with) == s


def test_exact_count_beside_seed004():
    """Exact with cache is the closed form plus attention scores; exact without cache recomputes every
    position's Q, O and MLP too, which the kv-only form leaves out."""
    for s in (10, 1000):
        kv_only = completion_flops(GPT3_MEDIUM, 1, s, convention="kv-only")
        exact = completion_flops(GPT3_MEDIUM, 1, s, lm_head="last")
        attention = exact.with_components.qk + exact.with_components.av
        assert exact.with_cache == kv_only.with_cache + attention
        assert exact.without_cache > 3 * kv_only.without_cache


def test_lm_head_modes():
    all_ = completion_flops(SEED000, 5, 3, lm_head="all")
    last = completion_flops(SEED000, 5, 3, lm_head="last")
    head = 2 * 1280 * 65536
    assert all_.without_cache - last.without_cache == head * ((5 - 1) + (6 - 1) + (7 - 1))
    assert all_.with_cache - last.with_cache == head * (5 - 1)


def brute_force_pairs(n: int, c: int, window: int | None) -> int:
    return sum(min(c - n + i + 1, window or c) for i in range(n))


@given(st.integers(1, 60), st.integers(0, 60), st.one_of(st.none(), st.integers(1, 70)))
def test_causal_keys_match_brute_force(n, extra, window):
    c = n + extra
    assert _keys_seen(n, c, window, "causal") == brute_force_pairs(n, c, window)
    assert _keys_seen(n, c, window, "dense") >= _keys_seen(n, c, window, "causal")
    if n == 1:
        assert _keys_seen(1, c, window, "dense") == _keys_seen(1, c, window, "causal")


def test_sliding_window_layers_cap_attention():
    gemma = get_preset("gemma3-270m")  # 15 layers slide over 512 tokens, 3 are global
    step = step_flops(gemma, 1, 10_000)
    per_pair = 2 * gemma.num_heads * gemma.head_dim
    assert step.qk == per_pair * (15 * 512 + 3 * 10_000)
    short = step_flops(gemma, 1, 300)  # below the window every layer sees everything
    assert short.qk == per_pair * 18 * 300


def test_extras_are_separate_from_the_matmul_total():
    step = step_flops(SEED000, 5, 5)
    assert step.total == sum(step.components().values())
    assert step.extra.total > 0
    assert step.extra.softmax == 5 * SEED000.num_heads * step.pairs
    assert "2·m·n·p" in FLOP_CONVENTION
    assert "mlp_gate" not in step.components()  # a plain two-matmul MLP
    assert [row[0] for row in step.as_rows()][-1] == "LM head"


def test_sum_steps_equals_summed_totals():
    without, _ = completion_steps(5, 4, "all")
    steps = [step_flops(SEED000, *s) for s in without]
    assert sum_steps(steps).total == sum(s.total for s in steps)


def test_request_flops_follow_the_engine():
    llama = get_preset("smollm2-135m")
    with_cache, without = request_flops(llama, 10, 5)
    expected_with = step_flops(llama, 10, 10, 1).total + sum(step_flops(llama, 1, 10 + k, 1).total
                                                             for k in range(1, 5))
    expected_without = sum(step_flops(llama, 10 + k, 10 + k, 1).total for k in range(5))
    assert (with_cache, without) == (expected_with, expected_without)
    assert (with_cache, without) == (completion_flops(llama, 10, 5, lm_head="last").with_cache,
                                     completion_flops(llama, 10, 5, lm_head="last").without_cache)
    reused, _ = request_flops(llama, 10, 5, cached_prompt_tokens=8)
    assert with_cache - reused == step_flops(llama, 10, 10, 1).total - step_flops(llama, 2, 10, 1).total
    assert request_flops(llama, 10, 0) == (0, 0)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: step_flops(SEED000, 0, 5), "new_tokens must be a positive integer, got 0"),
    (lambda: step_flops(SEED000, 6, 5), "context_len (5) must be at least new_tokens (6)"),
    (lambda: step_flops(SEED000, 2, 5, lm_head_tokens=3),
     "lm_head_tokens must be between 0 and new_tokens (2), got 3"),
    (lambda: completion_flops(SEED000, -1, 5), "prompt_tokens must be a positive integer, got -1"),
    (lambda: completion_flops(SEED000, 5, 0), "new_tokens must be a positive integer, got 0"),
    (lambda: completion_flops(SEED000, 5, 5, convention="kv"),
     "unknown FLOP convention 'kv' (choose from exact, kv-only)"),
    (lambda: completion_flops(SEED000, 5, 5, lm_head="first"),
     "unknown LM head mode 'first' (choose from all, last)"),
    (lambda: request_flops(SEED000, 5, 2, cached_prompt_tokens=5),
     "cached_prompt_tokens must be between 0 and prompt_tokens - 1 (4), got 5"),
])
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value) == message
