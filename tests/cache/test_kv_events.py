"""KV events in vLLM's format from a BlockManager: every register/evict/reset becomes BlockStored/BlockRemoved,
and replaying the events rebuilds exactly the manager's registered hashes."""

from __future__ import annotations

import msgpack

from kvengine.cache.block_manager import ROOT_HASH, BlockManager, chain_hash
from kvengine.cache.kv_events import KVEventLog, encode_batch

BS = 4


def _attached(num_blocks: int = 8) -> tuple[BlockManager, KVEventLog]:
    manager = BlockManager(num_blocks, BS)
    log = KVEventLog(BS, ROOT_HASH)
    log.attach(manager)
    return manager, log


def _run(manager: BlockManager, seq: int, tokens: list[int]) -> None:
    assert manager.allocate(seq, tokens) is not None
    manager.commit(seq, tokens, len(tokens))
    manager.free(seq)


def _replay(events: list[dict], live: set[bytes]) -> set[bytes]:
    for e in events:
        if e["type"] == "AllBlocksCleared":
            live.clear()
        elif e["type"] == "BlockStored":
            live.update(e["block_hashes"])
        else:
            live.difference_update(e["block_hashes"])
    return live


def test_stored_events_carry_the_chain_in_vllms_map_schema():
    manager, log = _attached()
    tokens = list(range(10, 20))  # 2 full blocks and 2 tokens
    _run(manager, 1, tokens)
    _run(manager, 2, tokens[:4] + [99, 98, 97, 96, 95])  # shares block 0, stores one new block
    batch = msgpack.unpackb(encode_batch(log.take(), ts=1.5))
    h0 = chain_hash(ROOT_HASH, None, tokens[:4])
    h1 = chain_hash(h0, None, tokens[4:8])
    assert batch["ts"] == 1.5 and "data_parallel_rank" not in batch
    assert batch["events"] == [
        {"type": "AllBlocksCleared"},
        {"type": "BlockStored", "block_hashes": [h0, h1], "parent_block_hash": None, "token_ids": tokens[:8],
         "block_size": BS, "lora_id": None, "medium": "CPU", "lora_name": None},
        {"type": "BlockStored", "block_hashes": [chain_hash(h0, None, [99, 98, 97, 96])], "parent_block_hash": h0,
         "token_ids": [99, 98, 97, 96], "block_size": BS, "lora_id": None, "medium": "CPU", "lora_name": None}]
    assert log.take() == []


def test_evictions_and_reset_are_removed_events_and_replay_matches_the_manager():
    manager, log = _attached(num_blocks=8)
    live: set[bytes] = set()
    for seq in range(6):  # 6 prompts of 3 blocks into 8 blocks: the older ones are evicted
        _run(manager, seq, [seq * 100 + t for t in range(3 * BS)])
        events = log.take()
        assert _replay(events, live) == set(manager.registered_hashes())
    assert any(e["type"] == "BlockRemoved" for e in events)
    manager.reset_prefix_cache()
    removed = log.take()
    assert [e["type"] for e in removed] == ["BlockRemoved"] and _replay(removed, live) == set() == set(
        manager.registered_hashes())


def test_array_form_for_older_vllm():
    manager, log = _attached()
    _run(manager, 1, list(range(BS)))
    ts, events = msgpack.unpackb(encode_batch(log.take(), ts=2.0, array_like=True))
    h = chain_hash(ROOT_HASH, None, list(range(BS)))
    assert ts == 2.0 and events == [["AllBlocksCleared"], ["BlockStored", [h], None, list(range(BS)), BS, None, "CPU"]]
    assert msgpack.unpackb(encode_batch([], ts=3.0, data_parallel_rank=1)) == {"ts": 3.0, "events": [],
                                                                                "data_parallel_rank": 1}


def test_attaching_late_and_an_undrained_log_give_a_snapshot_that_replays_to_the_manager():
    manager = BlockManager(8, BS)
    _run(manager, 1, list(range(3 * BS)))  # registered before any log is attached
    log = KVEventLog(BS, ROOT_HASH, max_events=3)
    log.attach(manager)
    first = log.take()
    assert first[0] == {"type": "AllBlocksCleared"} and len(first) == 2  # one chain: one merged BlockStored
    live = _replay(first, set())
    assert live == set(manager.registered_hashes())
    for seq in range(2, 12):  # nobody drains: past 3 events the log becomes a snapshot again
        _run(manager, seq, [seq * 100 + t for t in range(2 * BS)])
    events = log.take()
    assert events[0] == {"type": "AllBlocksCleared"}  # drained, the log would start with this run's events
    assert _replay(events, live) == set(manager.registered_hashes())
