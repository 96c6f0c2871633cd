"""The fused layer op: the model runs each whole decoder layer as one kvengine op (layers/csrc/decode_layer.cpp;
models/llama.py `enable_fused_layers`). A model that runs it runs every step that way: decode, prefill of any
length, and the no-cache recomputation (`no_cache_rows`), so a token's numbers never depend on which step computed
it, and cached and uncached runs give the same tokens. Inside the op, token r attends over the first `row_lens[r]`
slots of its sequence's list `slots[row_seq[r]]`, its own last (causal): one list per sequence, so a long prompt's
operands stay linear in its length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.pool import LayerKV
from kvengine.layers.backends.paged_decode import attend_rows, pad_slots, sequence_slots


@dataclass(slots=True)
class FusedLayersMetadata:
    slots: torch.Tensor  # [B, max_len] int64: each sequence's slots (padding repeats a real slot)
    row_seq: torch.Tensor  # [T] int64: the sequence of token r (a sequence's tokens are consecutive)
    row_lens: torch.Tensor  # [T] int64: how many of its sequence's slots token r reads


class FusedLayersBackend:
    name = "fused-layers"
    runs_whole_layers = True

    def plan(self, batch: StepBatch, view: KVView) -> FusedLayersMetadata:
        """Token t of sequence i (position start + t) reads the first start + t + 1 slots of i's list."""
        padded, _ = sequence_slots(batch, view)  # [B, max_len]
        return _token_rows(batch, padded)

    def attend(self, q: torch.Tensor, layer_kv: LayerKV, view: KVView, batch: StepBatch, scale: float,
               q_sink: torch.Tensor | None) -> torch.Tensor:
        """The op's attention in PyTorch (the model runs the op instead): each token over its row's keys."""
        meta: FusedLayersMetadata = view.metadata
        max_len = meta.slots.shape[1]
        mask = torch.arange(max_len, device=q.device)[None, :] < meta.row_lens[:, None]  # [T, max_len]
        return attend_rows(q, layer_kv, meta.slots[meta.row_seq], mask, scale)


def no_cache_rows(batch: StepBatch) -> FusedLayersMetadata:
    """A no-cache step (kv None: every sequence's whole text) through the op: step token r is written at slot r of
    a scratch K/V (cache/pool.py `step_scratch`), and token t of sequence i reads its sequence's slots up to itself,
    as the cached plan has it read the pool's."""
    device = batch.input_ids.device
    own = [torch.arange(batch.query_start_loc[i], batch.query_start_loc[i + 1], device=device)
           for i in range(batch.num_seqs)]  # each sequence's step tokens: its whole text
    return _token_rows(batch, pad_slots(own))


def _token_rows(batch: StepBatch, padded: torch.Tensor) -> FusedLayersMetadata:
    """Each sequence's padded slot list ([B, max_len]) for its step tokens; token t of a chunk of n ending at
    context length `end` reads end - n + t + 1 of them (causal)."""
    device = padded.device
    counts = [batch.query_len(i) for i in range(batch.num_seqs)]
    row_seq = torch.repeat_interleave(torch.arange(batch.num_seqs, device=device),
                                      torch.tensor(counts, device=device))  # [T]
    row_lens = torch.cat([torch.arange(end - n + 1, end + 1, device=device)
                          for n, end in zip(counts, batch.context_lens, strict=True)])  # [T]
    return FusedLayersMetadata(padded, row_seq, row_lens)


FUSED_LAYERS = FusedLayersBackend()
