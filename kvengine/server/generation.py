"""A generation request's run once its body is parsed: its n choices per prompt added to the engine as one group,
then one JSON response or a stream of server-sent events. However a response ends (finished, client gone, server
shutting down), what still runs of its group is aborted and its KV blocks freed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvengine.engine.output import RequestOutput
from kvengine.errors import KVEngineError
from kvengine.sampling import SamplingParams
from kvengine.server.async_engine import Backend, RequestGroup
from kvengine.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, error_from
from kvengine.server.responses import ResponseWriter, sse, usage
from kvengine.server.state import ServerState
from kvengine.server.tool_stream import ToolStream
from kvengine.tools.plan import ToolPlan

REPLICA_HEADER = "x-kvengine-replica"  # which replica served the request (set when the backend has replicas)


async def generate(state: ServerState, request: Request, kind: Literal["chat", "completion"],
                    body: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], max_tokens: int | None,
                    cache_salt: str | None, echo: list[str] | None = None, tools: ToolPlan | None = None) -> Response:
    """n engine requests per prompt: choice index = prompt index * n + choice. `tools`: how chat choices may
    call tools (a forced call constrains their sampling)."""
    limit, n = state.engine.max_model_len, body.n
    params = [body.sampling_params(max_tokens if max_tokens is not None else max(1, limit - len(ids)))
              for ids in prompts]  # (chat without a limit: up to the end of the context)
    if tools is not None:
        params = [[tools.constrain(p) for p in ps] for ps in params]
    salt = "|".join(s for s in (cache_salt, body.cache_salt) if s) or None
    writer = ResponseWriter(kind, state.model_name, state.fingerprint, state.text.token_text(), tools)
    rids = [f"{writer.id}-{i}" for i in range(n * len(prompts))]
    group = await _add(state, rids, prompts, params, salt)
    headers = {REPLICA_HEADER: group.replica} if group.replica else None
    echoes = [e for e in echo for _ in range(n)] if echo is not None else None
    if body.stream:
        return _GroupStream(state.engine, group, _stream(group, writer, body.include_usage, n, echoes), headers)
    finals = await _collect(state, request, group)
    if finals is None:
        return Response(status_code=499)  # the client went away; nobody reads this
    return JSONResponse(writer.full(finals, usage(group.prompt_tokens, [o.metrics for o in finals], n), echoes),
                        headers=headers)


async def _add(state: ServerState, rids: list[str], prompts: list[list[int]], params: list[list[SamplingParams]],
               salt: str | None) -> RequestGroup:
    """One backend group per prompt; several are merged into one group whose indices run on (prompt, choice)."""
    n = len(params[0])
    parts: list[RequestGroup] = []
    try:
        for k, (ids, ps) in enumerate(zip(prompts, params, strict=True)):
            parts.append(await state.engine.add(rids[k * n:(k + 1) * n], ids, ps, salt))
    except BaseException:
        for part in parts:
            state.engine.abort(part)
        raise
    if len(parts) == 1:
        return parts[0]
    merged = RequestGroup(rids, asyncio.get_running_loop(), prompt_tokens=sum(map(len, prompts)),
                          replica=parts[0].replica, parts=parts)

    async def forward(part: RequestGroup, offset: int) -> None:
        while not part.done:
            try:
                index, out = await part.next()
            except BaseException as e:  # noqa: BLE001 - handed on to the merged group's reader
                merged.queue.put_nowait(e)
                return
            merged.queue.put_nowait((offset + index, out))

    for k, part in enumerate(parts):
        task = asyncio.create_task(forward(part, k * n))
        _FORWARDERS.add(task)
        task.add_done_callback(_FORWARDERS.discard)
    return merged


def _abort(engine: Backend, group: RequestGroup) -> None:
    """Abort what still runs of a group (each part of a merged one); aborting finished requests does nothing."""
    for part in group.parts or [group]:
        engine.abort(part)


_FORWARDERS: set[asyncio.Task] = set()  # (a task needs a reference while it runs)


class ClientGone(Exception):
    """Put in a group's queue when its (non-streaming) client disconnects."""


async def _watch_disconnect(request: Request, group: RequestGroup) -> None:
    """Wait for the client to go away (the body has been read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    group.queue.put_nowait(ClientGone())


async def _collect(state: ServerState, request: Request, group: RequestGroup) -> list[RequestOutput] | None:
    """Every choice's final output, or None if the client disconnected: then its requests are aborted at once
    (between two engine steps) and their blocks freed."""
    finals: list[RequestOutput | None] = [None] * len(group.request_ids)
    watcher = asyncio.create_task(_watch_disconnect(request, group))
    try:
        while not group.done:
            try:
                index, out = await group.next()
            except ClientGone:
                return None
            if out.finished:
                finals[index] = out
    finally:
        watcher.cancel()
        if any(f is None for f in finals):  # gone, failed or cancelled: abort whatever still runs
            _abort(state.engine, group)
    return finals  # type: ignore[return-value]


class _GroupStream(StreamingResponse):
    """Server-sent events of one request group. However the response ends (finished, client gone before or
    during the stream, server shutdown), unfinished engine requests are aborted and their blocks freed."""

    def __init__(self, engine: Backend, group: RequestGroup, events: AsyncIterator[str],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.engine, self.group = engine, group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.group.done or self.group.parts:
                _abort(self.engine, self.group)


async def _stream(group: RequestGroup, writer: ResponseWriter, include_usage: bool, n: int,
                  echo: list[str] | None) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat) or its echoed prompt (completions), text deltas, a finish
    chunk per choice, the usage chunk (if asked), then [DONE]."""
    chat = writer.kind == "chat"
    count = len(group.request_ids)
    metrics = [None] * count
    offsets = [len(e) for e in echo] if echo is not None else [0] * count
    unechoed = set(range(count)) if echo is not None else set()  # (echoed with the first output: prompt logprobs)
    calls = [ToolStream(writer.tools) for _ in range(count)] if writer.tools is not None else None
    try:
        for i in range(count if chat else 0):
            yield sse(writer.chunk(i, "", role=True, with_usage_field=include_usage))
        async for index, out in group.outputs():
            if index in unechoed:
                unechoed.discard(index)
                yield sse(writer.echo_chunk(index, echo[index], out, include_usage))
            text = out.delta_text if calls is None else calls[index].feed(out.delta_text)
            if text or out.delta_logprobs:
                yield sse(writer.chunk(index, text, with_usage_field=include_usage,
                                       logprobs=out.delta_logprobs, text_offset=offsets[index]))
                offsets[index] += len(text)
            if out.finished:
                metrics[index] = out.metrics
                reason = out.finish_reason
                if calls is not None:
                    rest, deltas, reason = calls[index].finish(reason)
                    if rest or deltas:
                        yield sse(writer.chunk(index, rest or None, with_usage_field=include_usage, tool_calls=deltas))
                yield sse(writer.chunk(index, None, reason, with_usage_field=include_usage))
        if include_usage:
            yield sse(writer.usage_chunk(usage(group.prompt_tokens, metrics, n)))
    except KVEngineError as e:
        yield sse(error_from(e))
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, as OpenAI does
        yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
    yield sse("[DONE]")
