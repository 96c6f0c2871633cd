"""Paged, per sequence: the reference path over the paged pool, for any step (prefill, chunks, mixed, windows).

Each sequence reads its keys and values (a view when its blocks are consecutive, a gather otherwise) and attends
with the causal mask offset by the tokens already cached; for a windowed group (cache/retention.py), with its
window's and its sinks' keys at explicit text positions, masked by `visible_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV
from kvengine.layers.attention import causal_mask, sdpa_gqa, visible_mask


@dataclass(slots=True)
class PagedMetadata:
    masks: list[torch.Tensor | None]  # [B]: [q_len, kv_len] bool, True where a query sees a key; None = no mask


class PagedBackend:
    name = "paged"
    runs_whole_layers = False

    def plan(self, batch: StepBatch, view: KVView) -> PagedMetadata:
        """Each sequence's mask, the same for every layer of the group."""
        device = view.slot_mapping.device
        masks: list[torch.Tensor | None] = []
        for i, positions in enumerate(view.kv_positions):
            context_len, q_len = batch.context_lens[i], batch.query_len(i)
            if positions is None:
                masks.append(causal_mask(q_len, context_len, None, device))
                continue
            q_pos = torch.arange(context_len - q_len, context_len, device=device)  # [q_len]
            masks.append(visible_mask(q_pos, positions, view.window, view.sinks))  # [q_len, kv_len]
        return PagedMetadata(masks)

    def attend(self, q: torch.Tensor, layer_kv: LayerKV, view: KVView, batch: StepBatch, scale: float,
               q_sink: torch.Tensor | None) -> torch.Tensor:
        meta: PagedMetadata = view.metadata
        if batch.num_seqs == 1 and view.kv_positions[0] is None:  # one sequence, every key: no output copy
            k_1, v_1 = layer_kv.read(view.kv_index[0], batch.context_lens[0])  # [Hkv, kv_len, D] each
            return sdpa_gqa(q, k_1.to(q.dtype), v_1.to(q.dtype), scale, meta.masks[0])
        out = torch.empty_like(q)  # [T, Hq, D]
        for i in range(batch.num_seqs):
            start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            out[start:end] = _attend_one(q[start:end], layer_kv, view, meta.masks[i], i, batch.context_lens[i],
                                         scale, q_sink[start:end] if q_sink is not None else None)
        return out


def _attend_one(q: torch.Tensor, layer_kv: LayerKV, view: KVView, mask: torch.Tensor | None, i: int,
                context_len: int, scale: float, q_sink: torch.Tensor | None) -> torch.Tensor:
    """Sequence i of the view: q [q_len, Hq, D] against the keys it reads -> [q_len, Hq, D]."""
    positions = view.kv_positions[i]
    kv_len = context_len if positions is None else len(positions)
    k_i, v_i = layer_kv.read(view.kv_index[i], kv_len)  # [Hkv, kv_len, D] each
    k_i, v_i = k_i.to(q.dtype), v_i.to(q.dtype)
    n_sinks = view.num_sinks[i]
    if n_sinks and q_sink is not None:
        # Score sinks with the query at its cache position and recent keys with it at its text position, in
        # one call: q' = [q_sink | q], k' = [k | 0] for sinks and [0 | k] for recent keys, so q'.k' picks
        # the right product per key (the softmax scale stays that of head_dim).
        zeros = torch.zeros_like(k_i)
        sink_rows = torch.arange(kv_len, device=q.device)[None, :, None] < n_sinks  # [1, kv_len, 1]
        k_i = torch.cat([torch.where(sink_rows, k_i, zeros), torch.where(sink_rows, zeros, k_i)], -1)
        q = torch.cat([q_sink, q], -1)  # [q_len, Hq, 2D]
    return sdpa_gqa(q, k_i, v_i, scale, mask)


PAGED = PagedBackend()
