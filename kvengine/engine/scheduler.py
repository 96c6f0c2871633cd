"""Scheduler: which sequences compute how many tokens this step, under a token budget and the free blocks.

Order within a step: running sequences that decode (one token each), then running sequences still in
prefill (a chunk each), then waiting sequences in arrival order (FCFS), each admitted only if the block
manager can hold its whole text. When a running sequence needs a block and none is free, the newest
running sequence is preempted by recompute: its blocks are freed and it goes back to the head of the
waiting queue with its tokens so far (prefix caching usually gives most of them back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvengine.cache.block_manager import MissReason
from kvengine.cache.block_tables import KVBlockTables
from kvengine.cache.disk_tier import DiskFind, KVDiskTier
from kvengine.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def needs_logits(self) -> bool:
        """This chunk reaches the end of the sequence's text, so its last row is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_tables: KVBlockTables, max_num_seqs: int, max_num_batched_tokens: int,
                 disk: KVDiskTier | None = None) -> None:
        self.block_tables = block_tables
        self.disk = disk  # looked up on a memory miss at admission (cache/disk_tier.py)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if not s.in_prefill]
        prefilling = [s for s in self.running if s.in_prefill]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, n, out):
                continue
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        if not out.preempted:
            budget = self._admit(budget, out)
        return out

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for the next `n` tokens of `seq`, preempting the newest running sequences as needed.
        False if `seq` itself had to be preempted."""
        start = seq.num_computed_tokens
        while not self.block_tables.ensure_capacity(seq.seq_id, start + n, start):
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            found = self._find_on_disk(seq)
            match = self.block_tables.allocate(seq.seq_id, seq.token_ids, seq.cache_salt,
                                               found.prefix if found else None, reuse=seq.reuses_prefix)
            if match is None:
                break  # not enough free blocks: wait for running sequences to finish
            if found is not None and match.num_loaded_tokens:
                assert self.disk is not None
                self.disk.fill(match.block_ids[-match.num_loaded_tokens // self.block_tables.block_size:], found)
            n = min(len(seq.token_ids) - match.num_cached_tokens, budget)
            if not self.block_tables.ensure_capacity(seq.seq_id, match.num_cached_tokens + n, match.num_cached_tokens):
                self.block_tables.free(seq.seq_id)  # a windowed layout adds blocks per chunk; these did not fit
                break
            self.waiting.popleft()
            seq.num_computed_tokens = match.num_cached_tokens
            if not seq.admitted:  # report the first admission's prefix hit, not a recompute's
                seq.num_cached_tokens = match.num_cached_tokens
                seq.miss_reason = match.miss_reason.value if match.miss_reason is not None else None
                if found is not None and match.num_loaded_tokens:
                    seq.num_disk_tokens = match.num_loaded_tokens
                    seq.disk_bytes_read, seq.disk_load_s = found.nbytes, found.seconds
                seq.admitted = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return budget

    def _find_on_disk(self, seq: Sequence) -> DiskFind | None:
        """The disk tier's blocks after the memory hit, when memory missed at a full block."""
        if self.disk is None or not self.block_tables.enable_prefix_caching or not seq.reuses_prefix:
            return None
        match = self.block_tables.match_prefix(seq.token_ids, seq.cache_salt)
        if match.miss_reason not in (MissReason.NO_MATCH, MissReason.EVICTED, MissReason.CACHE_SALT):
            return None
        tables = self.block_tables
        if tables.blocks_needed(len(seq.token_ids)) - len(match.block_ids) > tables.num_free_blocks:
            return None  # it cannot be admitted now: do not read its files at every step while it waits
        stop = self.block_tables.manager.max_cached_blocks(len(seq.token_ids))
        return self.disk.find(seq.token_ids, seq.cache_salt, len(match.block_ids), stop)

    def preempt(self, seq: Sequence) -> None:
        self.block_tables.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished or aborted); safe whether it is waiting or running."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_tables.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
