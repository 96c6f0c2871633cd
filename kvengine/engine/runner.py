"""ModelRunner: turns scheduled sequences into one StepBatch, runs the model, returns the sampled rows' logits.

Two kinds of batch, one model:
- cached: each sequence contributes only its not-yet-computed tokens; their K/V go to pool slots;
- no cache (the seeds' baseline): each sequence contributes its whole text and nothing is kept.
"""

from __future__ import annotations

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.block_tables import KVBlockTables
from kvengine.cache.pool import KVPool, sequence_index, slots_of
from kvengine.cache.retention import Retention
from kvengine.engine.compiled import CompiledDecode
from kvengine.engine.scheduler import ScheduledSeq
from kvengine.engine.sequence import Sequence

# The one-op path attends with a plain loop per (token, head); a prefill step whose tokens together read more
# keys than this (a long prompt) runs layer by layer, where PyTorch's attention kernels are faster. 32 chat
# prompts of ~36 tokens read ~21k.
FUSED_ROW_KEYS = 1 << 16


def row_keys(scheduled: list[ScheduledSeq]) -> int:
    """Keys the step's tokens read together (causal): token t of a chunk starting at `start` reads start + t + 1."""
    return sum(s.num_new_tokens * s.start + s.num_new_tokens * (s.num_new_tokens + 1) // 2 for s in scheduled)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool | None, block_tables: KVBlockTables | None,
                 device: torch.device | str = "cpu", compile_decode: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.bm = block_tables
        self.device = torch.device(device)
        self.compiled = CompiledDecode(model) if compile_decode else None

    @property
    def fused_layers(self) -> bool:
        """The model runs steps as one op per layer (models/llama.py enable_fused_layers): every decode step,
        and prefill steps whose tokens read few keys (`FUSED_ROW_KEYS`); they skip compilation, and need each
        token's keys by slot list (`_add_row_slots`)."""
        return getattr(self.model, "fused_layer_weights", None) is not None

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """logits [N, vocab] float32 for the batch's logits_indices rows."""
        if self.compiled is not None and self.compiled.applies(batch) and batch.kv[0].row_slots is None:
            return self.compiled(batch, self.pool)  # (steps with row slots run the model's one-op path)
        return self.model(batch, self.pool if batch.uses_cache else None)

    def build_cached(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        logits_rows: list[int] = []
        for s in scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            starts.append(starts[-1] + n)
            context_lens.append(start + n)
            if s.needs_logits:
                logits_rows.append(starts[-1] - 1)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # [T]
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            positions=pos,
            query_start_loc=starts,
            context_lens=context_lens,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=self.device),  # [N]
            kv=[self._view(g, r, scheduled) for g, r in enumerate(self.bm.retentions)],
        )
        sinks = next((r for r in self.bm.retentions if r.sinks), None)
        if sinks is not None:
            assert sinks.window is not None
            batch.sink_positions = pos.clamp(max=sinks.sinks + sinks.window - 1)  # [T]: Retention.cache_position
        return batch

    def _view(self, group: int, retention: Retention, scheduled: list[ScheduledSeq]) -> KVView:
        """Group `group`'s slots for the step: where new K/V go and which keys each sequence reads."""
        bs = self.bm.block_size
        slots: list[torch.Tensor] = []
        tables: list[list[int]] = []
        kv_index: list[int | torch.Tensor] = []
        kv_positions: list[torch.Tensor | None] = []
        num_sinks: list[int] = []
        decode = all(s.num_new_tokens == 1 for s in scheduled)
        # compiled decode reads keys by slot list even where blocks are consecutive: Dynamo guards the index's
        # type, so a start slot and a slot list would be two graphs, and the second compile would stall the first
        # request whose blocks are scattered (after a prefix-cache hit: the usual case from the second request on).
        as_slots = decode and self.compiled is not None
        for s in scheduled:
            start, end = s.start, s.start + s.num_new_tokens
            table = self.bm.block_table(s.seq.seq_id, group)
            if retention.is_full:
                index = sequence_index(table, end, bs, self.device, as_slots)
                slots.append(torch.arange(index + start, index + end) if isinstance(index, int)
                             else index[start:end])
                kv_positions.append(None)
                num_sinks.append(0)
            else:
                sink_range, recent = retention.key_positions(start, end)
                keys = torch.cat([torch.arange(sink_range.stop), torch.arange(recent.start, recent.stop)])  # [L]
                index = slots_of(table, keys, bs, self.device)  # [L]
                slots.append(index[-(end - start):])
                kv_positions.append(keys.to(self.device))
                num_sinks.append(len(sink_range))
            tables.append(table)
            kv_index.append(index)
        view = KVView(retention.window, retention.sinks, torch.cat(slots).to(self.device), tables, kv_index,
                      kv_positions, num_sinks)
        if self.fused_layers and (decode or row_keys(scheduled) <= FUSED_ROW_KEYS):
            self._add_row_slots(view, scheduled)
        elif decode and len(scheduled) > 1 and not any(num_sinks):
            self._add_decode_gather(view, scheduled)
        return view

    def _add_row_slots(self, view: KVView, scheduled: list[ScheduledSeq]) -> None:
        """Per-token slot lists for the model's one-op path: token t of sequence s (position start + t) reads
        the first start + t + 1 slots of s's list."""
        padded, _ = self._sequence_slots(view, scheduled)  # [S, max_len]
        counts = torch.tensor([s.num_new_tokens for s in scheduled], device=self.device)  # [S]
        view.row_slots = padded.repeat_interleave(counts, dim=0)  # [T, max_len]
        view.row_lens = torch.cat([torch.arange(s.start + 1, s.start + s.num_new_tokens + 1, device=self.device)
                                   for s in scheduled])  # [T]

    def _add_decode_gather(self, view: KVView, scheduled: list[ScheduledSeq]) -> None:
        """Padded slot indices for one batched attention call: [B, max_len] slots and validity mask."""
        view.decode_slots, lens = self._sequence_slots(view, scheduled)  # [B, max_len], [B]
        max_len = view.decode_slots.shape[1]
        view.decode_mask = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]  # [B, max_len]

    def _sequence_slots(self, view: KVView, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's slots up to the step's end, padded to one length: ([S, max_len], [S] lengths).
        Padding repeats the sequence's first slot, so padded keys are real (finite) values."""
        rows = []
        for index, s in zip(view.kv_index, scheduled, strict=True):
            end = s.start + s.num_new_tokens
            rows.append(torch.arange(index, index + end, device=self.device) if isinstance(index, int)
                        else index[:end])
        max_len = max(len(r) for r in rows)
        padded = torch.stack([torch.cat([r, r[:1].expand(max_len - len(r))]) for r in rows])  # [S, max_len]
        return padded, torch.tensor([len(r) for r in rows], device=self.device)

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
