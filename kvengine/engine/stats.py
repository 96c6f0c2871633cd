"""EngineStats: a snapshot of the engine and its KV pool, for /metrics, the dashboard and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestBlocks:
    """One live request's share of the pool."""

    request_id: str
    status: str  # "waiting" or "running"
    blocks: int  # blocks in its table
    shared_blocks: int  # of those, blocks other requests hold too (prefix sharing)
    tokens: int  # prompt + generated so far
    computed_tokens: int  # tokens whose KV is in the pool
    cached_tokens: int  # prompt tokens it got from the prefix cache


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    blocks_total: int
    blocks_used: int  # held by at least one request
    blocks_cached_free: int  # free, but still holding a reusable prefix (evicted only when needed)
    blocks_free: int  # free with nothing reusable
    blocks_shared: int  # held by more than one request
    block_size: int
    kv_dtype: str
    bytes_per_token: float
    bytes_per_block: float
    pool_bytes: int
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache, since start
    prefix_query_tokens: int  # prompt tokens admitted, since start
    prefix_evictions: int
    tokens_generated: int
    preemptions: int
    steps: int
    requests: list[RequestBlocks] = field(default_factory=list)
    disk: dict[str, Any] | None = None  # the KV disk tier's counters (KVDiskTier.to_dict), None without one

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        """Blocks held by a request / blocks in the pool."""
        return self.blocks_used / max(1, self.blocks_total)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefix_hit_rate"] = self.prefix_hit_rate
        return data
