"""A replica's KV event log on a real engine (no Ray): the events of two requests sharing a prefix, in vLLM's
schema, replay to exactly the blocks the engine's prefix cache holds."""

from __future__ import annotations

import msgpack

from kvengine.cache.block_manager import ROOT_HASH, chain_hash
from kvengine.cache.kv_events import encode_batch
from kvengine.cluster.replica import attach_event_log
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams


def test_engine_events_replay_to_the_prefix_cache(cluster_model):
    llm = LLM(str(cluster_model), quiet=True, kv_cache_memory=1 << 20, num_threads=1)
    log = attach_event_log(llm.engine)
    manager = llm.engine.block_tables.manager
    bs = manager.block_size
    shared = list(range(10, 10 + 2 * bs))
    params = SamplingParams(max_tokens=2, temperature=0)
    llm.generate(prompt_token_ids=[shared + [5, 6, 7]], sampling_params=params)
    llm.generate(prompt_token_ids=[shared + [8] * bs + [9]], sampling_params=params)
    batch = msgpack.unpackb(encode_batch(log.take()))
    events = batch["events"]
    assert events[0] == {"type": "AllBlocksCleared"}
    first = chain_hash(ROOT_HASH, None, shared[:bs])
    stored = [e for e in events if e["type"] == "BlockStored"]
    second = chain_hash(first, None, shared[bs:])
    assert stored[0]["block_hashes"][:2] == [first, second]
    assert stored[0]["parent_block_hash"] is None and stored[0]["block_size"] == bs
    assert stored[0]["token_ids"][:2 * bs] == shared
    # the second prompt's own full block extends the same chain (merged into the event, as vLLM batches them)
    assert chain_hash(second, None, [8] * bs) in {h for e in stored for h in e["block_hashes"]}
    live: set[bytes] = set()
    for e in events:
        if e["type"] == "BlockStored":
            live.update(e["block_hashes"])
        elif e["type"] == "BlockRemoved":
            live.difference_update(e["block_hashes"])
    assert live == set(manager.registered_hashes())
