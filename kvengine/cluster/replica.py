"""EngineReplica: one kvengine engine (an LLM and its engine thread) as a Ray Serve replica.

`generate(RoutedRequest)` streams: first an Accepted (which replica, its pid) once the engine took the
request, or the KVEngineError that refused it (yielded, not raised, so the frontend gets the exact error back
rather than Ray's wrapper); then (choice index, RequestOutput) pairs. Closing the stream (the client left, or
the frontend cancelled it) aborts the engine requests. `record_routing_stats` is what Ray Serve hands the
router every period: the block keys this replica can reuse now and its engine stats. `kv_events` drains the
replica's KV events in vLLM's msgpack format (cache/kv_events.py), for a router built on them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvengine.cache.block_manager import ROOT_HASH
from kvengine.cache.kv_events import KVEventLog, encode_batch
from kvengine.cluster.request import RoutedRequest, block_key
from kvengine.engine.config import EngineConfig
from kvengine.engine.engine import LLMEngine
from kvengine.engine.output import RequestOutput
from kvengine.errors import KVEngineError
from kvengine.server.async_engine import AsyncEngine, EngineUnavailable


@dataclass(frozen=True, slots=True)
class Accepted:
    replica: str
    pid: int


class EngineReplica:
    def __init__(self, model: str | None, engine: EngineConfig, max_waiting: int) -> None:
        from ray import serve

        from kvengine.cluster.loopback import replica_grpc_on_loopback
        from kvengine.llm import LLM

        replica_grpc_on_loopback()
        self.llm = LLM(model, quiet=True, **dataclasses.asdict(engine))
        self.events = attach_event_log(self.llm.engine)  # before the engine thread runs
        self.engine = AsyncEngine(self.llm.engine, max_waiting=max_waiting)
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def describe(self) -> dict[str, Any]:
        e = self.llm.engine
        return {"replica": self.replica, "pid": os.getpid(), "model_name": self.llm.model_name,
                "max_model_len": e.max_model_len, "max_num_seqs": e.scheduler.max_num_seqs,
                "block_size": e.block_tables.block_size, "num_blocks": e.block_tables.num_blocks}

    async def generate(self, request: RoutedRequest) -> AsyncIterator[Accepted | KVEngineError | tuple]:
        try:
            group = await self.engine.add(request.request_ids, request.prompt_token_ids, request.params,
                                          request.cache_salt)
        except KVEngineError as e:
            yield e
            return
        yield Accepted(self.replica, os.getpid())
        try:
            async for index, out in group.outputs():
                yield index, _lean(out)
        except KVEngineError as e:
            yield e
        finally:
            if not group.done:
                self.engine.abort(group)

    async def stats(self) -> dict[str, Any]:
        return await self.engine.call(lambda engine: _stats(engine))

    async def record_routing_stats(self) -> dict[str, Any]:
        def take(engine: LLMEngine) -> dict[str, Any]:
            keys = [block_key(h) for h in engine.block_tables.manager.registered_hashes()]
            return {"replica": self.replica, "pid": os.getpid(), "keys": keys, "stats": _stats(engine)}
        return await self.engine.call(take)

    async def kv_events(self, array_like: bool = False) -> bytes:
        """This replica's KV events since the last call, as vLLM's msgpack KVEventBatch (cache/kv_events.py)."""
        return await self.engine.call(lambda engine: encode_batch(self.events.take(), array_like=array_like))

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose engine thread died."""
        if not self.engine.alive:
            raise EngineUnavailable(f"replica {self.replica}: the engine thread stopped ({self.engine.error!r})")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)


def attach_event_log(engine: LLMEngine) -> KVEventLog:
    """A KVEventLog on `engine`'s block manager (call it where nothing else touches the manager)."""
    manager = engine.block_tables.manager
    log = KVEventLog(manager.block_size, ROOT_HASH)
    log.attach(manager)
    return log


def _stats(engine: LLMEngine) -> dict[str, Any]:
    stats = engine.stats()
    stats.requests = []  # per-request rows stay on the replica
    return dataclasses.asdict(stats)


def _lean(out: RequestOutput) -> RequestOutput:
    """The output without the prompt's token ids, which every token would otherwise carry over the wire."""
    return dataclasses.replace(out, prompt_token_ids=[]) if out.prompt_token_ids else out
