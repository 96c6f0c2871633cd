"""AsyncEngine: one thread owns the LLMEngine and steps it continuously; asyncio handlers talk to it.

LLMEngine is not thread-safe, so every touch of it (add, abort, stats) is a command put in a locked inbox
and run by the engine thread between two steps. Requests join the running batch at the next step and
leave it when they finish (continuous batching). Each HTTP request gets a RequestGroup (its n engine
requests) whose asyncio queue the engine thread feeds with `loop.call_soon_threadsafe`, one call per
step and event loop. With nothing to run the thread blocks on a condition variable; it never spins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kvengine.engine.engine import LLMEngine
from kvengine.engine.output import RequestOutput
from kvengine.engine.stats import EngineStats
from kvengine.errors import KVEngineError, OverloadedError
from kvengine.sampling import SamplingParams
from kvengine.server.metrics import ServerMetrics
from kvengine.weights.tokenizer import Tokenizer

log = logging.getLogger("kvengine.server")


class RequestFailed(KVEngineError):
    """This request's part of an engine step failed; the other requests of the step went on."""

    status_code = 500
    error_type = "server_error"


class EngineUnavailable(KVEngineError):
    """The engine thread is stopping or has failed: retry on another replica or later."""

    status_code = 503
    error_type = "server_error"


T = TypeVar("T")
RATE_WINDOW_S = 3.0  # tokens/s is measured over this window
RATE_SAMPLE_S = 0.1


@dataclass(slots=True)
class _Slot:
    """Where one engine request's outputs go: its group's queue and its index (choice) in the group."""

    group: RequestGroup
    index: int
    arrival: float
    last_token: float | None = None


@dataclass(eq=False)
class RequestGroup:
    """The engine requests of one HTTP request (n choices), delivered as (index, output) pairs."""

    request_ids: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    remaining: int = 0
    prompt_tokens: int = 0
    replica: str | None = None  # the replica serving it, when the backend has several (kvengine/cluster)
    parts: list[RequestGroup] = field(default_factory=list)  # the groups a merged group forwards (several prompts)

    def __post_init__(self) -> None:
        self.remaining = len(self.request_ids)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    async def next(self, timeout: float | None = None) -> tuple[int, RequestOutput]:
        """The next output of any choice; raises TimeoutError after `timeout` s, or the engine's error."""
        item = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        if isinstance(item, BaseException):
            self.remaining = 0
            raise item
        if item[1].finished:
            self.remaining -= 1
        return item

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while not self.done:
            yield await self.next()


class Backend(Protocol):
    """What the HTTP app needs from whatever runs the requests: AsyncEngine here, replicas in kvengine/cluster."""

    max_waiting: int

    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    async def add(self, request_ids: list[str], prompt_token_ids: list[int], params: list[SamplingParams],
                  cache_salt: str | None) -> RequestGroup: ...
    def abort(self, group: RequestGroup) -> None: ...
    async def stats(self) -> EngineStats: ...
    async def snapshot(self) -> dict[str, Any]: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = 256, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._cv = threading.Condition()
        self._inbox: list[tuple[Callable[[], None], concurrent.futures.Future | None]] = []
        self._slots: dict[str, _Slot] = {}  # engine thread only
        self._pending = 0  # requests in the inbox, not yet given to the engine (under _cv)
        self._queued = 0  # requests the engine holds in its waiting queue (under _cv)
        self._paused = False
        self._stopping = False
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens generated) samples, engine thread only
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the engine thread died

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="kvengine-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.engine.disk is not None:
            self.engine.disk.flush()  # a graceful stop keeps every block computed so far

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.scheduler.max_num_seqs

    @property
    def fingerprint(self) -> str:
        """What makes outputs differ between deployments: how the weights are stored, their dtype, the KV format."""
        spec = self.engine.pool.spec
        return f"{self.engine.weights_desc}|{self.engine.dtype}|kv={spec.dtype}/{spec.block_size}"

    def pause(self) -> None:
        """Stop stepping (commands still run): requests queue up, nothing generates. For tests and draining."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify()

    # -- commands (any thread) ----------------------------------------------------------------------
    def _post(self, command: Callable[[], None], future: concurrent.futures.Future | None = None) -> None:
        with self._cv:
            if self._stopping or self.error is not None:
                raise EngineUnavailable("the engine is not running (shutting down or failed)")
            self._inbox.append((command, future))
            self._cv.notify()

    async def call(self, fn: Callable[[LLMEngine], T], done: Callable[[], None] | None = None) -> T:
        """Run `fn(engine)` on the engine thread between two steps and return its result (or raise).
        `done()` runs once the command is handled, even if the caller has gone away (then fn is skipped)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            finally:
                if done is not None:
                    done()

        try:
            self._post(command, future)
        except EngineUnavailable:
            if done is not None:
                done()
            raise
        return await asyncio.wrap_future(future)

    async def add(self, request_ids: list[str], prompt_token_ids: list[int], params: list[SamplingParams],
                  cache_salt: str | None) -> RequestGroup:
        """Queue one engine request per params (all or none); RequestError from the engine is raised here.
        Refused with OverloadedError (429) when the waiting queue would exceed max_waiting."""
        n = len(params)
        with self._cv:
            if self._pending + self._queued + n > self.max_waiting:
                if self.metrics is not None:
                    self.metrics.rejected.inc()
                raise OverloadedError(f"the server is busy ({self._pending + self._queued} requests waiting, "
                                      f"at most {self.max_waiting}); retry shortly", code="too_many_requests")
            self._pending += n
        group = RequestGroup(request_ids, asyncio.get_running_loop(), prompt_tokens=len(prompt_token_ids))

        def done() -> None:
            with self._cv:
                self._pending -= n

        def add_all(engine: LLMEngine) -> None:
            added: list[str] = []
            try:
                for rid, p in zip(request_ids, params, strict=True):
                    engine.add_request(None, p, prompt_token_ids=prompt_token_ids, request_id=rid,
                                       cache_salt=cache_salt)
                    added.append(rid)
            except BaseException:
                for rid in added:
                    engine.abort(rid)
                raise
            now = time.perf_counter()
            for i, rid in enumerate(request_ids):
                self._slots[rid] = _Slot(group, i, now)
            with self._cv:  # counted as queued before done() stops counting them as pending
                self._queued = len(engine.scheduler.waiting)

        try:
            await self.call(add_all, done)
        except asyncio.CancelledError:
            self.abort(group)  # the client left while its requests were being added: the inbox is FIFO
            raise
        return group

    def abort(self, group: RequestGroup) -> None:
        """Abort the group's unfinished requests and free their blocks (no await: safe in `finally`)."""
        def command() -> None:
            for rid in group.request_ids:
                if self._slots.pop(rid, None) is not None:
                    self.engine.abort(rid)
        try:
            self._post(command)
        except EngineUnavailable:
            pass  # the thread aborts everything on its way out

    @property
    def num_waiting(self) -> int:
        with self._cv:
            return self._pending + self._queued

    async def snapshot(self) -> dict[str, Any]:
        """engine.stats() as a dict, plus tokens/s over the last few seconds."""
        def take(engine: LLMEngine) -> dict[str, Any]:
            self._sample_rate(force=True)
            data = engine.stats().to_dict()
            data["tokens_per_s"] = self._tokens_per_s()
            return data
        return await self.call(take)

    async def stats(self) -> EngineStats:
        return await self.call(lambda engine: engine.stats())

    # -- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._stopping or (not self._paused and self.engine.has_unfinished())):
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._inbox = self._inbox, []
                    paused = self._paused
                for command, _ in commands:
                    command()
                if not paused and self.engine.has_unfinished():
                    self._step()
                with self._cv:
                    self._queued = len(self.engine.scheduler.waiting)
        except BaseException as e:  # noqa: BLE001 - the thread must report, not vanish
            log.exception("the engine thread stopped")
            self.error = e
            self._fail_all(e)
        finally:
            self._abort_all()
            self._cancel_inbox()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests, the server stays up
            log.exception("engine step failed; aborting the running requests")
            self._fail_all(e)
            return
        self._sample_rate()
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, tuple[int, RequestOutput]]]] = {}
        for out in outputs:
            slot = self._slots.get(out.request_id)
            if slot is None:
                continue  # aborted by its client
            if out.delta_token_ids and self.metrics is not None:
                first = slot.last_token is None
                self.metrics.observe_token(first, now - (slot.arrival if first else slot.last_token))
            slot.last_token = now
            if out.finished:
                del self._slots[out.request_id]
                if self.metrics is not None:
                    self.metrics.observe_finished(out.finish_reason, len(out.prompt_token_ids), now - slot.arrival)
            item: Any = (slot.index, out)
            if out.error is not None:  # fail the whole group (its other choices are aborted), nobody else
                item = RequestFailed(f"the engine failed on this request (other requests were not affected): "
                                     f"{out.error}", code="engine_error")
                for rid in slot.group.request_ids:
                    if self._slots.pop(rid, None) is not None:
                        self.engine.abort(rid)
            by_loop.setdefault(slot.group.loop, []).append((slot.group, item))
        for loop, items in by_loop.items():
            self._send(loop, items)

    def _send(self, loop: asyncio.AbstractEventLoop, items: list[tuple[RequestGroup, Any]]) -> None:
        def put() -> None:
            for group, item in items:
                group.queue.put_nowait(item)
        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for group, _ in items:
                for rid in group.request_ids:
                    if self._slots.pop(rid, None) is not None:
                        self.engine.abort(rid)

    def _fail_all(self, error: BaseException) -> None:
        groups = {id(s.group): s.group for s in self._slots.values()}
        self._abort_all()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, Any]]] = {}
        for group in groups.values():
            by_loop.setdefault(group.loop, []).append((group, error))
        for loop, items in by_loop.items():
            self._send(loop, items)

    def _cancel_inbox(self) -> None:
        with self._cv:
            left, self._inbox = self._inbox, []
            self._stopping = True
        for _, future in left:
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(EngineUnavailable("the engine stopped before this request ran"))

    def _abort_all(self) -> None:
        for rid in list(self._slots):
            del self._slots[rid]
            self.engine.abort(rid)

    def _sample_rate(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or not self._rate or now - self._rate[-1][0] >= RATE_SAMPLE_S:
            self._rate.append((now, self.engine.tokens_generated))
        while len(self._rate) > 2 and now - self._rate[1][0] > RATE_WINDOW_S:
            self._rate.popleft()

    def _tokens_per_s(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
