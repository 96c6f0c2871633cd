"""BlockManager: bookkeeping of the paged KV pool (which block holds which tokens); pure Python, no torch.

One pool of `num_blocks` blocks of `block_size` token slots is shared by every running sequence. A
sequence's block table maps its position p to slot `table[p // block_size] * block_size + p % block_size`.

Automatic prefix caching: once every token of a FULL block has its KV computed, the block gets a chained
hash (parent block's hash, the request's cache salt, this block's token ids). A later prompt that starts with
the same full blocks under the same salt reuses them (ref count + 1) instead of recomputing them. A block
whose ref count drops to 0 keeps its contents and hash and waits in an LRU of cached-free blocks until a
fresh allocation evicts it. Only full, computed blocks are shared and a sequence writes only at positions
past its matched prefix, i.e. into blocks it holds alone, so no copy-on-write is needed.

A windowed layer group (cache/retention.py) drops the blocks that left its window: `drop_blocks` releases
them and leaves a HOLE (-1) in the table, so table index i still means positions i*bs .. i*bs + bs - 1.
Such tables are never hashed (prefix caching needs every block of a prefix).

A lower tier (the KV disk tier, cache/disk_tier.py) extends a match: `allocate(..., loaded=...)` registers the
full blocks that followed the memory hit and were found on disk into fresh blocks, as if computed; the caller
copies their bytes into those blocks before the next forward. `commit` returns the blocks it registered, so
the caller can write them down.

Every block is in exactly one of three states: used (ref > 0), cached-free (ref 0, hash registered, in
the LRU), plain free (ref 0, no hash). Per-step work is O(blocks touched); only `check_invariants` scans.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from kvengine.errors import ConfigError

if TYPE_CHECKING:
    from kvengine.cache.kv_events import KVEventLog

HOLE = -1  # a block-table entry whose block was dropped (it left every query's window)
ROOT_HASH = bytes(16)  # the parent hash of a sequence's first block
EVICTED_RECORD_SIZE = 65536  # how many evicted hashes are remembered to answer MissReason.EVICTED


class MissReason(StrEnum):
    """Why the prompt's first uncached token was not served from the prefix cache."""

    NO_MATCH = "no_match"  # its block's hash was never cached
    EVICTED = "evicted"  # it was cached once but was evicted to make room
    CACHE_SALT = "cache_salt"  # the same tokens are cached under another cache salt (another tenant)
    PARTIAL_BLOCK = "partial_block"  # every full block hit; the rest is a partial block (never shared)
    LAST_TOKEN = "last_token"  # the whole prompt was cached; its last block is recomputed for logits
    DISABLED = "disabled"  # prefix caching is off
    LOADED_FROM_DISK = "loaded_from_disk"  # the memory cache missed here; the disk tier had the blocks
    PROMPT_LOGPROBS = "prompt_logprobs"  # not looked up: the request asks for every prompt position's logits


@dataclass(slots=True, frozen=True)
class BlockKey:
    """What a full block's KV depends on besides the model: its chain hash (with the salt) and its tokens."""

    chain_hash: bytes
    unsalted: bytes  # the chain hash of the same tokens without a salt
    salt: str | None
    tokens: tuple[int, ...]


@dataclass(slots=True)
class LoadedPrefix:
    """Full blocks a lower tier holds right after a memory match of `start` blocks, in order."""

    start: int
    keys: list[BlockKey]


@dataclass(slots=True)
class PrefixMatch:
    num_cached_tokens: int  # tokens whose KV is reused (a multiple of block_size)
    block_ids: list[int]  # the matched blocks, in order
    miss_reason: MissReason | None  # None when not applicable (empty prompt)
    num_loaded_tokens: int = 0  # of num_cached_tokens: loaded from a lower tier (block_ids[-n // bs:])


@dataclass(slots=True)
class BlockStats:
    total: int
    used: int  # ref count > 0
    cached_free: int  # ref count 0, still holding a reusable hash
    free: int  # ref count 0, never used or unhashed
    shared: int  # ref count > 1
    hits: int  # prompt tokens served from the prefix cache by allocate
    queries: int  # prompt tokens seen by allocate
    evictions: int  # cached-free blocks whose hash was dropped to make room

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    hash: bytes | None = None  # registered chain hash; None = not in the hash table
    unsalted: bytes | None = None  # chain hash of the same tokens without salt (for MissReason.CACHE_SALT)
    salt: str | None = None
    tokens: tuple[int, ...] = ()  # compared on a hit, a guard against hash collisions
    parent: bytes = b""  # chain hash of the block before it (ROOT_HASH for a first block), while registered


@dataclass(slots=True)
class _SeqState:
    salt: str | None
    table: list[int]
    num_hashed: int = 0  # leading full blocks whose chain hash is known
    parent: bytes = ROOT_HASH  # chain hash of block num_hashed - 1
    parent_unsalted: bytes = ROOT_HASH
    dropped_until: int = 0  # table indices below this that drop_blocks was asked for are holes


def chain_hash(parent: bytes, salt: str | None, tokens: Sequence[int]) -> bytes:
    """16-byte hash of one full block given its parent's hash, the cache salt and its token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    if salt is None:
        h.update(b"\x00")
    else:
        salt_bytes = salt.encode()
        h.update(b"\x01" + len(salt_bytes).to_bytes(4, "little") + salt_bytes)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_keys(token_ids: Sequence[int], salt: str | None, block_size: int, start: int, stop: int) -> list[BlockKey]:
    """The keys of full blocks start .. stop - 1 of `token_ids` (the chain is hashed from the first block)."""
    keys: list[BlockKey] = []
    parent = unsalted = ROOT_HASH
    for i in range(stop):
        chunk = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = chain_hash(parent, salt, chunk)
        unsalted = parent if salt is None else chain_hash(unsalted, None, chunk)
        if i >= start:
            keys.append(BlockKey(parent, unsalted, salt, chunk))
    return keys


class BlockManager:
    """Block tables, ref counts, prefix hashes and the LRU of cached-free blocks for one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ConfigError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # plain free, taken first
        self._cached: OrderedDict[int, None] = OrderedDict()  # cached-free LRU, most recently freed last
        self._hash_to_block: dict[bytes, int] = {}
        self._salts: dict[bytes, set[str | None]] = {}  # unsalted chain hash -> salts of registered blocks
        self._evicted: OrderedDict[bytes, None] = OrderedDict()  # bounded record of evicted hashes
        self._seqs: dict[int, _SeqState] = {}
        self._num_shared = 0
        self._hits = 0
        self._queries = 0
        self._evictions = 0
        self.events: KVEventLog | None = None  # vLLM-format KV events, when a KVEventLog is attached

    # ---- counts -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: plain free plus cached-free (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks still holding a reusable hash."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockStats:
        return BlockStats(total=self.num_blocks, used=self.num_used_blocks, cached_free=len(self._cached),
                          free=len(self._free), shared=self._num_shared, hits=self._hits,
                          queries=self._queries, evictions=self._evictions)

    # ---- prefix matching ----------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> PrefixMatch:
        """The longest run of cached full blocks at the start of `token_ids`; no side effects.

        Never covers the whole prompt: at least one token is left to compute so the step yields logits.
        """
        if not token_ids:
            return PrefixMatch(0, [], None)
        if not self.enable_prefix_caching:
            return PrefixMatch(0, [], MissReason.DISABLED)
        bs = self.block_size
        block_ids: list[int] = []
        parent = ROOT_HASH
        for i in range(len(token_ids) // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, salt, chunk)
            b = self._hash_to_block.get(h)
            if b is None or self._blocks[b].tokens != chunk:
                return PrefixMatch(len(block_ids) * bs, block_ids, self._miss_reason(token_ids, salt, i, h))
            block_ids.append(b)
            parent = h
        if len(block_ids) * bs == len(token_ids):
            block_ids.pop()
            return PrefixMatch(len(block_ids) * bs, block_ids, MissReason.LAST_TOKEN)
        return PrefixMatch(len(block_ids) * bs, block_ids, MissReason.PARTIAL_BLOCK)

    def _miss_reason(self, token_ids: Sequence[int], salt: str | None, index: int, h: bytes) -> MissReason:
        """Why full block `index` (salted chain hash `h`) missed."""
        if h in self._evicted:
            return MissReason.EVICTED
        unsalted, bs = h, self.block_size
        if salt is not None:
            unsalted = ROOT_HASH
            for i in range(index + 1):
                unsalted = chain_hash(unsalted, None, token_ids[i * bs:(i + 1) * bs])
        if any(s != salt for s in self._salts.get(unsalted, ())):
            return MissReason.CACHE_SALT
        return MissReason.NO_MATCH

    # ---- sequence lifecycle -------------------------------------------------------------------------

    def max_cached_blocks(self, num_tokens: int) -> int:
        """The most full blocks a prompt of `num_tokens` may take from a cache (one token is left to compute)."""
        return max(0, num_tokens - 1) // self.block_size

    def allocate(self, seq_id: int, token_ids: Sequence[int], salt: str | None = None,
                 loaded: LoadedPrefix | None = None, reuse: bool = True) -> PrefixMatch | None:
        """Admit a sequence: reuse its cached prefix, add fresh blocks to cover `token_ids`. `loaded`: blocks a
        lower tier holds after the memory match; they are registered into fresh blocks (to be filled by the caller).
        `reuse` False: no prefix is reused (the whole text is computed; its blocks are still registered after).

        Returns None and changes nothing when the free blocks do not suffice.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        skip = not reuse and self.enable_prefix_caching
        match = PrefixMatch(0, [], MissReason.PROMPT_LOGPROBS) if skip else self.match_prefix(token_ids, salt)
        keys = self._loadable(match, loaded, len(token_ids))
        revived = sum(1 for b in match.block_ids if self._blocks[b].ref_count == 0)
        fresh = self.blocks_needed(len(token_ids)) - len(match.block_ids)
        if fresh + revived > self.num_free_blocks:
            return None
        for b in match.block_ids:  # revive before taking fresh blocks, so eviction cannot pick a match
            self._acquire(b)
        state = _SeqState(salt, list(match.block_ids))
        state.table.extend(self._take_free() for _ in range(fresh))
        parent = (self._blocks[match.block_ids[-1]].hash or ROOT_HASH) if match.block_ids else ROOT_HASH
        for i, key in enumerate(keys, start=len(match.block_ids)):
            self._register(state.table[i], key.chain_hash, key.unsalted, key.salt, key.tokens, parent)
            match.block_ids.append(state.table[i])
            parent = key.chain_hash
        if keys:
            match.num_loaded_tokens = len(keys) * self.block_size
            match.num_cached_tokens += match.num_loaded_tokens
            match.miss_reason = MissReason.LOADED_FROM_DISK
        if match.block_ids:
            last = self._blocks[match.block_ids[-1]]
            assert last.hash is not None and last.unsalted is not None
            state.num_hashed = len(match.block_ids)
            state.parent, state.parent_unsalted = last.hash, last.unsalted
        self._seqs[seq_id] = state
        self._hits += match.num_cached_tokens
        self._queries += len(token_ids)
        return match

    def _loadable(self, match: PrefixMatch, loaded: LoadedPrefix | None, num_tokens: int) -> list[BlockKey]:
        """The loaded blocks that extend `match`: none unless they start where it stopped on a full-block miss;
        cut at the first one memory registered meanwhile (its twin serves it) and at the prompt's last block."""
        if loaded is None or loaded.start != len(match.block_ids) or match.miss_reason not in (
                MissReason.NO_MATCH, MissReason.EVICTED, MissReason.CACHE_SALT):
            return []
        keys = loaded.keys[:self.max_cached_blocks(num_tokens) - loaded.start]
        for i, key in enumerate(keys):
            if key.chain_hash in self._hash_to_block:
                return keys[:i]
        return keys

    def ensure_capacity(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table of `seq_id` to cover `num_tokens`; False and no change if blocks run short."""
        table = self._seqs[seq_id].table
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free_blocks:
            return False
        table.extend(self._take_free() for _ in range(need))
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> list[tuple[int, BlockKey]]:
        """Register the chain hash of every full block of `seq_id` whose tokens all have KV now; returns the
        (block, key) pairs registered by this call.

        A block whose hash another block already registered stays unregistered (its twin serves hits).
        """
        state = self._seqs[seq_id]
        if num_computed_tokens > len(token_ids) or self.blocks_needed(num_computed_tokens) > len(state.table):
            raise ValueError(f"sequence {seq_id}: {num_computed_tokens} computed tokens exceed its tokens "
                             f"({len(token_ids)}) or its blocks ({len(state.table)})")
        registered: list[tuple[int, BlockKey]] = []
        if not self.enable_prefix_caching:
            return registered
        bs = self.block_size
        for i in range(state.num_hashed, num_computed_tokens // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(state.parent, state.salt, chunk)
            u = h if state.salt is None else chain_hash(state.parent_unsalted, None, chunk)
            if h not in self._hash_to_block:
                self._register(state.table[i], h, u, state.salt, chunk, state.parent)
                registered.append((state.table[i], BlockKey(h, u, state.salt, chunk)))
            state.num_hashed, state.parent, state.parent_unsalted = i + 1, h, u
        return registered

    def free(self, seq_id: int) -> None:
        """Release a finished, aborted or preempted sequence's blocks."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            raise KeyError(f"unknown sequence {seq_id}")
        # Tail blocks first, so the LRU evicts a chain's tail before its (more shareable) head.
        for b in reversed(state.table):
            if b != HOLE:
                self._release(b)

    def drop_blocks(self, seq_id: int, indices: range) -> int:
        """Release the blocks at table `indices` (those that exist), leaving holes; returns how many.

        A window slides one way, so each call's range extends the last one's: indices below the furthest
        stop already dropped are skipped, and a step costs the blocks it frees, not the text's length."""
        state = self._seqs[seq_id]
        if state.num_hashed:
            raise ValueError(f"sequence {seq_id} has hashed blocks; only unhashed tables may have holes")
        dropped = 0
        for i in range(max(indices.start, state.dropped_until), min(indices.stop, len(state.table))):
            if state.table[i] != HOLE:
                self._release(state.table[i])
                state.table[i] = HOLE
                dropped += 1
        state.dropped_until = max(state.dropped_until, min(indices.stop, len(state.table)))
        return dropped

    def num_held(self, seq_id: int) -> int:
        """Blocks `seq_id` holds (holes not counted)."""
        return sum(1 for b in self._seqs[seq_id].table if b != HOLE)

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of all free blocks (they become plain free) and the eviction record."""
        for b in self._cached:
            self._unregister(b)
            self._free.append(b)
        self._cached.clear()
        self._evicted.clear()

    # ---- lookups ------------------------------------------------------------------------------------

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seqs[seq_id].table)

    def slot(self, seq_id: int, position: int) -> int:
        """The pool slot holding the KV of `position` in `seq_id`."""
        if position < 0:
            raise IndexError(f"position must be >= 0, got {position}")
        bs = self.block_size
        return self._seqs[seq_id].table[position // bs] * bs + position % bs

    def registered_hashes(self) -> list[bytes]:
        """Chain hashes of every block a prompt can reuse now (held or cached-free); what a router may know."""
        return list(self._hash_to_block)

    def registered_chain(self) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
        """(hash, parent hash, token ids) of every registered block, in the order they were registered."""
        return [(h, self._blocks[b].parent, self._blocks[b].tokens) for h, b in self._hash_to_block.items()]

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # ---- block state transitions --------------------------------------------------------------------

    def _acquire(self, b: int) -> None:
        block = self._blocks[b]
        block.ref_count += 1
        if block.ref_count == 1:
            del self._cached[b]
        elif block.ref_count == 2:
            self._num_shared += 1

    def _release(self, b: int) -> None:
        block = self._blocks[b]
        block.ref_count -= 1
        if block.ref_count == 1:
            self._num_shared -= 1
        elif block.ref_count == 0:
            if block.hash is not None:
                self._cached[b] = None
            else:
                self._free.append(b)

    def _take_free(self) -> int:
        """A fresh private block: plain free first, else evict the least recently freed cached block."""
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._cached.popitem(last=False)
            h = self._blocks[b].hash
            assert h is not None
            self._unregister(b)
            self._evicted[h] = None
            self._evicted.move_to_end(h)
            if len(self._evicted) > EVICTED_RECORD_SIZE:
                self._evicted.popitem(last=False)
            self._evictions += 1
        self._blocks[b].ref_count = 1
        return b

    def _register(self, b: int, h: bytes, unsalted: bytes, salt: str | None, tokens: tuple[int, ...],
                  parent: bytes) -> None:
        block = self._blocks[b]
        assert block.hash is None, f"block {b} is already registered"
        block.hash, block.unsalted, block.salt, block.tokens, block.parent = h, unsalted, salt, tokens, parent
        self._hash_to_block[h] = b
        self._salts.setdefault(unsalted, set()).add(salt)
        self._evicted.pop(h, None)
        if self.events is not None:
            self.events.stored(h, parent, tokens)

    def _unregister(self, b: int) -> None:
        block = self._blocks[b]
        assert block.hash is not None and block.unsalted is not None
        if self.events is not None:
            self.events.removed(block.hash)
        del self._hash_to_block[block.hash]
        salts = self._salts[block.unsalted]
        salts.discard(block.salt)
        if not salts:
            del self._salts[block.unsalted]
        block.hash, block.unsalted, block.salt, block.tokens, block.parent = None, None, None, (), b""

    # ---- consistency --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert internal consistency (scans the whole pool; for tests)."""
        free, cached = list(self._free), list(self._cached)
        assert len(set(free)) == len(free), "a block is twice in the free list"
        assert not set(free) & set(cached), "a block is both plain free and cached-free"
        holders = [0] * self.num_blocks
        for seq_id, state in self._seqs.items():
            held = [b for b in state.table if b != HOLE]
            assert len(set(held)) == len(held), f"sequence {seq_id} holds a block twice"
            assert not (held != state.table and state.num_hashed), f"sequence {seq_id} hashed a table with holes"
            for b in held:
                holders[b] += 1
        for b, block in enumerate(self._blocks):
            assert block.ref_count == holders[b], f"block {b}: ref {block.ref_count} != holders {holders[b]}"
        used = {b for b, n in enumerate(holders) if n > 0}
        assert not used & (set(free) | set(cached)), "a used block is in a free list"
        assert len(used) + len(free) + len(cached) == self.num_blocks, "a block is in no state"
        assert self._num_shared == sum(1 for n in holders if n > 1), "shared count drifted"
        for b in free:
            assert self._blocks[b].hash is None, f"plain free block {b} has a hash"
        for b in cached:
            assert self._blocks[b].hash is not None, f"cached-free block {b} has no hash"
        registered = {b: block for b, block in enumerate(self._blocks) if block.hash is not None}
        assert self.enable_prefix_caching or not registered, "hashes while prefix caching is off"
        assert len(self._hash_to_block) == len(registered), "hash table and block hashes disagree"
        salts: dict[bytes, set[str | None]] = {}
        for b, block in registered.items():
            assert block.hash is not None and block.unsalted is not None
            assert self._hash_to_block.get(block.hash) == b, f"hash table misses block {b}"
            assert len(block.tokens) == self.block_size, f"registered block {b} is not full"
            salts.setdefault(block.unsalted, set()).add(block.salt)
        assert salts == self._salts, "salt index drifted"
        for state in self._seqs.values():
            assert state.num_hashed <= len(state.table)
