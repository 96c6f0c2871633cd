"""Compact KV dtypes on the real default model (SmolLM2-135M-Instruct, fp32): the issue's acceptance numbers.

- int8 KV: greedy tokens identical to a float32 KV cache for 64 tokens on the default model's test prompts, but for
  near-ties of float32 itself;
- perplexity on 2,048 tokens of CPython's pydoc topics moves by under 0.5% (int8) and under 3% (int4);
- at a fixed budget the engine admits 1,024-token sequences in proportion to bytes per token.
"""

from __future__ import annotations

import pytest

from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.eval.kv import compare_logits, greedy_tokens, held_text, identical_prefix, max_concurrent, text_tokens
from kvengine.eval.perplexity import Perplexity, chunk_logits

pytestmark = pytest.mark.real_model

PROMPTS = [  # tests/engine/test_default_model.py's prompts
    "Please tell me about Paris.",
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
]


NEAR_TIE = 0.05  # logits; int8 KV moves this model's logits by ~0.01 (a tie of 0.012 flipped on one AVX-512 host)


def test_int8_greedy_tokens_equal_full_precision_for_64_tokens(default_llm):
    """Identical for 64 tokens, except where float32 itself nearly ties the two picks: where two tokens lie 0.012
    logits apart (the CPU's rounding decides which hosts see such a tie), int8 KV may pick the other; a divergence
    must be such a tie, and nothing more."""
    ids = default_llm.encode_chats([[{"role": "user", "content": p}] for p in PROMPTS])
    model, tok = default_llm.engine.model, default_llm.tokenizer
    reference = greedy_tokens(model, tok, "float32", ids, 64)
    for prompt, ref, got in zip(ids, reference, greedy_tokens(model, tok, "int8", ids, 64), strict=True):
        same = identical_prefix(ref, got)
        if same == len(ref):
            continue
        context = [*prompt, *ref[:same]]
        *_, (_, logits) = chunk_logits(model, context, "float32", len(context))
        gap = float(logits[-1, ref[same]] - logits[-1, got[same]])  # float32's preference for its own pick
        assert 0 <= gap < NEAR_TIE, f"token {same}: int8 KV picked {got[same]}, float32 {ref[same]} by {gap:.4f}"


@pytest.mark.slow
def test_perplexity_change_on_pydoc_topics(default_llm):
    ids = text_tokens(default_llm.tokenizer, held_text()[1], 2048)
    scores = compare_logits(default_llm.engine.model, ids, ["int8", "int4"], "float32", chunk_size=512)
    ppl = {name: Perplexity(name, len(ids) - 1, s.nll).value for name, s in scores.items()}
    assert 5 < ppl["float32"] < 50
    assert abs(ppl["int8"] / ppl["float32"] - 1) < 0.005
    assert abs(ppl["int4"] / ppl["float32"] - 1) < 0.03


def test_fixed_budget_admits_1024_token_sequences_by_bytes(default_llm):
    model = default_llm.engine.model
    budget = 512 << 20
    admitted = {name: max_concurrent(model, name, budget) for name in ("bfloat16", "int8", "int4")}
    for name, n in admitted.items():
        assert n == int(budget // kv_cache_spec_for(model.config, name).bytes_per_block) // 64
    assert admitted == {"bfloat16": 22, "int8": 39, "int4": 66}  # 256, 148 and 88 bytes per token and kv head
