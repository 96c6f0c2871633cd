"""Stateful property tests of BlockManager: random admit, prefill, decode, finish, abort, preempt, reset.

The machine keeps a shadow of the KV pool: each slot records what a real forward would have written there,
(cache salt, the token prefix ending at that position), since a position's KV depends on every token before
it. A prefix hit must only ever hand out blocks whose shadow equals what the request would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvengine.cache.block_manager import BlockManager, MissReason

# Few shared prefixes, short tails from a 3-token alphabet: prompts collide often, so hits happen.
PREFIXES = [[7, 7, 7, 7, 7, 7], [7, 7, 7, 7, 8, 8, 8, 8, 8], [9, 9, 9], []]
SALTS = [None, "tenant-b"]
TAILS = st.lists(st.integers(0, 2), max_size=4)
MAX_LIVE = 4


@dataclass(slots=True)
class Live:
    tokens: list[int]
    salt: str | None
    computed: int  # positions < computed have KV in the pool


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 16), block_size=st.integers(1, 4),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.live: dict[int, Live] = {}
        self.waiting: list[tuple[list[int], str | None]] = []  # preempted sequences not readmitted yet
        self.finished: list[list[int]] = []  # token lists a follow-up turn can extend
        self.shadow: dict[int, tuple[str | None, tuple[int, ...]]] = {}  # slot -> what its KV encodes
        self.next_id = 0

    # ---- helpers ------------------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        bm = self.bm
        return (bm.stats(), bm.num_cached_blocks, sorted(bm.seq_ids()),
                {s: bm.block_table(s) for s in bm.seq_ids()})

    def check_match(self, match, tokens: list[int], salt: str | None) -> None:
        bs = self.bm.block_size
        assert match.num_cached_tokens == len(match.block_ids) * bs
        assert not tokens or match.num_cached_tokens < len(tokens)  # at least one token is computed
        if not self.bm.enable_prefix_caching:
            assert match.num_cached_tokens == 0 and (not tokens or match.miss_reason == MissReason.DISABLED)
        if match.miss_reason == MissReason.LAST_TOKEN:
            assert len(tokens) % bs == 0 and match.num_cached_tokens == len(tokens) - bs
        if match.miss_reason == MissReason.PARTIAL_BLOCK:
            assert len(tokens) % bs and match.num_cached_tokens == len(tokens) // bs * bs
        for i, b in enumerate(match.block_ids):
            for j in range(bs):
                p = i * bs + j
                assert self.shadow.get(b * bs + j) == (salt, tuple(tokens[:p + 1])), f"stale hit on block {b}"

    def admit(self, tokens: list[int], salt: str | None) -> int | None:
        bm, seq_id = self.bm, self.next_id
        before = self.snapshot()
        expected = bm.match_prefix(tokens, salt)
        revived = sum(1 for b in expected.block_ids if bm.ref_count(b) == 0)
        leaving = bm.blocks_needed(len(tokens)) - len(expected.block_ids) + revived  # free blocks used
        fits = leaving <= bm.num_free_blocks
        assert self.snapshot() == before, "match_prefix had side effects"
        match = bm.allocate(seq_id, tokens, salt)
        assert (match is not None) == fits, f"allocate needing {leaving} free blocks: {match}"
        if match is None:
            assert self.snapshot() == before, "a failed allocate changed state"
            self.waiting.append((tokens, salt))
            return None
        self.next_id += 1
        event(f"admit: {match.miss_reason}, hit={match.num_cached_tokens > 0}, revived={revived > 0}")
        assert match == expected
        self.check_match(match, tokens, salt)
        table = bm.block_table(seq_id)
        assert len(table) == bm.blocks_needed(len(tokens)) and table[:len(match.block_ids)] == match.block_ids
        self.live[seq_id] = Live(list(tokens), salt, match.num_cached_tokens)
        return seq_id

    def compute(self, seq_id: int, upto: int) -> None:
        """A forward step writes KV for positions [computed, upto), then commits them."""
        seq = self.live[seq_id]
        for p in range(seq.computed, upto):
            slot = self.bm.slot(seq_id, p)
            assert self.bm.ref_count(slot // self.bm.block_size) == 1, "writing into a shared block"
            self.shadow[slot] = (seq.salt, tuple(seq.tokens[:p + 1]))
        seq.computed = upto
        self.bm.commit(seq_id, seq.tokens, upto)

    def release(self, seq_id: int) -> Live:
        self.bm.free(seq_id)
        before = self.snapshot()
        try:
            self.bm.free(seq_id)
            raise AssertionError("double free was accepted")
        except KeyError:
            pass
        assert self.snapshot() == before
        return self.live.pop(seq_id)

    def pick(self, data: st.DataObject, prefill_done: bool | None = None) -> int:
        choices = sorted(s for s, q in self.live.items()
                         if prefill_done is None or (q.computed == len(q.tokens)) == prefill_done)
        return data.draw(st.sampled_from(choices))

    def has(self, prefill_done: bool) -> bool:
        return any((q.computed == len(q.tokens)) == prefill_done for q in self.live.values())

    # ---- rules --------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(prefix=st.sampled_from(PREFIXES), tail=TAILS, salt=st.sampled_from(SALTS), prefill=st.booleans())
    def add(self, prefix: list[int], tail: list[int], salt: str | None, prefill: bool) -> None:
        seq_id = self.admit(prefix + tail, salt)
        if prefill and seq_id is not None and self.live[seq_id].tokens:
            self.compute(seq_id, len(self.live[seq_id].tokens))  # the whole prompt in one step

    @precondition(lambda self: self.finished and len(self.live) < MAX_LIVE)
    @rule(data=st.data(), tail=TAILS.filter(bool), salt=st.sampled_from(SALTS))
    def add_next_turn(self, data: st.DataObject, tail: list[int], salt: str | None) -> None:
        self.admit(data.draw(st.sampled_from(self.finished)) + tail, salt)

    @precondition(lambda self: self.waiting and len(self.live) < MAX_LIVE)
    @rule()
    def readmit(self) -> None:
        self.admit(*self.waiting.pop(0))

    @rule(prefix=st.sampled_from(PREFIXES), tail=TAILS, salt=st.sampled_from(SALTS))
    def query(self, prefix: list[int], tail: list[int], salt: str | None) -> None:
        before = self.snapshot()
        self.check_match(self.bm.match_prefix(prefix + tail, salt), prefix + tail, salt)
        assert self.snapshot() == before

    @precondition(lambda self: self.has(prefill_done=False))
    @rule(data=st.data())
    def prefill_chunk(self, data: st.DataObject) -> None:
        seq_id = self.pick(data, prefill_done=False)
        seq = self.live[seq_id]
        self.compute(seq_id, data.draw(st.integers(seq.computed + 1, len(seq.tokens))))

    @precondition(lambda self: self.has(prefill_done=True))
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        seq_id = self.pick(data, prefill_done=True)
        seq = self.live[seq_id]
        before = self.snapshot()
        if not self.bm.ensure_capacity(seq_id, len(seq.tokens) + 1):
            assert self.snapshot() == before and self.bm.num_free_blocks == 0
            return
        seq.tokens.append(token)
        self.compute(seq_id, len(seq.tokens))

    @precondition(lambda self: self.has(prefill_done=True))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = self.release(self.pick(data, prefill_done=True))
        if seq.tokens:
            self.finished.append(seq.tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self.release(self.pick(data))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        seq = self.release(self.pick(data))
        self.admit(seq.tokens, seq.salt)

    @rule(roll=st.integers(0, 7))
    def reset_prefix_cache(self, roll: int) -> None:
        if roll:  # rarer than the other rules, or the cache would rarely hold anything
            return
        self.bm.reset_prefix_cache()
        assert self.bm.num_cached_blocks == 0

    # ---- invariants ---------------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_invariants()
        assert sorted(bm.seq_ids()) == sorted(self.live)
        holders = [0] * bm.num_blocks
        for seq_id, seq in self.live.items():
            table = bm.block_table(seq_id)
            assert len(table) >= bm.blocks_needed(len(seq.tokens))
            for b in table:
                holders[b] += 1
            for b in table[seq.computed // bm.block_size:]:  # blocks this sequence will still write
                assert bm.ref_count(b) == 1, f"sequence {seq_id} will write into shared block {b}"
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == holders
        assert bm.num_used_blocks == sum(1 for n in holders if n) == bm.num_blocks - bm.num_free_blocks
        if not self.live:
            assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase
