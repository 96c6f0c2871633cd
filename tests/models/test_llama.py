"""Our Llama-family model against transformers' on tiny random configs (fp32).

Tolerance: max |logit difference| <= 1e-4 (logits are O(1); fp32 accumulation-order noise is ~1e-6).
Covers uncached prefill, cached decode steps through the paged pool, chunked prefill, and batches
mixing sequences of different lengths.
"""

from __future__ import annotations

import pytest
import torch
from kvtest import cached_step, make_runner, tiny_pair

from kvengine.engine.sequence import Sequence
from kvengine.sampling import SamplingParams

TOL = 1e-4

CONFIGS = {
    "gqa": ("llama", {}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "untied": ("llama", {"tie_word_embeddings": False}),
    "qkv-bias (qwen2)": ("qwen2", {}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "sliding-window (mistral)": ("mistral", {"sliding_window": 8}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(name):
    kind, overrides = CONFIGS[name]
    ours, hf = tiny_pair(kind, **overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (20,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [20, vocab]
    runner, bm = make_runner(ours)
    # no cache: the whole sequence at once
    nc = runner.build_no_cache([Sequence(0, ids.tolist(), SamplingParams())])
    nc.logits_indices = torch.arange(20)
    assert (runner.run(nc) - ref).abs().max() <= TOL
    # cached: prefill 12 tokens, then 8 single-token decode steps
    seq = Sequence(1, ids[:12].tolist(), SamplingParams())
    got = [cached_step(runner, bm, [seq])]
    for t in ids[12:].tolist():
        seq.token_ids.append(t)
        got.append(cached_step(runner, bm, [seq]))
    assert (torch.cat(got) - ref).abs().max() <= TOL


@pytest.mark.parametrize("name", ["gqa", "sliding-window (mistral)"])
def test_chunked_prefill_and_mixed_batch_match(name):
    kind, overrides = CONFIGS[name]
    ours, hf = tiny_pair(kind, **overrides)
    torch.manual_seed(2)
    lens = [5, 17, 11]
    prompts = [torch.randint(0, 96, (n,)) for n in lens]
    with torch.no_grad():
        refs = [hf(p[None]).logits[0] for p in prompts]
    runner, bm = make_runner(ours)
    seqs = [Sequence(i, p.tolist(), SamplingParams()) for i, p in enumerate(prompts)]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    while any(s.num_uncomputed for s in seqs):  # chunks of 3 tokens, all sequences in one batch
        live = [s for s in seqs if s.num_uncomputed]
        before = [s.num_uncomputed for s in live]
        logits = cached_step(runner, bm, live, chunk=3)
        offset = 0
        for s, b in zip(live, before, strict=True):
            n = min(3, b)
            rows[s.seq_id].append(logits[offset:offset + n])
            offset += n
    for i, ref in enumerate(refs):
        assert (torch.cat(rows[i]) - ref).abs().max() <= TOL


def test_batched_decode_path_matches_transformers():
    ours, hf = tiny_pair("llama")
    torch.manual_seed(3)
    prompts = [torch.randint(0, 96, (n,)) for n in (3, 9, 14, 6)]
    runner, bm = make_runner(ours)
    seqs = [Sequence(i, p.tolist(), SamplingParams()) for i, p in enumerate(prompts)]
    cached_step(runner, bm, seqs)  # prefill all
    for s in seqs:
        s.token_ids.append(7)
    logits = cached_step(runner, bm, seqs)  # one token each: the batched decode path
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(torch.cat([p, torch.tensor([7])])[None]).logits[0, -1]
            assert (logits[i] - ref).abs().max() <= TOL
