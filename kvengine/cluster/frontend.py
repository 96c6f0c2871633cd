"""The cluster's HTTP ingress: the same OpenAI app as `kvengine serve` (server/app.py) over ReplicaBackend,
which sends each request to the engine deployment through a Ray Serve handle (its request router picks the
replica) and feeds the replica's stream into the app's RequestGroup.

A replica that dies before it accepted a request: the request is retried once on another replica. A replica
that dies while streaming: the request ends with a clean 503 (in-band for a stream whose headers are sent).
No request waits forever: the accept step has a timeout, and a dead replica's stream raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from kvengine.cluster.loopback import replica_grpc_on_loopback
from kvengine.cluster.replica import Accepted
from kvengine.cluster.request import RoutedRequest, prompt_block_keys
from kvengine.engine.stats import EngineStats
from kvengine.errors import KVEngineError
from kvengine.sampling import SamplingParams
from kvengine.server.app import create_backend_app
from kvengine.server.async_engine import EngineUnavailable, RequestGroup
from kvengine.server.metrics import ServerMetrics
from kvengine.weights.source import open_model_source
from kvengine.weights.tokenizer import Tokenizer

ACCEPT_TIMEOUT_S = 60.0  # a replica must accept (or refuse) a request within this (it queues after accepting)
ATTEMPTS = 2  # tries of a request whose replica died before accepting it


class ReplicaBackend:
    """server/async_engine.Backend over the engine deployment's replicas."""

    def __init__(self, handle: DeploymentHandle, tokenizer: Tokenizer | None, info: dict[str, Any],
                 metrics: ServerMetrics, deployment: str, send_text: bool = False) -> None:
        self.handle = handle.options(stream=True)
        self.stats_handle = handle
        self._tokenizer = tokenizer
        self.info = info
        self.metrics = metrics
        self.deployment = deployment
        self.send_text = send_text
        self.max_waiting = info["max_waiting"]
        self._pumps: dict[int, tuple[asyncio.Task, Any]] = {}

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    @property
    def max_num_seqs(self) -> int:
        return self.info["max_num_seqs"]

    @property
    def fingerprint(self) -> str:
        """Replicas serve one model with one configuration; what the frontend knows of it."""
        return f"replicas|kv block {self.info['block_size']}"

    @property
    def alive(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        """Nothing to stop here: the streams end with their replicas (the app calls this from a thread)."""

    async def add(self, request_ids: list[str], prompt_token_ids: list[int], params: list[SamplingParams],
                  cache_salt: str | None) -> RequestGroup:
        keys = prompt_block_keys(prompt_token_ids, cache_salt, self.info["block_size"])
        text = self._tokenizer.decode(prompt_token_ids) if self.send_text and self._tokenizer else ""
        request = RoutedRequest(request_ids, prompt_token_ids, params, cache_salt, keys, text)
        arrival = time.perf_counter()
        for attempt in range(ATTEMPTS):
            stream = self.handle.generate.remote(request)
            try:
                first = await asyncio.wait_for(stream.__anext__(), ACCEPT_TIMEOUT_S)
                break
            except (TimeoutError, StopAsyncIteration) as e:
                stream.cancel()
                raise EngineUnavailable(f"no replica accepted the request ({type(e).__name__})") from None
            except Exception as e:  # noqa: BLE001 - the replica died or vanished before accepting: retry
                stream.cancel()
                if attempt == ATTEMPTS - 1:
                    raise EngineUnavailable(f"the replica failed before accepting the request: "
                                            f"{type(e).__name__}") from None
        if isinstance(first, KVEngineError):
            raise first
        assert isinstance(first, Accepted), f"unexpected first item {first!r}"
        group = RequestGroup(request_ids, asyncio.get_running_loop(), prompt_tokens=len(prompt_token_ids),
                             replica=first.replica)
        task = asyncio.create_task(self._pump(stream, group, arrival))
        self._pumps[id(group)] = (task, stream)
        task.add_done_callback(lambda _: self._pumps.pop(id(group), None))
        return group

    async def _pump(self, stream: Any, group: RequestGroup, arrival: float) -> None:
        last: float | None = None
        try:
            async for item in stream:
                if isinstance(item, BaseException):
                    group.queue.put_nowait(item)
                    return
                now = time.perf_counter()
                index, out = item
                if out.delta_token_ids:
                    self.metrics.observe_token(last is None, now - (arrival if last is None else last))
                    last = now
                if out.finished:
                    self.metrics.observe_finished(out.finish_reason, group.prompt_tokens, now - arrival)
                group.queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the replica died mid-stream: the request fails cleanly
            group.queue.put_nowait(EngineUnavailable(f"replica {group.replica} failed while serving the "
                                                     f"request: {type(e).__name__}"))

    def abort(self, group: RequestGroup) -> None:
        entry = self._pumps.pop(id(group), None)
        if entry is not None:
            task, stream = entry
            task.cancel()
            stream.cancel()

    def _replicas(self) -> dict[str, dict[str, Any]]:
        """Per replica, what the kvengine router last heard from it ({} under another router)."""
        from kvengine.cluster.view import find_view

        view = find_view(self.deployment)
        return view.replicas() if view is not None else {}

    async def stats(self) -> EngineStats:
        """The replicas' engine stats, summed (from the kvengine router's view; else one replica's)."""
        rows = list(self._replicas().values()) or [await self.stats_handle.stats.remote()]
        return sum_stats(rows)

    async def snapshot(self) -> dict[str, Any]:
        """The dashboard's state: the summed stats plus `replicas` (pid, requests routed, engine stats)."""
        data = (await self.stats()).to_dict()
        data["tokens_per_s"] = 0.0
        data["replicas"] = self._replicas()
        return data


def sum_stats(rows: list[dict[str, Any]]) -> EngineStats:
    """Several replicas' EngineStats dicts as one: counts add up; the geometry is the first replica's."""
    names = {f.name for f in dataclasses.fields(EngineStats)} - {"requests"}
    first = {name: value for name, value in rows[0].items() if name in names}
    for row in rows[1:]:
        for name, value in row.items():
            if name in first and isinstance(value, int) and name != "block_size":
                first[name] += value
    return EngineStats(**first)


@serve.ingress()
class Frontend:
    """The ingress deployment: tokenizes, hashes, and hands requests to the engine replicas."""

    async def __init__(self, engines: DeploymentHandle, model: str | None, served_model_name: str | None,
                       api_keys: list[str], max_waiting: int, deployment: str, send_text: bool) -> None:
        replica_grpc_on_loopback()
        info = await engines.describe.remote()
        info["max_waiting"] = max_waiting
        self.metrics = ServerMetrics()
        self.name = served_model_name or info["model_name"]
        self.api_keys = api_keys
        tokenizer = open_model_source(model, quiet=True).tokenizer()
        self.backend = ReplicaBackend(engines, tokenizer, info, self.metrics, deployment, send_text)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_backend_app(self.backend, self.name, self.api_keys, self.metrics)
