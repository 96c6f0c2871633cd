"""The multi-tenant trace of `kvengine bench cluster`: a few long system prompts (tenants), many users, each
request one tenant's system prompt (Zipf-distributed: a few tenants are hot) plus a user message of its own.
Token ids are drawn from the model's vocabulary (seeded), so the real bench and the simulation see the same
block structure. Pure Python.

The ideal hit rate is what a router achieves that sends every request where its system prompt is cached, with
room for every prompt: every request after a tenant's first reuses the system prompt's full blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceConfig:
    tenants: int = 16
    system_tokens: int = 384
    user_tokens: tuple[int, int] = (16, 48)  # inclusive range
    max_tokens: int = 8
    requests: int = 128
    zipf_s: float = 0.3
    seed: int = 0


@dataclass(frozen=True, slots=True)
class TraceRequest:
    tenant: int
    token_ids: list[int]
    max_tokens: int


def make_trace(config: TraceConfig, vocab: tuple[int, int]) -> list[TraceRequest]:
    """`config.requests` requests with token ids in [vocab[0], vocab[1])."""
    rng = random.Random(config.seed)
    low, high = vocab
    systems = [[rng.randrange(low, high) for _ in range(config.system_tokens)] for _ in range(config.tenants)]
    weights = [1 / (k + 1) ** config.zipf_s for k in range(config.tenants)]
    trace = []
    for tenant in rng.choices(range(config.tenants), weights, k=config.requests):
        user = [rng.randrange(low, high) for _ in range(rng.randint(*config.user_tokens))]
        trace.append(TraceRequest(tenant, systems[tenant] + user, config.max_tokens))
    return trace


def ideal_hit_rate(trace: list[TraceRequest], system_tokens: int, block_size: int) -> float:
    """Cached prompt tokens / prompt tokens if every request after a tenant's first reused its system prompt."""
    seen: set[int] = set()
    cached = 0
    for r in trace:
        if r.tenant in seen:
            cached += system_tokens // block_size * block_size
        seen.add(r.tenant)
    return cached / sum(len(r.token_ids) for r in trace)
