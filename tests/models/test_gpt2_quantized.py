"""GPT-2 on quantized weights: the shared module swap (layers/linear.py quantize_linears) turns every linear, biases
kept, into int8 or int4; decoding stays layer by layer and the run summary names why the fused op does not apply.

Tolerance: logits within 0.05 of the fp32 model's (these tiny logits are O(0.3); int8 rows and int4 groups of 32
move them by ~1e-3 and ~1e-2), and the cached run equals its own no-cache recomputation (verify)."""

from __future__ import annotations

import pytest
import torch
from gpt2test import tiny_gpt2_pair

from kvengine.cache.pool import KVPool
from kvengine.engine.sequence import Sequence
from kvengine.layers.linear import Int4Linear, Int8Linear
from kvengine.llm import LLM
from kvengine.models.gpt2 import FUSED_LAYERS_REASON
from kvengine.sampling import SamplingParams

PROMPT = [5, 17, 33, 2, 90, 41, 7, 64]


@pytest.mark.parametrize(("weights", "dtype", "kind"), [("int4", "bfloat16", Int4Linear),
                                                         ("int8", "float32", Int8Linear)])
def test_quantized_gpt2_tracks_fp32_and_says_why_layer_by_layer(weights, dtype, kind):
    ref_model, _ = tiny_gpt2_pair(n_embd=128, n_head=4)
    model, _ = tiny_gpt2_pair(n_embd=128, n_head=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = LLM.from_model(ref_model, None, kv_cache_memory=1 << 20)
    llm = LLM.from_model(model.to(getattr(torch, dtype)), None, weights=weights, dtype=dtype,
                         kv_cache_memory=1 << 20)
    assert isinstance(llm.engine.model.h[1].mlp.c_fc, kind) and llm.engine.model.h[1].mlp.c_fc.bias is not None
    assert f"steps: layer by layer ({FUSED_LAYERS_REASON})" in llm.engine.weights_desc
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, verify=True)[0]
    assert out.verify.passed and out.verify.first_divergence is None
    assert (logits(llm) - logits(ref)).abs().max() < 0.05
    assert llm.engine.block_tables.num_used_blocks == 0


def test_one_pool_when_the_fused_op_refuses_the_model(monkeypatch):
    """On an fp32 tier the "auto" KV dtype of quantized weights is bf16 where the fused op runs; GPT-2 runs layer by
    layer, so "auto" is its compute dtype after all, and the engine allocates that pool alone (it used to allocate
    the bf16 one first and drop it). A spy records what KVPool.allocate is asked for (engine bookkeeping)."""
    asked: list[str] = []
    allocate = KVPool.allocate

    def spy(spec, num_blocks, device):
        asked.append(spec.dtype)
        return allocate(spec, num_blocks, device)

    monkeypatch.setattr(KVPool, "allocate", staticmethod(spy))
    model, _ = tiny_gpt2_pair(n_embd=128, n_head=4)
    llm = LLM.from_model(model, None, weights="int8", dtype="float32", kv_cache_memory=1 << 20)
    assert asked == ["float32"]
    assert llm.engine.pool.plain_dtype() == torch.float32


def logits(llm: LLM) -> torch.Tensor:
    """Every position's logits of PROMPT, no cache: [len, vocab]."""
    batch = llm.engine.runner.build_no_cache([Sequence(0, PROMPT, SamplingParams())])
    batch.logits_indices = torch.arange(len(PROMPT))
    return llm.engine.runner.run(batch)
