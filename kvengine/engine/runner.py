"""ModelRunner: turns scheduled sequences into one StepBatch, runs the model, returns the sampled rows' logits.

Two kinds of batch, one model:
- cached: each sequence contributes only its not-yet-computed tokens; their K/V go to pool slots;
- no cache (the seeds' baseline): each sequence contributes its whole text and nothing is kept.
"""

from __future__ import annotations

import torch

from kvengine.batch import KVView, StepBatch
from kvengine.cache.block_manager import BlockManager
from kvengine.cache.block_tables import KVBlockTables
from kvengine.cache.pool import KVPool, sequence_indexes, slot_list, slots_of
from kvengine.cache.retention import Retention
from kvengine.cache.spec import KVCacheSpec
from kvengine.engine.compiled import CompiledDecode
from kvengine.engine.prompt_logprobs import prompt_rows
from kvengine.engine.scheduler import ScheduledSeq
from kvengine.engine.sequence import Sequence
from kvengine.errors import ConfigError
from kvengine.layers.backends import FUSED_LAYERS, PAGED, PAGED_DECODE, AttentionBackend
from kvengine.models.protocol import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool | None, block_tables: KVBlockTables | None,
                 device: torch.device | str = "cpu", compile_decode: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.block_tables = block_tables
        self.device = torch.device(device)
        self.compiled = CompiledDecode(model) if compile_decode else None

    @staticmethod
    def for_scoring(model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int,
                    device: torch.device | str = "cpu") -> ModelRunner:
        """A runner with a pool of its own (`num_blocks` blocks of `spec`, no prefix caching) for scoring texts
        chunk by chunk (`score_chunk`; eval/perplexity.py)."""
        tables = KVBlockTables(BlockManager(num_blocks, spec.block_size, enable_prefix_caching=False), spec.groups)
        return ModelRunner(model, KVPool.allocate(spec, num_blocks, device), tables, device)

    @property
    def fused_layers(self) -> bool:
        """The model runs every step as one op per layer (models/llama.py enable_fused_layers): decode, prefill of
        any length and no-cache steps alike, so cached and uncached tokens are the same; they skip compilation.
        Not with a pool the op cannot read (a scoring runner's quantized or bf16 KV cache): those steps run layer
        by layer."""
        return self.model.fused_layers_enabled if self.pool is None else self.model.fused_layers_read(self.pool)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """logits [N, vocab] float32 for the batch's logits_indices rows."""
        if (self.compiled is not None and self.compiled.applies(batch)
                and not batch.kv[0].backend.runs_whole_layers):  # (the fused layer op is not compiled)
            return self.compiled(batch, self.pool)
        return self.model(batch, self.pool if batch.uses_cache else None)

    def score_chunk(self, seq: Sequence, n: int) -> torch.Tensor:
        """Compute `seq`'s next `n` tokens through the pool (its blocks grown to hold them) and return every row's
        logits [n, vocab] float32: row i predicts the token after position start + i."""
        start = seq.num_computed_tokens
        if not self.block_tables.has_seq(seq.seq_id):
            self.block_tables.allocate(seq.seq_id, ())  # blocks come chunk by chunk, so memory grows with the text
        if not self.block_tables.ensure_capacity(seq.seq_id, start + n, start):
            raise ConfigError(f"the KV pool has no room for tokens {start} .. {start + n - 1}")
        batch = self.build_cached([ScheduledSeq(seq, n)])
        batch.logits_indices = torch.arange(n, dtype=torch.int64, device=self.device)  # [n]: every row
        logits = self.run(batch)
        seq.num_computed_tokens += n
        return logits

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
            logits_rows.extend(starts[-2] + p - start for p in prompt_rows(seq, start, n))
            if s.needs_logits:
                logits_rows.append(starts[-1] - 1)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # [T]
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            positions=pos,
            query_start_loc=starts,
            context_lens=context_lens,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=self.device),  # [N]
            kv=[self._view(g, r, scheduled) for g, r in enumerate(self.block_tables.retentions)],
        )
        sinks = next((r for r in self.block_tables.retentions if r.sinks), None)
        if sinks is not None:
            assert sinks.window is not None
            batch.sink_positions = pos.clamp(max=sinks.sinks + sinks.window - 1)  # [T]: Retention.cache_position
        self._plan(batch)
        return batch

    def _view(self, group: int, retention: Retention, scheduled: list[ScheduledSeq]) -> KVView:
        """Group `group`'s slots for the step: where new K/V go and which keys each sequence reads."""
        if retention.is_full:
            return self._full_view(group, retention, scheduled)
        bs = self.block_tables.block_size
        slots: list[torch.Tensor] = []
        tables: list[list[int]] = []
        kv_index: list[int | torch.Tensor] = []
        kv_positions: list[torch.Tensor | None] = []
        num_sinks: list[int] = []
        for s in scheduled:
            start, end = s.start, s.start + s.num_new_tokens
            table = self.block_tables.block_table(s.seq.seq_id, group)
            sink_range, recent = retention.key_positions(start, end)
            keys = torch.cat([torch.arange(sink_range.stop), torch.arange(recent.start, recent.stop)])  # [L]
            index = slots_of(table, keys, bs, self.device)  # [L]
            slots.append(index[-(end - start):])
            kv_positions.append(keys.to(self.device))
            num_sinks.append(len(sink_range))
            tables.append(table)
            kv_index.append(index)
        return KVView(retention.window, retention.sinks, torch.cat(slots).to(self.device), tables, kv_index,
                      kv_positions, num_sinks)

    def _full_view(self, group: int, retention: Retention, scheduled: list[ScheduledSeq]) -> KVView:
        """`_view` for a group that keeps every token: each sequence reads its keys 0 .. end - 1."""
        bs = self.block_tables.block_size
        tables = [self.block_tables.block_table(s.seq.seq_id, group) for s in scheduled]
        ends = [s.start + s.num_new_tokens for s in scheduled]
        # compiled decode reads keys by slot list even where blocks are consecutive: Dynamo guards the index's
        # type, so a start slot and a slot list would be two graphs, and the second compile would stall the first
        # request whose blocks are scattered (after a prefix-cache hit: the usual case from the second request on).
        as_slots = self.compiled is not None and all(s.num_new_tokens == 1 for s in scheduled)
        kv_index = sequence_indexes(tables, ends, bs, self.device, as_slots)
        slots = [slot for s, table, end in zip(scheduled, tables, ends, strict=True)
                 for slot in slot_list(table, s.start, end, bs)]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.device)  # [T]
        n = len(scheduled)
        return KVView(retention.window, retention.sinks, slot_mapping, tables, kv_index, [None] * n, [0] * n)

    def _plan(self, batch: StepBatch) -> None:
        """Each KV group's attention path for the step and that backend's metadata (layers/backends)."""
        for view in batch.kv:
            view.backend = self._backend_for(batch, view, self.fused_layers)
            view.metadata = view.backend.plan(batch, view)

    @staticmethod
    def _backend_for(batch: StepBatch, view: KVView, whole_layers: bool) -> AttentionBackend:
        """The one place a step's attention path is chosen: the fused layer op where the model runs its layers whole
        (`whole_layers`: every step, so no token's numbers depend on the step that computed it), batched decode for
        several one-token sequences without sinks, else per sequence. (A no-cache step has no view: the model runs
        it through the op too, models/llama.py `_forward_fused`.)"""
        if whole_layers:
            return FUSED_LAYERS
        if batch.is_decode and batch.num_seqs > 1 and not any(view.num_sinks):
            return PAGED_DECODE
        return PAGED

    def build_no_cache(self, seqs: list[Sequence]) -> StepBatch:
        """Every sequence's whole text, recomputed from scratch; logits for each last position (after its prompt
        log-probability rows, engine/prompt_logprobs.py, at its first step)."""
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        rows: list[int] = []
        for seq in seqs:
            n = len(seq.token_ids)
            ids.extend(seq.token_ids)
            positions.extend(range(n))
            rows.extend(starts[-1] + p for p in prompt_rows(seq, 0, n))
            starts.append(starts[-1] + n)
            rows.append(starts[-1] - 1)
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),  # [T]
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),  # [T]
            query_start_loc=starts,
            context_lens=[len(s.token_ids) for s in seqs],
            logits_indices=torch.tensor(rows, dtype=torch.int64, device=self.device),  # [N]
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
