"""BlockIndex, prompt block keys and the routing policy: pure Python, no Ray."""

from __future__ import annotations

import random

from kvengine.cache.block_manager import BlockManager
from kvengine.cluster.block_index import BlockIndex
from kvengine.cluster.policy import Balance, RecentLoad, choose
from kvengine.cluster.request import block_key, prompt_block_keys


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_the_engines_chain_hashes_and_the_salt_changes_them():
    tokens = list(range(100, 150))  # 3 full blocks of 16 and 2 tokens
    bm = BlockManager(8, 16)
    bm.allocate(1, tokens, salt="tenant-a")
    bm.commit(1, tokens, len(tokens))
    keys = prompt_block_keys(tokens, "tenant-a", 16)
    assert len(keys) == 3 and set(keys) == {block_key(h) for h in bm.registered_hashes()}
    assert not set(prompt_block_keys(tokens, None, 16)) & set(keys)
    assert prompt_block_keys(tokens[:40], "tenant-a", 16) == keys[:2]  # a chain: a prefix has the prefix's keys


def test_longest_run_of_leading_blocks_per_replica():
    index = BlockIndex()
    a, b, c, d = (bytes([i]) * 8 for i in range(4))
    index.report("r1", [a, b, c])
    index.report("r2", [a, c, d])  # holds c but not b: c's chain cannot be reused there
    assert index.matches([a, b, c, d], ["r1", "r2", "r3"]) == {"r1": 3, "r2": 1, "r3": 0}
    index.report("r1", [a])  # evicted b and c
    assert index.matches([a, b, c], ["r1", "r2"]) == {"r1": 1, "r2": 1}


def test_pending_blocks_count_until_reported_or_expired():
    clock = Clock()
    index = BlockIndex(pending_ttl_s=10, clock=clock)
    keys = [bytes([i]) * 8 for i in range(4)]
    index.add_pending("r1", keys)
    assert index.matches(keys, ["r1", "r2"]) == {"r1": 4, "r2": 0}
    index.report("r1", keys[:2])  # stored two so far; the rest stays pending
    assert index.num_keys("r1", pending=True) == 2 and index.matches(keys, ["r1"]) == {"r1": 4}
    clock.now = 11
    assert index.matches(keys, ["r1"]) == {"r1": 2}
    index.report("r1", keys[:2])
    assert index.num_keys("r1", pending=True) == 0


def test_recent_load_decays_with_its_half_life():
    clock = Clock()
    recent = RecentLoad(half_life_s=10, clock=clock)
    recent.add("a")
    recent.add("a")
    clock.now = 10
    assert abs(recent.get("a") - 1.0) < 1e-9 and recent.get("b") == 0
    recent.forget("a")
    assert recent.get("a") == 0


def test_a_dead_replica_is_forgotten():
    index = BlockIndex()
    keys = [bytes([i]) * 8 for i in range(3)]
    index.report("r1", keys)
    index.add_pending("r2", keys)
    index.forget("r1")
    index.forget("r2")
    assert index.replicas() == set() and index.matches(keys, ["r1", "r2"]) == {"r1": 0, "r2": 0}


def test_policy_prefers_the_longest_match_then_the_least_loaded():
    rng = random.Random(0)
    assert choose({"a": 3, "b": 1}, {"a": 2, "b": 0}, Balance(1.5, 2), rng) == "a"
    assert choose({"a": 2, "b": 2}, {"a": 2, "b": 1}, Balance(1.5, 2), rng) == "b"
    assert choose({}, {"a": 4, "b": 1, "c": 3}, Balance(1.5, 2), rng) == "b"
    assert choose({"a": 5}, {"a": 0.2, "b": 0.0}, Balance(1.0, 0), rng) == "b"  # under one request: the idlest


def test_policy_spills_a_hot_prefix_once_its_holder_is_over_the_bound():
    balance = Balance(max_over_mean=1.5, slack=2)
    # 2 replicas, 10 in flight on the holder: with this request the mean is 5.5, the bound 10.25
    assert choose({"a": 5}, {"a": 10, "b": 0}, balance) == "b"
    assert choose({"a": 5}, {"a": 6, "b": 0}, balance) == "a"  # 7 <= 1.5 * 3.5 + 2
    loads = {f"r{i}": 0 for i in range(64)}
    for _ in range(640):  # every request shares one prefix, held by whoever took one before
        held = {r: 5 for r, n in loads.items() if n}
        loads[choose(held, loads, balance)] += 1
    mean = 640 / 64
    assert max(loads.values()) <= 1.5 * mean + 2  # nobody above the bound; the prefix spread to many replicas
    assert sum(1 for n in loads.values() if n) >= 64 / (1.5 + 2 / mean)
