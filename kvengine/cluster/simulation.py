"""The router at scale without models: 64-128 simulated replicas, each a real BlockManager (so blocks are
stored, shared and evicted exactly as in an engine) behind a FIFO server whose service time is a cost per
uncached prompt token plus one per output token. Requests arrive as a Poisson process sized for a target
utilization (as if nothing were cached). Replicas report their block keys every `report_period_s` (simulated),
as Ray Serve's routing stats do; the kvengine router is the same BlockIndex and policy as router.py.

Per router: prefix hit rate, and the load of each replica as requests served and as busy seconds (work), whose
largest over the mean is the balance figure.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from kvengine.cache.block_manager import BlockManager
from kvengine.cluster.block_index import BlockIndex
from kvengine.cluster.policy import Balance, RecentLoad, choose
from kvengine.cluster.request import block_key, prompt_block_keys
from kvengine.cluster.trace import TraceRequest

SIM_ROUTERS = ("kvengine", "kvengine_no_pending", "round_robin", "power_of_two")


@dataclass(frozen=True, slots=True)
class SimConfig:
    replicas: int = 64
    blocks_per_replica: int = 128
    block_size: int = 16
    utilization: float = 0.7  # offered load with no cache hits, as a fraction of the replicas' capacity
    prefill_s_per_token: float = 0.002
    decode_s_per_token: float = 0.02
    report_period_s: float = 1.0
    balance: Balance = Balance()
    load_half_life_s: float = 10.0
    seed: int = 0


@dataclass(slots=True)
class _Replica:
    name: str
    bm: BlockManager
    queue: deque = field(default_factory=deque)
    in_flight: int = 0
    served: int = 0
    busy_s: float = 0.0


@dataclass(slots=True)
class SimResult:
    router: str
    replicas: int
    hit_rate: float
    max_over_mean_requests: float
    max_over_mean_work: float
    mean_wait_s: float  # time from arrival to the start of service

    def to_dict(self) -> dict[str, float | int | str]:
        return {name: getattr(self, name) for name in self.__slots__}


def simulate(trace: list[TraceRequest], config: SimConfig, router: str) -> SimResult:
    """Replay `trace` (Poisson arrivals) through `router` onto `config.replicas` simulated replicas."""
    if router not in SIM_ROUTERS:
        raise ValueError(f"unknown simulated router '{router}'")
    return _Simulation(trace, config, router).run()


class _Simulation:
    """One run's state: the replicas, the router's view of them, and a heap of (time, order, kind, item) events."""

    def __init__(self, trace: list[TraceRequest], config: SimConfig, router: str) -> None:
        self.config, self.router, self.trace = config, router, trace
        self.rng = random.Random(config.seed)
        self.replicas = [_Replica(f"r{i}", BlockManager(config.blocks_per_replica, config.block_size))
                         for i in range(config.replicas)]
        self.by_name = {r.name: r for r in self.replicas}
        self.now = 0.0
        self.index = BlockIndex(pending_ttl_s=0.0 if router == "kvengine_no_pending" else 30.0,
                                clock=lambda: self.now)
        self.recent = RecentLoad(config.load_half_life_s, clock=lambda: self.now)
        self.events: list[tuple[float, int, str, object]] = []
        self.order, self.seq_ids, self.turns = itertools.count(), itertools.count(), itertools.count()
        self.cached = self.prompt = 0
        self.waits: list[float] = []

    def push(self, at: float, kind: str, item: object) -> None:
        heapq.heappush(self.events, (at, next(self.order), kind, item))

    def run(self) -> SimResult:
        config, trace = self.config, self.trace
        mean_cost = sum(_cost(config, len(r.token_ids), r.max_tokens) for r in trace) / len(trace)
        rate = config.utilization * config.replicas / mean_cost
        t = 0.0
        for request in trace:
            t += self.rng.expovariate(rate)
            self.push(t, "arrive", request)
        self.push(0.0, "report", None)
        left = len(trace)
        while left:
            self.now, _, kind, item = heapq.heappop(self.events)
            if kind == "report":
                self.report()
            elif kind == "arrive":
                self.arrive(item)  # type: ignore[arg-type]
            else:
                self.finish(*item)  # type: ignore[misc]
                left -= 1
        return self.result()

    def report(self) -> None:
        for r in self.replicas:
            self.index.report(r.name, [block_key(h) for h in r.bm.registered_hashes()])
        self.push(self.now + self.config.report_period_s, "report", None)

    def arrive(self, request: TraceRequest) -> None:
        keys = (prompt_block_keys(request.token_ids, None, self.config.block_size)
                if self.router.startswith("kvengine") else [])
        name = _route(self.router, keys, self.replicas, self.index, self.recent, self.config.balance, self.rng,
                      next(self.turns))
        replica = self.by_name[name]
        self.recent.add(name)
        if keys:
            self.index.add_pending(name, keys)
        replica.in_flight += 1
        replica.served += 1
        replica.queue.append((self.now, request))
        if len(replica.queue) == 1:
            self.start(replica)

    def start(self, replica: _Replica) -> None:
        """Serve the request at the head of `replica`'s queue: its prefix hit, then its cost in busy time."""
        arrival, request = replica.queue[0]
        seq = next(self.seq_ids)
        match = replica.bm.allocate(seq, request.token_ids)
        assert match is not None, "a request larger than a replica's pool"
        self.cached += match.num_cached_tokens
        self.prompt += len(request.token_ids)
        replica.bm.commit(seq, request.token_ids, len(request.token_ids))
        cost = _cost(self.config, len(request.token_ids) - match.num_cached_tokens, request.max_tokens)
        replica.busy_s += cost
        self.waits.append(self.now - arrival)
        self.push(self.now + cost, "finish", (replica, seq))

    def finish(self, replica: _Replica, seq: int) -> None:
        replica.bm.free(seq)
        replica.queue.popleft()
        replica.in_flight -= 1
        if replica.queue:
            self.start(replica)

    def result(self) -> SimResult:
        served = [r.served for r in self.replicas]
        busy = [r.busy_s for r in self.replicas]
        return SimResult(self.router, self.config.replicas, self.cached / self.prompt,
                         max(served) / (sum(served) / len(served)), max(busy) / (sum(busy) / len(busy)),
                         sum(self.waits) / len(self.waits))


def _route(router: str, keys: list[bytes], replicas: list[_Replica], index: BlockIndex, recent: RecentLoad,
           balance: Balance, rng: random.Random, turn: int) -> str:
    if router == "round_robin":
        return replicas[turn % len(replicas)].name
    if router == "power_of_two":
        a, b = rng.sample(replicas, 2)
        return (a if a.in_flight <= b.in_flight else b).name
    loads = {r.name: r.in_flight + recent.get(r.name) for r in replicas}
    return choose(index.matches(keys, loads), loads, balance, rng)


def _cost(config: SimConfig, uncached_tokens: int, output_tokens: int) -> float:
    return uncached_tokens * config.prefill_s_per_token + output_tokens * config.decode_s_per_token
