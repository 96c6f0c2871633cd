"""Quantized linear layers: pack/unpack round trips, GGUF Q4_1 repacked without loss, and logits of every
weight format within a stated tolerance of the fp32 reference."""

from __future__ import annotations

import pytest
import torch
from kvtest import assert_tracks_reference, held_out_ids, q4_0_grid, tiny_pair

from kvengine.engine.config import EngineConfig
from kvengine.errors import ConfigError
from kvengine.layers.linear import Int4Linear, Int8Linear, Linear, quantize_int4, quantize_int8, quantize_linears


def test_int4_pack_unpack_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scale, lo = quantize_int4(w, 32)  # q [64, 96] in 0..15, scale and lo [64, 3]
    assert q.min() >= 0 and q.max() <= 15
    expect = (q.view(64, 3, 32).float() * scale[..., None] + lo[..., None]).view(64, 96)
    got = Int4Linear(w, None, torch.float32).dequantized()  # through PyTorch's packed kernel itself
    assert torch.allclose(got, expect, atol=1e-6)
    # quantization error is at most half a step of each group
    step = scale.repeat_interleave(32, dim=1)
    assert ((got - w).abs() <= step / 2 + 1e-6).all()


def test_int8_round_trip_error_is_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(48, 80)
    q, scale = quantize_int8(w)
    layer = Int8Linear(w, None, torch.float32)
    assert torch.equal(layer.dequantized(), q.float() * scale[:, None])
    assert ((layer.dequantized() - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_dense_copy_serves_large_steps_with_the_same_weight(cls):
    """Steps of more rows than `dense_above` multiply by the dequantized weight (a dense matmul); fewer rows
    run the packed kernel. Both multiply by the same weight, so the rows agree to float rounding. (The copy is
    for PyTorch's packed kernels: float activations, act_int8=False, keep the layer on them on every CPU; an
    fp32 tier's tiles would take it on an AVX2 host.)"""
    torch.manual_seed(2)
    w, x = torch.randn(64, 96), torch.randn(6, 96)
    layer = cls(w, None, torch.float32, dense_above=2, act_int8=False)
    assert torch.equal(layer.dense, layer.dequantized())
    big = layer(x)  # 6 rows > 2: the dense copy
    small = torch.cat([layer(x[i:i + 1]) for i in range(6)])  # one row at a time: the packed kernel
    assert (big - small).abs().max() < 1e-4
    assert cls(w, None, torch.float32).dense is None  # no copy unless asked


def test_gguf_q4_1_repacks_exactly(default_llm):
    """Q4_1 blocks (w = d*q + m over 32 weights) land on the int4 kernel's grid with no error at all."""
    layer = default_llm.engine.model.layers[0].mlp.gate_up_proj
    w = layer.dequantized()
    assert torch.equal(Int4Linear(w, None, torch.float32).dequantized(), w)


def test_lm_head_is_int4_only_on_q4_0_grid():
    """quantize_linears keeps the LM head int8 unless its weight lies on Q4_0's grid (a Q4_0 source's head,
    which int4 holds exactly); layers on that grid are reported as such."""
    model, _ = tiny_pair("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Linear) and name in ("lm_head", "layers.0.mlp.down_proj"):
                m.weight.copy_(q4_0_grid(*m.weight.shape, gen))
    head = model.lm_head.weight.detach().clone()
    chosen = quantize_linears(model, "int4", torch.float32)
    assert chosen["lm_head"] == chosen["layers.0.mlp.down_proj"] == "int4 Q4_0-grid"
    assert chosen["layers.0.mlp.gate_up_proj"] == "int4"
    assert torch.equal(model.lm_head.dequantized(), head)


# Max |logit - fp32 logit| on the tiny random model (logits are O(1)); int4's 16 levels per group of 32
# random weights is coarse, so its bound is wider.
TOLERANCE = {"int8": 0.05, "int4": 0.35}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_logits_close_to_fp32_on_tiny_model(fmt):
    ref, _ = tiny_pair("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    quant, _ = tiny_pair("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2)
    chosen = quantize_linears(quant, fmt, torch.float32)
    assert set(chosen.values()) == ({"int8"} if fmt == "int8" else {"int4", "int8"})
    assert chosen["lm_head"] == "int8"
    assert not any(isinstance(m, Linear) for m in quant.modules())
    from kvengine.batch import StepBatch

    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(2))
    batch = StepBatch(input_ids=ids, positions=torch.arange(24), query_start_loc=[0, 24], context_lens=[24],
                      logits_indices=torch.arange(24))
    with torch.no_grad():
        diff = (quant(batch, None) - ref(batch, None)).abs().max().item()
    assert 0 < diff <= TOLERANCE[fmt]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_int4_tracks_fp32(default_gguf, default_llm, dtype):
    """int4 (Q4_1 repacked exactly) + int8 LM head vs the fp32 reference on held-out text: perplexity within 2%
    and the same top token at >= 90% of positions (measured here: fp32 +0.2% / 98%, bf16 -0.7% / 96%; 256
    pydoc tokens are a noisy sample, 1,024 gave bf16 +0.14%). The text goes in as one
    step of many rows: activations of the kernel tier's dtype (layers/native.py: bf16 for avx512, fp32 for avx2
    and portable) run kvengine's gemm kernels on int8-quantized activations, the other dtype PyTorch's packed
    kernels (dense_above=None: no dense copy), as
    prefill and batched decode run them (tests/models/test_llama_fused_layers.py covers one row)."""
    from kvengine.layers import native
    from kvengine.llm import LLM

    llm = LLM(str(default_gguf), weights="int4", dtype=dtype, kv_cache_memory=64 << 20, max_num_seqs=2,
              dense_above=None)
    head = llm.engine.model.lm_head
    assert head.native == (native.tier_for(getattr(torch, dtype)) is not None)
    assert (head.wtiles is not None) == head.native
    ids = held_out_ids(llm.tokenizer)
    ref = default_llm.engine.runner.full_logits_no_cache(ids, 0)  # [n, vocab]
    got = llm.engine.runner.full_logits_no_cache(ids, 0)
    assert_tracks_reference(got, ref, ids)


def test_bad_weights_value_is_refused():
    with pytest.raises(ConfigError, match="unknown weights format 'int3'"):
        EngineConfig(weights="int3")
    with pytest.raises(ConfigError, match="weights 'bf16' and dtype 'float32' disagree"):
        EngineConfig(weights="bf16", dtype="float32").resolved_dtype()


def test_fast_default_is_int4_on_the_kernel_tier(kernel_tier, monkeypatch):
    """weights="fast" (generate, chat and serve's default): int4 weights in the activation dtype of the tier this
    CPU runs (bf16 only where the CPU has bf16 arithmetic), the quality test_default_model_int4_tracks_fp32 and the
    fused-op tests check on the real model; float weights when a dtype is named or no tier runs."""
    config = EngineConfig(weights="fast")
    assert config.resolved_dtype() == str(kernel_tier.act_dtype).removeprefix("torch.") and config.weights == "int4"
    assert EngineConfig(weights="int8").resolved_dtype() == str(kernel_tier.act_dtype).removeprefix("torch.")
    named = EngineConfig(weights="fast", dtype="float32")
    assert named.resolved_dtype() == "float32" and named.weights == "auto"
    monkeypatch.setenv("KVENGINE_NATIVE", "0")
    off = EngineConfig(weights="fast")
    assert off.resolved_dtype() == "float32" and off.weights == "auto"
