"""The blocked causal kernel (bf16 whole-text prefill on CPU) against SDPA's causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvengine.layers import attention
from kvengine.layers.attention import sdpa_gqa


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain float64 causal attention, queries last: q [L, Hq, D], k/v [Hkv, S, D] -> [L, Hq, D]."""
    n, s, group = q.shape[0], k.shape[1], q.shape[1] // k.shape[0]
    kk, vv = (t.double().repeat_interleave(group, 0) for t in (k, v))  # [Hq, S, D]
    mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]  # [L, S]
    return F.scaled_dot_product_attention(q.double().transpose(0, 1), kk, vv, attn_mask=mask,
                                          scale=scale).transpose(0, 1)


@pytest.mark.parametrize("q_len, kv_len", [(40, 40), (40, 57), (1, 9)])
def test_causal_blocks_match_reference_in_blocks_of_any_size(q_len, kv_len, monkeypatch):
    monkeypatch.setattr(attention, "SCORE_BUDGET", 6 * kv_len * 16)  # blocks of 16 queries: several per call
    torch.manual_seed(0)
    q, k, v = torch.randn(q_len, 6, 32), torch.randn(2, kv_len, 32), torch.randn(2, kv_len, 32)
    out = attention._causal_blocks(q, k, v, 0.2)
    assert (out.double() - reference(q, k, v, 0.2)).abs().max() < 1e-5


def test_bf16_whole_text_prefill_uses_blocks_within_bf16_error():
    torch.manual_seed(1)
    q, k, v = torch.randn(64, 6, 32), torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    ref = reference(q, k, v, 0.2)
    fp32 = sdpa_gqa(q, k, v, 0.2, None)
    bf16 = sdpa_gqa(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.2, None)
    assert (fp32.double() - ref).abs().max() < 1e-5
    assert bf16.dtype == torch.bfloat16 and (bf16.double() - ref).abs().max() < 0.05  # bf16: 8 mantissa bits
