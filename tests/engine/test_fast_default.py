"""The default format on the real default model, on each kernel tier this CPU runs: `LLM()` with no weights
argument resolves to the fast format (int4 weights on the tier's kernels, the tier's activations), its run summary
says so and names the tier, and greedy tokens with and without the KV cache are identical (verify mode: logits
equal bit for bit). `weights="fp32"` stays the float reference."""

from __future__ import annotations

import io

import pytest
import torch

from kvengine.cli.report import run_summary
from kvengine.layers.linear import Int4Linear, PackedLinear
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams
from kvengine.weights.gguf import GGUFFile
from kvengine.weights.random_gguf import write_random_gguf

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


def test_a_q4_0_source_keeps_its_own_codes(tmp_path, default_gguf, kernel_tier):
    """A Q4_0 GGUF (random tiny Llama) on every tier: every linear layer, the LM head too, is int4 on Q4_0's grid
    with the file's own codes and scales (dequantized weights equal the file's: they are quantized from a float32
    load, also for the avx512 tier's bf16 activations), stored as scales alone on the tiers that take them, run one
    op per layer; cached and uncached tokens are identical, logits bit for bit."""
    path = write_random_gguf(tmp_path / "tiny.Q4_0.gguf", "llama-tiny", "Q4_0", 0, default_gguf)
    llm = LLM(str(path), kv_cache_memory=16 << 20, max_num_seqs=1)
    model = llm.engine.model
    assert model.fused_layers_enabled
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert "lm_head" in layers and all(isinstance(m, Int4Linear) and m.symmetric for m in layers.values())
    assert all(m.stiles.dim() == (3 if kernel_tier.symmetric_int4 else 4) for m in layers.values())
    source = GGUFFile(path)
    embd = next(t for t in source.tensors() if t.name == "token_embd.weight").dequantize().float()
    assert torch.equal(layers["lm_head"].dequantized(), embd)
    assert "int4 Q4_0-grid" in llm.engine.weights_desc
    floats = {p.dtype for p in model.parameters()} | {b.dtype for n, b in model.named_buffers()
                                                       if b.is_floating_point() and "inv_freq" not in n}
    assert floats <= {kernel_tier.act_dtype, torch.float16}  # the rest of the model in the activations' dtype
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cached = llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5]], sampling_params=params, verify=True)[0]
    uncached = llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5]], sampling_params=params, use_cache=False)[0]
    assert len(cached.token_ids) == 8 and cached.token_ids == uncached.token_ids
    assert cached.verify.first_divergence is None and cached.verify.max_abs_logit_diff == 0.0
