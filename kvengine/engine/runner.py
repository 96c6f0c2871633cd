"""ModelRunner: turns scheduled sequences into one StepBatch, runs the model, returns the sampled rows' logits.

Two kinds of batch, one model:
- cached: each sequence contributes only its not-yet-computed tokens; their K/V go to pool slots;
- no cache (the seeds' baseline): each sequence contributes its whole text and nothing is kept.
"""

from __future__ import annotations

import torch

from kvengine.batch import StepBatch
from kvengine.cache.block_manager import BlockManager
from kvengine.cache.pool import KVPool, sequence_index
from kvengine.engine.compiled import CompiledDecode
from kvengine.engine.scheduler import ScheduledSeq
from kvengine.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool | None, block_manager: BlockManager | None,
                 device: torch.device | str = "cpu", compile_decode: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.bm = block_manager
        self.device = torch.device(device)
        self.compiled = CompiledDecode(model) if compile_decode else None

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """logits [N, vocab] float32 for the batch's logits_indices rows."""
        if self.compiled is not None and self.compiled.applies(batch):
            return self.compiled(batch, self.pool)
        return self.model(batch, self.pool if batch.uses_cache else None)

    def build_cached(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        bs = self.bm.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        starts = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        kv_index: list[int | torch.Tensor] = []
        logits_rows: list[int] = []
        for s in scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            table = self.bm.block_table(seq.seq_id)
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            index = sequence_index(table, start + n, bs, self.device)
            slots.append(torch.arange(index + start, index + start + n) if isinstance(index, int)
                         else index[start:start + n])
            starts.append(starts[-1] + n)
            context_lens.append(start + n)
            tables.append(table)
            kv_index.append(index)
            if s.needs_logits:
                logits_rows.append(starts[-1] - 1)
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),  # [T]
            query_start_loc=starts,
            context_lens=context_lens,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=self.device),  # [N]
            slot_mapping=torch.cat(slots).to(self.device),  # [T]
            block_tables=tables,
            kv_index=kv_index,
        )
        if batch.is_decode and batch.num_seqs > 1:
            self._add_decode_gather(batch)
        return batch

    def _add_decode_gather(self, batch: StepBatch) -> None:
        """Padded slot indices for one batched attention call: [B, max_len] slots and validity mask.
        Padding repeats the sequence's first slot, so masked keys are real (finite) values."""
        max_len = max(batch.context_lens)
        rows = []
        for index, n in zip(batch.kv_index, batch.context_lens, strict=True):
            row = torch.arange(index, index + n, device=self.device) if isinstance(index, int) else index
            rows.append(torch.cat([row, row[:1].expand(max_len - n)]))
        batch.decode_slots = torch.stack(rows)  # [B, max_len]
        lens = torch.tensor(batch.context_lens, device=self.device)
        batch.decode_mask = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]  # [B, max_len]

    def build_no_cache(self, seqs: list[Sequence]) -> StepBatch:
        """Every sequence's whole text, recomputed from scratch; logits for each last position."""
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        for seq in seqs:
            n = len(seq.token_ids)
            ids.extend(seq.token_ids)
            positions.extend(range(n))
            starts.append(starts[-1] + n)
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),  # [T]
            query_start_loc=starts,
            context_lens=[len(s.token_ids) for s in seqs],
            logits_indices=torch.tensor([e - 1 for e in starts[1:]], dtype=torch.int64, device=self.device),
        )

    def full_logits_no_cache(self, token_ids: list[int], first: int) -> torch.Tensor:
        """One no-cache pass over `token_ids`; logits of positions first .. len-1: [len - first, vocab].
        Verify mode compares these with what the cached run produced step by step."""
        n = len(token_ids)
        batch = StepBatch(
            input_ids=torch.tensor(token_ids, dtype=torch.int64, device=self.device),  # [n]
            positions=torch.arange(n, dtype=torch.int64, device=self.device),  # [n]
            query_start_loc=[0, n],
            context_lens=[n],
            logits_indices=torch.arange(first, n, dtype=torch.int64, device=self.device),  # [n - first]
        )
        return self.run(batch)
