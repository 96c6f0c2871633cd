"""KV cache events in vLLM's format: what a router built for vLLM (llm-d's KV-cache-aware scheduler, LMCache's
controller) reads to know which blocks an engine holds. Pure Python; msgpack only to encode.

A KVEventLog attached to a BlockManager (`attach`) records each block the prefix cache registers (BlockStored: its
chain hash, its parent's, its token ids) and each it drops (BlockRemoved: evicted, or forgotten by
reset_prefix_cache); attaching records AllBlocksCleared and then what the manager holds, so a subscriber drops
whatever it knew of this engine (a restarted replica) and learns its state. A log nobody drains does not grow
without bound: past `max_events` it is replaced by that snapshot again (one event per registered block at most).
Consecutive stores of one chain merge into one BlockStored, as vLLM's do. `take()` hands the events recorded since
the last call; `encode_batch` packs them as vLLM's KVEventBatch.

The schema is vllm/distributed/kv_events.py's: each event a msgpack map tagged by `type` (msgspec's tag=True)
with BlockStored's required fields block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name, and BlockRemoved's block_hashes, medium; the batch a map {ts, events[, data_parallel_rank]}. vLLM
releases before the change to maps (and llm-d's decoder of that time) read arrays: `array_like=True` packs
[ts, events] with each event ["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium].

Block hashes are kvengine's 16-byte blake2b chain hashes, sent as bytes (vLLM's ExternalBlockHash is bytes or
int): a consumer matches them as opaque keys, or recomputes them with cache.block_manager.chain_hash; vLLM's
own sha256 hashing of prompts would not reproduce them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvengine.cache.block_manager import BlockManager

MEDIUM = "CPU"  # where kvengine's pool lives (vLLM says "GPU" for its device pool)
STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")


class KVEventLog:
    """Events of one BlockManager since the last `take`, as vLLM-schema dicts."""

    def __init__(self, block_size: int, root_hash: bytes, medium: str = MEDIUM, max_events: int = 10_000) -> None:
        self.block_size = block_size
        self.root_hash = root_hash  # the parent of a chain's first block: sent as None
        self.medium = medium
        self.max_events = max_events
        self._events: list[dict[str, Any]] = []
        self._manager: BlockManager | None = None
        self._limit = max_events

    def attach(self, manager: BlockManager) -> None:
        """Record every later register/unregister of `manager`, after AllBlocksCleared and what it holds now."""
        self._manager = manager
        manager.events = self
        self._snapshot()

    def stored(self, block_hash: bytes, parent: bytes, tokens: Sequence[int]) -> None:
        self._store(block_hash, parent, tokens)
        self._bound()

    def removed(self, block_hash: bytes) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last["type"] == "BlockRemoved":
            last["block_hashes"].append(block_hash)
            return
        self._events.append({"type": "BlockRemoved", "block_hashes": [block_hash], "medium": self.medium})
        self._bound()

    def _store(self, block_hash: bytes, parent: bytes, tokens: Sequence[int]) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last["type"] == "BlockStored" and last["block_hashes"][-1] == parent:
            last["block_hashes"].append(block_hash)
            last["token_ids"].extend(tokens)
            return
        self._events.append({"type": "BlockStored", "block_hashes": [block_hash],
                             "parent_block_hash": None if parent == self.root_hash else parent,
                             "token_ids": list(tokens), "block_size": self.block_size, "lora_id": None,
                             "medium": self.medium, "lora_name": None})

    def _bound(self) -> None:
        """Nobody took the events for long: replace them by a snapshot (at most one event per block)."""
        if len(self._events) > self._limit and self._manager is not None:
            self._snapshot()

    def _snapshot(self) -> None:
        assert self._manager is not None
        self._events = [{"type": "AllBlocksCleared"}]
        for block_hash, parent, tokens in self._manager.registered_chain():
            self._store(block_hash, parent, tokens)
        self._limit = max(self.max_events, 2 * len(self._events))  # a large snapshot is not redone every event

    def take(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


def encode_batch(events: list[dict[str, Any]], ts: float | None = None, data_parallel_rank: int | None = None,
                 array_like: bool = False) -> bytes:
    """vLLM's KVEventBatch as msgpack bytes (the payload of its ZMQ publisher's [topic, seq, payload])."""
    import msgpack

    ts = time.time() if ts is None else ts
    if array_like:
        packed: Any = [ts, [_as_array(e) for e in events]]
        if data_parallel_rank is not None:
            packed.append(data_parallel_rank)
    else:
        packed = {"ts": ts, "events": events}
        if data_parallel_rank is not None:
            packed["data_parallel_rank"] = data_parallel_rank
    return msgpack.packb(packed, use_bin_type=True)


def _as_array(event: dict[str, Any]) -> list[Any]:
    """The array form of one event: its tag, then its fields in declaration order (older vLLM, no lora_name)."""
    kind = event["type"]
    if kind == "BlockStored":
        return [kind, *(event[f] for f in STORED_FIELDS[:-1])]
    if kind == "BlockRemoved":
        return [kind, event["block_hashes"], event["medium"]]
    return [kind]
