"""Attention arithmetic every backend shares (layers/backends): masks and grouped-query SDPA.

The ways a step attends (no cache, paged, batched paged decode, the fused layer op) are the backends in
layers/backends; `kvengine.layers.backends.attend` is the entry a model's attention layer calls.

Grouped-query attention is handled without repeating K/V: the `group` query heads that share a kv head
are folded into the query-length axis, so SDPA sees [kv_heads, group x q_len, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[q_len, kv_len] bool, True where query j (at position kv_len - q_len + j) may see key i.

    None when no mask is needed: one query that sees every key, or a whole text with no window (plain causal
    attention, which `sdpa_gqa` runs with SDPA's causal kernel).
    """
    if (q_len == 1 or q_len == kv_len) and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q_len, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


SCORE_BUDGET = 1 << 24  # score elements one block of causal queries may hold (64 MiB in float32)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             mask: torch.Tensor | None) -> torch.Tensor:
    """q [q_len, Hq, Dk], k [Hkv, kv_len, Dk], v [Hkv, kv_len, D], mask [q_len, kv_len] or None
    -> [q_len, Hq, D]."""
    q_len, n_heads, dim_k = q.shape
    n_kv, dim = k.shape[0], v.shape[-1]
    group = n_heads // n_kv
    if q_len > 1 and mask is None and q_len == k.shape[1]:  # a whole text at once
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            return _causal_blocks(q, k, v, scale)
        qh = q.view(q_len, n_kv, group, dim_k).permute(1, 2, 0, 3)  # [Hkv, group, L, Dk]: SDPA's causal kernel,
        # which skips masked tiles; k/v expanded (views) to q's batch dims, since broadcast ones send CPU SDPA to its
        # math path, the whole L x L scores (4x slower at 1,024 fp32 tokens, 9/3 heads, AVX2)
        kh, vh = k[:, None].expand(-1, group, -1, -1), v[:, None].expand(-1, group, -1, -1)  # [Hkv, group, L, D]
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(q_len, n_heads, dim)  # [L, Hq, D]
    if q_len == 1 and mask is None:  # decode: the group's query heads are the query rows, no reordering
        return F.scaled_dot_product_attention(q.view(n_kv, group, dim_k), k, v, scale=scale).view(1, n_heads, dim)
    qh = q.view(q_len, n_kv, group, dim_k).permute(1, 2, 0, 3).reshape(n_kv, group * q_len, dim_k)
    m = mask.repeat(group, 1) if mask is not None else None  # rows ordered (group, query) like qh
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=m, scale=scale)  # [Hkv, group*q_len, D]
    return out.view(n_kv, group, q_len, dim).permute(2, 0, 1, 3).reshape(q_len, n_heads, dim)


def _causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [q_len, Hq, Dk] (the last q_len of kv_len positions) over k/v [Hkv, kv_len, *] in
    blocks of queries, each against only the keys up to its last query: two batched matmuls and a float32
    softmax per block. Like SDPA's causal kernel it skips most of the masked half; it is used in bf16 on CPU,
    where it is the faster of the two (docs/benchmarks.md, "Kernel measurements"), while fp32 keeps SDPA for
    its numerics."""
    q_len, n_heads, dim_k = q.shape
    n_kv, kv_len, dim = k.shape[0], k.shape[1], v.shape[-1]
    group, offset = n_heads // n_kv, kv_len - q_len
    block = max(16, min(256, SCORE_BUDGET // (n_heads * kv_len)))
    qh = q.view(q_len, n_kv, group, dim_k).permute(1, 2, 0, 3)  # [Hkv, group, q_len, Dk]
    out = torch.empty(q_len, n_heads, dim, dtype=v.dtype, device=q.device)  # [q_len, Hq, D]
    for s in range(0, q_len, block):
        e = min(s + block, q_len)
        n, keys = e - s, offset + e  # queries in the block; keys its last query sees
        scores = torch.bmm(qh[:, :, s:e].reshape(n_kv, group * n, dim_k),
                           k[:, :keys].transpose(1, 2))  # [Hkv, group * n, keys]
        q_pos = torch.arange(offset + s, offset + e, device=q.device)[:, None]  # [n, 1]
        hidden = torch.arange(keys, device=q.device)[None, :] > q_pos  # [n, keys]
        scores = scores.view(n_kv, group, n, keys).float().mul_(scale).masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(n_kv, group * n, keys)
        block_out = torch.bmm(probs, v[:, :keys]).view(n_kv, group, n, dim)  # [Hkv, group, n, D]
        out[s:e] = block_out.permute(2, 0, 1, 3).reshape(n, n_heads, dim)
    return out


def visible_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None,
                 sinks: int = 0) -> torch.Tensor:
    """[q_len, kv_len] bool from explicit text positions: a query sees earlier keys inside its window, and the
    first `sinks` positions always (cache/retention.py)."""
    q, k = q_positions[:, None], k_positions[None, :]  # [q_len, 1], [1, kv_len]
    mask = k <= q
    if window is not None:
        mask &= (k > q - window) | (k < sinks)
    return mask
