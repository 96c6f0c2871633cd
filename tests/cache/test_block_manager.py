"""Unit tests of BlockManager: counts, prefix hits, miss reasons, eviction, failure without side effects."""

from __future__ import annotations

import pytest

from kvengine.cache import block_manager as bm_module
from kvengine.cache.block_manager import BlockManager, BlockStats, MissReason
from kvengine.errors import ConfigError

BS = 4


def prefill(bm: BlockManager, seq_id: int, tokens: list[int], salt: str | None = None) -> int:
    """Admit `tokens` and mark all of them computed; returns the number of cached tokens."""
    match = bm.allocate(seq_id, tokens, salt)
    assert match is not None
    bm.commit(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return match.num_cached_tokens


def decode(bm: BlockManager, seq_id: int, tokens: list[int], new_tokens: list[int]) -> None:
    """Append `new_tokens` one at a time, each computed by its own step."""
    for t in new_tokens:
        tokens.append(t)
        assert bm.ensure_capacity(seq_id, len(tokens))
        bm.commit(seq_id, tokens, len(tokens))
    bm.check_invariants()


def primed(tokens: list[int], num_blocks: int = 8) -> tuple[BlockManager, list[int]]:
    """A manager where sequence 1 has computed `tokens`; returns it and sequence 1's block table."""
    bm = BlockManager(num_blocks=num_blocks, block_size=BS)
    prefill(bm, 1, tokens)
    return bm, bm.block_table(1)


def snapshot(bm: BlockManager) -> tuple:
    return (bm.stats(), bm.num_cached_blocks, bm.seq_ids(), {s: bm.block_table(s) for s in bm.seq_ids()})


def test_counts_allocate_grow_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    match = bm.allocate(1, list(range(10)))
    assert match is not None and match.num_cached_tokens == 0 and match.miss_reason == MissReason.NO_MATCH
    table = bm.block_table(1)
    assert len(table) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert bm.slot(1, 5) == table[1] * BS + 1
    assert bm.ensure_capacity(1, 12) and len(bm.block_table(1)) == 3
    assert bm.ensure_capacity(1, 13) and len(bm.block_table(1)) == 4 and bm.num_free_blocks == 4
    with pytest.raises(IndexError):
        bm.slot(1, 16)
    assert bm.has_seq(1) and bm.seq_ids() == [1] and bm.blocks_needed(13) == 4 and bm.blocks_needed(0) == 0
    bm.check_invariants()
    bm.free(1)
    bm.check_invariants()
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0 and not bm.has_seq(1)
    assert bm.num_cached_blocks == 0  # nothing was committed, so nothing is hashed


def test_hit_on_identical_prompt_shares_blocks() -> None:
    prompt = list(range(10))
    bm, a = primed(prompt)
    match = bm.allocate(2, prompt)
    assert match is not None
    assert match.num_cached_tokens == 8 and match.miss_reason == MissReason.PARTIAL_BLOCK
    b = bm.block_table(2)
    assert match.block_ids == a[:2] == b[:2] and a[2] != b[2]
    assert [bm.ref_count(x) for x in b] == [2, 2, 1]
    stats = bm.stats()
    assert (stats.used, stats.shared, stats.hits, stats.queries) == (4, 2, 8, 20)
    assert stats.hit_rate == pytest.approx(0.4)
    bm.check_invariants()


def test_hit_after_first_finished_revives_cached_blocks() -> None:
    prompt = list(range(10))
    bm, first = primed(prompt)
    bm.free(1)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 8  # the partial third block is plain free
    match = bm.allocate(2, prompt)
    assert match is not None and match.num_cached_tokens == 8 and match.block_ids == first[:2]
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 5
    assert [bm.ref_count(x) for x in first[:2]] == [1, 1]
    bm.check_invariants()


def test_last_token_when_whole_prompt_is_cached() -> None:
    prompt = list(range(8))
    bm, a = primed(prompt)
    assert bm.match_prefix(prompt).miss_reason == MissReason.LAST_TOKEN
    match = bm.allocate(2, prompt)
    assert match is not None and match.miss_reason == MissReason.LAST_TOKEN
    assert match.num_cached_tokens == 4 and match.block_ids == a[:1]
    b = bm.block_table(2)
    assert b[0] == a[0] and b[1] != a[1] and bm.ref_count(b[1]) == 1  # recomputed into a private block
    bm.commit(2, prompt, len(prompt))
    assert bm.match_prefix(prompt + [99]).block_ids == a  # the first owner keeps the registration
    bm.free(1)
    bm.free(2)
    assert bm.num_cached_blocks == 2  # the recomputed twin of a[1] was not registered a second time
    bm.check_invariants()


def test_partial_block_and_short_prompt() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    short = bm.match_prefix([1, 2, 3])
    assert (short.num_cached_tokens, short.block_ids, short.miss_reason) == (0, [], MissReason.PARTIAL_BLOCK)
    empty = bm.allocate(1, [])
    assert empty is not None and empty.miss_reason is None and bm.block_table(1) == []
    prefill(bm, 2, [5, 6, 7, 8, 9])
    assert bm.match_prefix([5, 6, 7, 8, 9, 10]).miss_reason == MissReason.PARTIAL_BLOCK


def test_no_match_reasons() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.match_prefix(list(range(8))).miss_reason == MissReason.NO_MATCH
    prefill(bm, 1, list(range(9)))
    match = bm.match_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9])
    assert match.num_cached_tokens == 4 and match.miss_reason == MissReason.NO_MATCH
    # Same second block after a different first block: the chain hash differs, so no hit.
    assert bm.match_prefix([9, 9, 9, 9, 4, 5, 6, 7, 8]).num_cached_tokens == 0


def test_evicted_tail_first_then_whole_chain() -> None:
    prompt = list(range(8)) + [100]
    bm, _ = primed(prompt, num_blocks=4)
    bm.free(1)
    assert bm.num_cached_blocks == 2
    prefill(bm, 2, list(range(200, 210)))  # 3 blocks: the 2 plain free ones, then evicts one cached block
    assert bm.stats().evictions == 1
    match = bm.match_prefix(prompt)
    assert match.num_cached_tokens == 4 and match.miss_reason == MissReason.EVICTED  # the tail went first
    bm.free(2)
    prefill(bm, 3, list(range(300, 316)))  # the whole pool
    assert bm.stats().evictions >= 2
    match = bm.match_prefix(prompt)
    assert match.num_cached_tokens == 0 and match.miss_reason == MissReason.EVICTED


def test_evicted_record_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "EVICTED_RECORD_SIZE", 1)
    bm = BlockManager(num_blocks=1, block_size=BS)
    for seq_id, tokens in enumerate(([1] * BS, [2] * BS, [3] * BS)):
        prefill(bm, seq_id, tokens)
        bm.free(seq_id)
    assert bm.match_prefix([1] * BS).miss_reason == MissReason.NO_MATCH  # fell out of the record
    assert bm.match_prefix([2] * BS).miss_reason == MissReason.EVICTED
    assert bm.stats().evictions == 2


def test_cache_salt_isolates_tenants() -> None:
    bm = BlockManager(num_blocks=12, block_size=BS)
    prompt = list(range(9))
    prefill(bm, 1, prompt, salt="tenant-a")
    for other in ("tenant-b", None):
        match = bm.match_prefix(prompt, other)
        assert match.num_cached_tokens == 0 and match.miss_reason == MissReason.CACHE_SALT
    assert bm.match_prefix(prompt, "tenant-a").num_cached_tokens == 8
    assert bm.match_prefix([7] * 9, "tenant-b").miss_reason == MissReason.NO_MATCH
    # An unsalted owner is visible as CACHE_SALT to a salted request too.
    prefill(bm, 2, [50] * 9)
    assert bm.match_prefix([50] * 9, "tenant-a").miss_reason == MissReason.CACHE_SALT
    prefill(bm, 3, [50] * 9, salt="tenant-a")  # now both salts hold the same tokens, in distinct blocks
    assert set(bm.block_table(2)).isdisjoint(bm.block_table(3))
    bm.check_invariants()


def test_disabled_never_hashes_or_matches() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    assert prefill(bm, 1, prompt) == 0
    bm.free(1)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    match = bm.allocate(2, prompt)
    assert match is not None and match.num_cached_tokens == 0 and match.miss_reason == MissReason.DISABLED
    bm.check_invariants()


def test_allocate_too_big_changes_nothing() -> None:
    bm, _ = primed(list(range(8)), num_blocks=3)
    before = snapshot(bm)
    assert bm.allocate(2, list(range(100, 108))) is None
    assert snapshot(bm) == before and not bm.has_seq(2)
    assert not bm.ensure_capacity(1, 17)
    assert snapshot(bm) == before
    bm.check_invariants()


def test_allocate_counts_revived_blocks() -> None:
    prompt = list(range(8))
    bm, _ = primed(prompt, num_blocks=3)
    bm.free(1)
    prefill(bm, 2, [100, 101])  # takes the plain free block: 2 free blocks left, both cached
    longer = prompt + [8, 9, 10, 11]  # 2 matched (cached-free) + 1 fresh = 3 blocks leaving the free pool
    before = snapshot(bm)
    assert bm.allocate(3, longer) is None
    assert snapshot(bm) == before
    assert bm.match_prefix(longer).num_cached_tokens == 8  # no matched block was evicted by the attempt
    bm.free(2)
    match = bm.allocate(3, longer)
    assert match is not None and match.num_cached_tokens == 8 and bm.num_free_blocks == 0
    bm.check_invariants()


def test_multi_turn_hits_prompt_and_answer_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(6))
    prefill(bm, 1, tokens)
    decode(bm, 1, tokens, [40, 41, 42, 43, 44, 45])  # 12 tokens, 3 full blocks, the last filled by decode
    first = bm.block_table(1)
    bm.free(1)
    assert bm.num_cached_blocks == 3
    second = tokens + [7, 8, 9]
    match = bm.allocate(2, second)
    assert match is not None and match.num_cached_tokens == 12 and match.block_ids == first
    assert match.miss_reason == MissReason.PARTIAL_BLOCK
    bm.check_invariants()


def test_commit_registers_only_computed_full_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(12))
    assert bm.allocate(1, prompt) is not None
    bm.commit(1, prompt, 7)  # chunked prefill: block 0 done, block 1 half done
    assert bm.match_prefix(prompt).num_cached_tokens == 4
    bm.commit(1, prompt, 12)
    assert bm.match_prefix(prompt + [1]).num_cached_tokens == 12
    bm.free(1)
    bm.allocate(2, prompt[:7])
    bm.free(2)  # aborted mid-prefill before any commit: nothing new registered
    assert bm.num_cached_blocks == 3
    bm.check_invariants()


def test_reset_prefix_cache() -> None:
    prompt = list(range(9))
    bm, _ = primed(prompt)
    prefill(bm, 2, [9] * 9)
    bm.free(1)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 5
    assert bm.match_prefix(prompt).miss_reason == MissReason.NO_MATCH
    assert bm.match_prefix([9] * 9).num_cached_tokens == 8  # a live sequence's blocks keep their hashes
    bm.check_invariants()


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, salt, tokens: b"\x01" * 16)
    bm, _ = primed([1, 2, 3, 4, 5])
    match = bm.match_prefix([6, 7, 8, 9, 10])
    assert match.num_cached_tokens == 0 and match.miss_reason == MissReason.NO_MATCH


def test_errors() -> None:
    with pytest.raises(ConfigError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=BS)
    with pytest.raises(ConfigError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    bm, _ = primed([1, 2, 3], num_blocks=4)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate(1, [1])
    with pytest.raises(ValueError, match="exceed"):
        bm.commit(1, [1, 2, 3, 4, 5], 5)
    bm.free(1)
    with pytest.raises(KeyError):
        bm.free(1)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_check_invariants_detects_corruption() -> None:
    bm, _ = primed(list(range(5)), num_blocks=4)
    bm._blocks[bm.block_table(1)[0]].ref_count += 1
    with pytest.raises(AssertionError, match="holders"):
        bm.check_invariants()


def test_stats_fields() -> None:
    bm, _ = primed(list(range(9)), num_blocks=6)
    bm.free(1)
    assert bm.stats() == BlockStats(total=6, used=0, cached_free=2, free=4, shared=0, hits=0, queries=9,
                                    evictions=0)
    assert BlockStats(1, 0, 0, 1, 0, 0, 0, 0).hit_rate == 0.0
