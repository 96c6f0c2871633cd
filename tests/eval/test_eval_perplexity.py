"""Teacher-forced perplexity through the paged pool (kvengine/eval/perplexity.py): equal to the no-cache model's
own perplexity with a float32 cache, whatever the chunking, and moved (a little) by a quantized cache."""

from __future__ import annotations

import math

import pytest
import torch
from kvtest import tiny_pair

from kvengine.engine.runner import ModelRunner
from kvengine.errors import ConfigError
from kvengine.eval.perplexity import chunk_logits, perplexity

TOKENS = [(5 * j * j + 11 * j + 3) % 96 for j in range(70)]


@pytest.fixture(scope="module")
def model():
    return tiny_pair()[0]


def no_cache_perplexity(model, ids: list[int]) -> float:
    logits = ModelRunner(model, None, None).full_logits_no_cache(ids, 0)  # [n, vocab], one pass, no cache
    logp = torch.log_softmax(logits[:-1], -1)
    return math.exp(-float(logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()))


@pytest.mark.parametrize("chunk", [1, 7, 16, 70])
def test_float32_cache_gives_the_no_cache_perplexity(model, chunk):
    result = perplexity(model, TOKENS, "float32", chunk_size=chunk, block_size=8)
    assert result.tokens == 69
    assert result.value == pytest.approx(no_cache_perplexity(model, TOKENS), rel=1e-5)


def test_every_row_is_scored_in_order(model):
    chunks = list(chunk_logits(model, TOKENS, "float32", chunk_size=32, block_size=8))
    assert [start for start, _ in chunks] == [0, 32, 64]
    assert [logits.shape[0] for _, logits in chunks] == [32, 32, 6]
    full = ModelRunner(model, None, None).full_logits_no_cache(TOKENS, 0)
    assert torch.allclose(torch.cat([lg for _, lg in chunks]), full, atol=1e-4)


@pytest.mark.parametrize("name, tol", [("bfloat16", 2e-4), ("int8", 2e-4), ("fp8", 5e-4), ("int4", 2e-3)])
def test_quantized_cache_moves_perplexity_a_little(model, name, tol):
    ref = perplexity(model, TOKENS, "float32", block_size=8).value
    got = perplexity(model, TOKENS, name, block_size=8).value
    assert got != ref and abs(got / ref - 1) < tol


def test_bad_inputs_are_one_line_errors(model):
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(model, [3], "float32")
    with pytest.raises(ConfigError, match="chunk size"):
        perplexity(model, TOKENS, "float32", chunk_size=0)
    with pytest.raises(ConfigError, match="exceed the model's context of 256"):
        perplexity(model, TOKENS * 4, "float32")
    with pytest.raises(ConfigError, match="unknown KV cache dtype"):
        perplexity(model, TOKENS, "int2")
