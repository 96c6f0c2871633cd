"""The default format on the real default model, on each kernel tier this CPU runs: `LLM()` with no weights
argument resolves to the fast format (int4 weights on the tier's kernels, the tier's activations), its run summary
says so and names the tier, and greedy tokens with and without the KV cache are identical (verify mode: logits
equal bit for bit). `weights="fp32"` stays the float reference."""

from __future__ import annotations

import io

import pytest

from kvengine.cli.report import run_summary
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("kernel_tier")]

# the portable tier's plain C++ takes ~2 s per no-cache step of this model (2-core host, under load): fewer tokens
# there; avx512 / avx2 run 32 in ~2.5 / ~5 s when the host is idle
NEW_TOKENS = {"portable": 6}
DEFAULT_NEW_TOKENS = 32


def test_llm_default_is_fast_and_cached_equals_uncached(default_gguf, kernel_tier):
    llm = LLM(str(default_gguf), kv_cache_memory=64 << 20, max_num_seqs=1)
    assert (llm.config.weights, llm.config.fast_chosen) == ("int4", True)
    assert llm.engine.model.fused_layers_enabled
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Please tell me about Paris."}])
    n = NEW_TOKENS.get(kernel_tier.name, DEFAULT_NEW_TOKENS)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    cached = llm.generate(prompt_token_ids=[ids], sampling_params=params, verify=True)[0]
    uncached = llm.generate(prompt_token_ids=[ids], sampling_params=params, use_cache=False)[0]
    assert len(cached.token_ids) == n and cached.token_ids == uncached.token_ids
    assert cached.verify.first_divergence is None and cached.verify.max_abs_logit_diff == 0.0
    text = io.StringIO()
    run_summary(llm, cached, file=text)
    summary = text.getvalue()
    assert "the fastest default for this CPU" in summary and "int4" in summary
    assert f"kvengine {kernel_tier.name} kernels" in summary and "steps: one kvengine op per layer" in summary


def test_fp32_stays_the_float_reference(default_llm):
    assert default_llm.config.weights == "fp32" and not default_llm.config.fast_chosen
    assert "weights float32" in default_llm.engine.weights_desc
    assert not default_llm.engine.model.fused_layers_enabled
