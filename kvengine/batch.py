"""StepBatch: everything one forward step needs, built by the runner and read by the model's attention.

Tokens of every scheduled sequence are concatenated into one flat batch of T tokens (no padding).
Sequence i owns tokens query_start_loc[i] : query_start_loc[i+1]; after this step it holds context_lens[i]
tokens, the last query_lens[i] of which are the new ones. With a KV cache, token t's key and value are
written at `slot_mapping[t]` in the pool and sequence i's keys live in the blocks `block_tables[i]`.
Without a cache (the seeds' baseline) slot_mapping and block_tables are None and every sequence's whole
text is in the batch (query_lens == context_lens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: each token's position in its sequence
    query_start_loc: list[int]  # [B + 1] cumulative new-token counts
    context_lens: list[int]  # [B] tokens each sequence attends over after this step
    logits_indices: torch.Tensor  # [N] int64: rows of the T hidden states that go through the LM head
    slot_mapping: torch.Tensor | None = None  # [T] int64 flat pool slot per token; None without a cache
    block_tables: list[list[int]] | None = None  # [B][blocks] pool block ids per sequence; None without a cache
    # Per sequence, where its keys are in the pool: a start slot (consecutive blocks) or [context_len] slots.
    kv_index: list[int | torch.Tensor] | None = None
    # Batched decode only: [B, max_context] slots (padding points at slot 0) and [B, max_context] validity.
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one new token (the common steady state)."""
        return self.num_tokens == self.num_seqs
