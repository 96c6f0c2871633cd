"""StepBatch: everything one forward step needs, built by the runner and read by the model's attention.

Tokens of every scheduled sequence are concatenated into one flat batch of T tokens (no padding).
Sequence i owns tokens query_start_loc[i] : query_start_loc[i+1]; after this step it holds context_lens[i]
tokens, the last query_lens[i] of which are the new ones. With a KV cache, `kv` has one KVView per KV group
(cache/retention.py; one group unless layers keep different windows): token t's key and value are written at
`kv[g].slot_mapping[t]` and sequence i reads the keys at `kv[g].kv_index[i]`; `kv[g].backend` is the attention
path the group takes this step, with what it planned in `kv[g].metadata` (layers/backends). Without a cache (the
seeds' baseline) `kv` is None and every sequence's whole text is in the batch (query_lens == context_lens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvengine.layers.backends.base import AttentionBackend


@dataclass(slots=True)
class KVView:
    """Where one KV group's keys are this step. Per sequence i, the keys read are `kv_index[i]`: a start slot
    (positions 0 .. context_len - 1 in consecutive slots, a zero-copy view) or one slot per key ([L] int64) at
    text positions `kv_positions[i]` ([L] int64; None = 0 .. L - 1). The first `num_sinks[i]` of them are
    attention sinks, scored with the query at its cache position (cache/retention.py)."""

    window: int | None  # the group's retention: recent tokens kept, None = all
    sinks: int  # and the first tokens kept
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    block_tables: list[list[int]]  # [B][blocks] pool block ids per sequence (-1 = dropped)
    kv_index: list[int | torch.Tensor]  # [B]: start slot, or [L] slots
    kv_positions: list[torch.Tensor | None]  # [B]: [L] text positions of the keys read, or None = 0 .. L - 1
    num_sinks: list[int]  # [B]: leading keys that are sinks
    # The group's attention path this step and its plan (layers/backends); the runner sets both for every view,
    # in one place (engine/runner.py `ModelRunner._plan`), before the forward pass.
    backend: AttentionBackend | None = None
    metadata: Any = None


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: each token's position in its sequence
    query_start_loc: list[int]  # [B + 1] cumulative new-token counts
    context_lens: list[int]  # [B] tokens each sequence attends over after this step
    logits_indices: torch.Tensor  # [N] int64: rows of the T hidden states that go through the LM head
    kv: list[KVView] | None = None  # one per KV group; None without a cache
    sink_positions: torch.Tensor | None = None  # [T] int64 cache positions of the queries, when a group has sinks
    max_context_len: int = field(init=False)  # max(context_lens): one int the compiled step reads

    def __post_init__(self) -> None:
        self.max_context_len = max(self.context_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def uses_cache(self) -> bool:
        return self.kv is not None

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one new token (the common steady state)."""
        return self.num_tokens == self.num_seqs
