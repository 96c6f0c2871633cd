"""The fused layer op: the model runs each whole decoder layer as one kvengine op (layers/csrc/decode_layer.cpp;
models/llama.py `enable_fused_layers`), for decode steps and prefill steps that read few keys. Inside the op,
token r attends over the first `row_lens[r]` slots of `row_slots[r]`, its own last (causal)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV
from kvengine.layers.backends.paged_decode import attend_rows, sequence_slots


@dataclass(slots=True)
class FusedLayersMetadata:
    row_slots: torch.Tensor  # [T, max_len] int64: token r's sequence's slots (padding repeats a real slot)
    row_lens: torch.Tensor  # [T] int64: how many of them token r reads


class FusedLayersBackend:
    name = "fused-layers"
    runs_whole_layers = True

    def plan(self, batch: StepBatch, view: KVView) -> FusedLayersMetadata:
        """Token t of sequence i (position start + t) reads the first start + t + 1 slots of i's list."""
        device = view.slot_mapping.device
        padded, _ = sequence_slots(batch, view)  # [B, max_len]
        counts = [batch.query_len(i) for i in range(batch.num_seqs)]
        row_slots = padded.repeat_interleave(torch.tensor(counts, device=device), dim=0)  # [T, max_len]
        row_lens = torch.cat([torch.arange(end - n + 1, end + 1, device=device)
                              for n, end in zip(counts, batch.context_lens, strict=True)])  # [T]
        return FusedLayersMetadata(row_slots, row_lens)

    def attend(self, q: torch.Tensor, layer_kv: LayerKV, view: KVView, batch: StepBatch, scale: float,
               q_sink: torch.Tensor | None) -> torch.Tensor:
        """The op's attention in PyTorch (the model runs the op instead): each token over its row's keys."""
        meta: FusedLayersMetadata = view.metadata
        max_len = meta.row_slots.shape[1]
        mask = torch.arange(max_len, device=q.device)[None, :] < meta.row_lens[:, None]  # [T, max_len]
        return attend_rows(q, layer_kv, meta.row_slots, mask, scale)


FUSED_LAYERS = FusedLayersBackend()
