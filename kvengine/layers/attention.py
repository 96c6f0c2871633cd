"""Attention over the paged KV pool (or over the step's own tokens when there is no cache).

One entry point, `attend`, serves all three modes the engine has:
- no cache (the seeds' baseline): each sequence's whole text is in the batch; causal attention over it;
- paged cache, reference path: write the new K/V into the pool, then per sequence read its keys and
  values (a view when its blocks are consecutive, a gather otherwise) and attend with the causal mask
  offset by the tokens already cached;
- paged cache, batched decode: every sequence has one new token; one padded gather and one SDPA call.

Grouped-query attention is handled without repeating K/V: the `group` query heads that share a kv head
are folded into the query-length axis, so SDPA sees [kv_heads, group x q_len, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvengine.batch import StepBatch
from kvengine.cache.pool import LayerKV


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[q_len, kv_len] bool, True where query j (at position kv_len - q_len + j) may see key i.

    None when every query sees every key (one query, no window limit reached).
    """
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q_len, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             mask: torch.Tensor | None) -> torch.Tensor:
    """q [q_len, Hq, D], k/v [Hkv, kv_len, D], mask [q_len, kv_len] or None -> [q_len, Hq, D]."""
    q_len, n_heads, dim = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    if q_len == 1 and mask is None:  # decode: the group's query heads are the query rows, no reordering
        return F.scaled_dot_product_attention(q.view(n_kv, group, dim), k, v, scale=scale).view(1, n_heads, dim)
    qh = q.view(q_len, n_kv, group, dim).permute(1, 2, 0, 3).reshape(n_kv, group * q_len, dim)
    m = mask.repeat(group, 1) if mask is not None else None  # rows ordered (group, query) like qh
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=m, scale=scale)  # [Hkv, group*q_len, D]
    return out.view(n_kv, group, q_len, dim).permute(2, 0, 1, 3).reshape(q_len, n_heads, dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: LayerKV | None, batch: StepBatch,
           scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the step's new tokens -> attention output [T, Hq, D]."""
    if layer_kv is None:
        return _attend_no_cache(q, k, v, batch, scale, window)
    layer_kv.write(batch.slot_mapping, k, v)
    if batch.decode_slots is not None:
        return _attend_decode_batched(q, layer_kv, batch, scale, window)
    if batch.num_seqs == 1:  # one sequence (batch-1 decode or one prefill chunk): no output copy
        k_1, v_1 = layer_kv.read(batch.kv_index[0], batch.context_lens[0])  # [Hkv, kv_len, D] each
        mask = causal_mask(q.shape[0], batch.context_lens[0], window, q.device)
        return sdpa_gqa(q, k_1.to(q.dtype), v_1.to(q.dtype), scale, mask)
    out = torch.empty_like(q)
    for i in range(batch.num_seqs):
        start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
        kv_len = batch.context_lens[i]
        k_i, v_i = layer_kv.read(batch.kv_index[i], kv_len)  # [Hkv, kv_len, D] each
        mask = causal_mask(end - start, kv_len, window, q.device)
        out[start:end] = sdpa_gqa(q[start:end], k_i.to(q.dtype), v_i.to(q.dtype), scale, mask)
    return out


def _attend_no_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float,
                     window: int | None) -> torch.Tensor:
    out = torch.empty_like(q)
    for i in range(batch.num_seqs):
        start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
        mask = causal_mask(end - start, end - start, window, q.device)
        k_i = k[start:end].transpose(0, 1)  # [Hkv, L, D]
        v_i = v[start:end].transpose(0, 1)  # [Hkv, L, D]
        out[start:end] = sdpa_gqa(q[start:end], k_i, v_i, scale, mask)
    return out


def _attend_decode_batched(q: torch.Tensor, layer_kv: LayerKV, batch: StepBatch, scale: float,
                           window: int | None) -> torch.Tensor:
    """Every sequence has one query: q [B, Hq, D] against its padded keys [B, Hkv, max_len, D]."""
    n_seqs, n_heads, dim = q.shape
    k, v = layer_kv.read_slots(batch.decode_slots)  # [B, Hkv, max_len, D] each
    n_kv = k.shape[1]
    qh = q.view(n_seqs, n_kv, n_heads // n_kv, dim)  # [B, Hkv, group, D]
    mask = batch.decode_mask  # [B, max_len]
    if window is not None:
        lens = torch.tensor(batch.context_lens, device=q.device)[:, None]  # [B, 1]
        mask = mask & (torch.arange(mask.shape[1], device=q.device)[None, :] >= lens - window)
    mask = mask[:, None, None, :]  # [B, 1, 1, max_len]
    out = F.scaled_dot_product_attention(qh, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return out.reshape(n_seqs, n_heads, dim)
