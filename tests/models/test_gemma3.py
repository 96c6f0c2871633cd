"""Our Gemma 3 against transformers' Gemma3ForCausalLM on tiny random configs (fp32).

Tolerance: max |logit difference| <= 1e-4, as for the Llama family (fp32 accumulation-order noise is ~1e-6).
The tiny configs keep Gemma's distinguishing parts live: head_dim != hidden / heads, an attention scale from
query_pre_attn_scalar != head_dim, random (1 + w) norms in all six places, different RoPE bases for local and
global layers, and sliding windows (4 and 5 tokens) far shorter than the 20-token sequences, so every
windowed layer drops keys in the no-cache, cached-decode, chunked-prefill and batched-decode paths.
"""

from __future__ import annotations

import pytest
import torch
from kvtest import GEMMA_ROPE, cached_step, make_runner, tiny_gemma_pair
from test_llama import TOL

from kvengine.engine.sequence import Sequence
from kvengine.models.gemma3 import Gemma3ForCausalLM
from kvengine.models.registry import config_from_hf
from kvengine.sampling import SamplingParams

VOCAB = 96
ROPE = GEMMA_ROPE
CONFIGS = {
    "windowed (window 4, every 2nd layer global)": {},
    "mqa, window 5, every 3rd layer global": {"num_key_value_heads": 1, "sliding_window": 5,
                                              "layer_types": ["sliding_attention", "sliding_attention",
                                                              "full_attention"] * 2, "num_hidden_layers": 6},
    "linear rope scaling on global layers": {"rope_parameters": {
        **ROPE, "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}},
    "final logit softcapping": {"final_logit_softcapping": 1.5},
    "untied lm head": {"tie_word_embeddings": False},
}


def no_cache_logits(model, ids: torch.Tensor) -> torch.Tensor:
    runner, _ = make_runner(model)
    batch = runner.build_no_cache([Sequence(0, ids.tolist(), SamplingParams())])
    batch.logits_indices = torch.arange(len(ids))
    return runner.run(batch)  # [len, vocab]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(name):
    ours, hf = tiny_gemma_pair(**CONFIGS[name])
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (20,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [20, vocab]
    assert (no_cache_logits(ours, ids) - ref).abs().max() <= TOL
    runner, bm = make_runner(ours)  # cached: a 12-token prefill, then 8 decode steps of one token each
    seq = Sequence(1, ids.tolist(), SamplingParams())
    got = [cached_step(runner, bm, [seq], chunk=n) for n in [12] + [1] * 8]
    assert (torch.cat(got) - ref).abs().max() <= TOL


def test_model_config_follows_the_transformers_config():
    ours, hf = tiny_gemma_pair(**CONFIGS["mqa, window 5, every 3rd layer global"])
    c = ours.config
    assert c.layer_windows == (5, 5, None, 5, 5, None)
    assert (c.rope_theta, c.rope_local_theta, c.attn_scale) == (1e6, 1e4, 24 ** -0.5)
    assert c.hidden_act == "gelu_pytorch_tanh" and c.tie_word_embeddings
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_sliding_window_counts_the_token_itself():
    """A window of W means the token and its W - 1 predecessors (transformers' `kv_idx > q_idx - W`).
    Shown two ways: logits at the positions past the window equal transformers' only with our window
    convention, and a window one wider (or narrower) would change them."""
    ours, hf = tiny_gemma_pair()
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (12,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (no_cache_logits(ours, ids) - ref).abs().max() <= TOL
    for shift in (-1, 1):
        for layer in ours.layers:
            if layer.self_attn.window is not None:
                layer.self_attn.window = 4 + shift
        wrong = no_cache_logits(ours, ids)
        seen_alike = min(4, 4 + shift)  # positions before this see every earlier key under both windows
        assert (wrong[:seen_alike] - ref[:seen_alike]).abs().max() <= TOL
        assert (wrong[seen_alike:] - ref[seen_alike:]).abs().max() > 100 * TOL


@pytest.mark.parametrize("name", ["windowed (window 4, every 2nd layer global)",
                                  "mqa, window 5, every 3rd layer global"])
def test_chunked_prefill_mixed_batch_and_batched_decode_match(name):
    ours, hf = tiny_gemma_pair(**CONFIGS[name])
    torch.manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (5, 17, 11)]
    runner, bm = make_runner(ours)
    seqs = [Sequence(i, p.tolist(), SamplingParams()) for i, p in enumerate(prompts)]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    while any(s.num_uncomputed for s in seqs):  # chunks of 3 tokens, all sequences in one batch
        live = [s for s in seqs if s.num_uncomputed]
        counts = [min(3, s.num_uncomputed) for s in live]
        logits = cached_step(runner, bm, live, chunk=3)
        for s, chunk in zip(live, logits.split(counts), strict=True):
            rows[s.seq_id].append(chunk)
    for s in seqs:  # then three decode steps with one token each: the batched decode path
        for t in (7, 8, 9):
            s.token_ids.append(t)
    for _ in range(3):
        logits = cached_step(runner, bm, seqs, chunk=1)
        for s in seqs:
            rows[s.seq_id].append(logits[s.seq_id:s.seq_id + 1])
    with torch.no_grad():
        for s in seqs:
            ref = hf(torch.tensor(s.token_ids)[None]).logits[0]
            assert (torch.cat(rows[s.seq_id]) - ref).abs().max() <= TOL


def test_gguf_names_and_norm_offset():
    """llama.cpp's Gemma 3 tensors map to HF names; norms come back as w (GGUF stores 1 + w); Q/K rows keep
    their order (no Llama-style permutation)."""
    config = config_from_hf({"model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 64,
                                       "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "head_dim": 32})
    w = torch.arange(12.0).reshape(4, 3)
    cases = {
        "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
        "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
        "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "token_embd.weight": "model.embed_tokens.weight",
    }
    for gguf_name, hf_name in cases.items():
        name, tensor = Gemma3ForCausalLM.gguf_to_hf(gguf_name, w, config)
        assert name == hf_name
        assert torch.equal(tensor, w - 1 if "norm" in hf_name else w), gguf_name
    assert Gemma3ForCausalLM.gguf_to_hf("rope_freqs.weight", w, config) is None
