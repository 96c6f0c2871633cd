"""Paged batched decode: every sequence has one new token; one padded gather and one SDPA call for them all."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV


@dataclass(slots=True)
class PagedDecodeMetadata:
    slots: torch.Tensor  # [B, max_len] int64: each sequence's key slots (padding repeats a real slot)
    mask: torch.Tensor  # [B, max_len] bool: which of them are real


class PagedDecodeBackend:
    """The keys gathered are exactly the ones each query sees (its window's, for a windowed group without sinks),
    so the mask is validity."""

    name = "paged-decode"
    runs_whole_layers = False

    def plan(self, batch: StepBatch, view: KVView) -> PagedDecodeMetadata:
        slots, lens = sequence_slots(batch, view)  # [B, max_len], [B]
        mask = torch.arange(slots.shape[1], device=slots.device)[None, :] < lens[:, None]  # [B, max_len]
        return PagedDecodeMetadata(slots, mask)

    def attend(self, q: torch.Tensor, layer_kv: LayerKV, view: KVView, batch: StepBatch, scale: float,
               q_sink: torch.Tensor | None) -> torch.Tensor:
        meta: PagedDecodeMetadata = view.metadata
        return attend_rows(q, layer_kv, meta.slots, meta.mask, scale)


def sequence_slots(batch: StepBatch, view: KVView) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's slots up to the step's end, padded to one length: ([B, max_len], [B] lengths).
    Padding repeats the sequence's first slot, so padded keys are real (finite) values."""
    device = view.slot_mapping.device
    rows = []
    for index, end in zip(view.kv_index, batch.context_lens, strict=True):
        rows.append(torch.arange(index, index + end, device=device) if isinstance(index, int) else index[:end])
    return pad_slots(rows), torch.tensor([len(r) for r in rows], device=device)  # [B, max_len], [B]


def pad_slots(rows: list[torch.Tensor]) -> torch.Tensor:
    """Slot lists of different lengths -> [B, max_len], each padded by repeating its first slot (a real key)."""
    max_len = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[:1].expand(max_len - len(r))]) for r in rows])  # [B, max_len]


def attend_rows(q: torch.Tensor, layer_kv: LayerKV, slots: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
    """One query row each: q [R, Hq, D] against its padded keys [R, Hkv, max_len, D] (slots [R, max_len], valid
    where mask [R, max_len]) -> [R, Hq, D]."""
    n_rows, n_heads, dim = q.shape
    k, v = layer_kv.read_slots(slots)  # [R, Hkv, max_len, D] each
    n_kv = k.shape[1]
    qh = q.view(n_rows, n_kv, n_heads // n_kv, dim)  # [R, Hkv, group, D]
    out = F.scaled_dot_product_attention(qh, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :],
                                         scale=scale)  # [R, Hkv, group, D]
    return out.reshape(n_rows, n_heads, dim)


PAGED_DECODE = PagedDecodeBackend()
