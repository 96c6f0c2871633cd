"""KVBlockTables: a sequence's block tables, one per KV group, all drawn from one BlockManager.

Most models have one group (every layer keeps every token) and this is a thin layer over the BlockManager
with prefix caching. With sliding-window layers or a sink+window bound (cache/retention.py) each group has
its own table, keyed (seq_id, group) in the BlockManager, and `ensure_capacity` first drops the blocks that
no query from the chunk's first position on can see, so a windowed group holds a bounded number of blocks
however long the text grows. Those tables are never hashed: prefix caching is off for such layouts.

Pure Python like the BlockManager; the engine, scheduler and runner talk to this class.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvengine.cache.block_manager import BlockKey, BlockManager, BlockStats, LoadedPrefix, MissReason, PrefixMatch
from kvengine.cache.retention import KVGroup, Retention, max_blocks


class KVBlockTables:
    def __init__(self, manager: BlockManager, groups: tuple[KVGroup, ...]) -> None:
        self.manager = manager
        self.groups = groups
        self.retentions: tuple[Retention, ...] = tuple(g.retention for g in groups)
        self.simple = len(groups) == 1 and groups[0].retention.is_full
        if not self.simple:
            manager.enable_prefix_caching = False

    def _key(self, seq_id: int, group: int) -> Hashable:
        return seq_id if group == 0 else (seq_id, group)

    # ---- pool-wide counts (the BlockManager's) ------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.manager.num_used_blocks

    @property
    def enable_prefix_caching(self) -> bool:
        return self.manager.enable_prefix_caching

    def stats(self) -> BlockStats:
        return self.manager.stats()

    def check_invariants(self) -> None:
        self.manager.check_invariants()

    def blocks_needed(self, num_tokens: int, chunk: int = 1) -> int:
        """The most blocks one sequence of `num_tokens` tokens holds at once, over every group, when its
        tokens are computed at most `chunk` at a time."""
        return max_blocks(self.groups, num_tokens, chunk, self.block_size)

    # ---- sequence lifecycle -------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> PrefixMatch:
        if self.simple:
            return self.manager.match_prefix(token_ids, salt)
        return PrefixMatch(0, [], MissReason.DISABLED)

    def allocate(self, seq_id: int, token_ids: Sequence[int], salt: str | None = None,
                 loaded: LoadedPrefix | None = None, reuse: bool = True) -> PrefixMatch | None:
        """Admit a sequence. One full group: reuse its cached prefix (and `loaded` blocks of a lower tier; none
        when `reuse` is False) and cover the whole text (None if the blocks do not suffice). Otherwise empty
        tables; `ensure_capacity` adds blocks chunk by chunk."""
        if self.simple:
            return self.manager.allocate(seq_id, token_ids, salt, loaded, reuse)
        for g in range(len(self.groups)):
            self.manager.allocate(self._key(seq_id, g), ())
        return PrefixMatch(0, [], MissReason.DISABLED)

    def ensure_capacity(self, seq_id: int, num_tokens: int, start: int = 0) -> bool:
        """Blocks for positions up to `num_tokens` in every group, after dropping the blocks that queries
        from position `start` on cannot see. False if the free blocks ran short (what was done stays)."""
        bs = self.block_size
        for g, r in enumerate(self.retentions):
            key = self._key(seq_id, g)
            if not r.is_full:
                self.manager.drop_blocks(key, r.droppable_blocks(start, bs))
            if not self.manager.ensure_capacity(key, num_tokens):
                return False
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> list[tuple[int, BlockKey]]:
        """Register the newly full blocks' hashes (one full group only); the (block, key) pairs registered."""
        if self.simple:
            return self.manager.commit(seq_id, token_ids, num_computed_tokens)
        return []

    def free(self, seq_id: int) -> None:
        for g in range(len(self.groups)):
            self.manager.free(self._key(seq_id, g))

    # ---- lookups ------------------------------------------------------------------------------------

    def has_seq(self, seq_id: int) -> bool:
        return self.manager.has_seq(seq_id)

    def block_table(self, seq_id: int, group: int = 0) -> list[int]:
        """Group `group`'s table of `seq_id`; dropped blocks are HOLE (-1)."""
        return self.manager.block_table(self._key(seq_id, group))

    def num_held(self, seq_id: int) -> int:
        """Blocks `seq_id` holds now, over every group."""
        return sum(self.manager.num_held(self._key(seq_id, g)) for g in range(len(self.groups)))

    def shared_blocks(self, seq_id: int) -> int:
        """Blocks of `seq_id` that another sequence holds too (prefix sharing)."""
        if not self.simple:
            return 0
        return sum(1 for b in self.manager.block_table(seq_id) if self.manager.ref_count(b) > 1)
