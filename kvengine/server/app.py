"""The OpenAI-compatible HTTP app: `create_app(llm_or_engine, ...)` returns a FastAPI app whose engine thread
starts and stops with the app's lifespan.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not), GET /health,
GET /metrics (Prometheus), GET /dashboard (static page) and GET /dashboard/state (its JSON).
With api keys, every /v1 route needs `Authorization: Bearer KEY`, and each key is its own prefix-cache
tenant (its hash is part of the cache salt), so tenants never share KV blocks. `ServerThread` runs an
app with uvicorn on a background thread (tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvengine.engine.engine import LLMEngine
from kvengine.engine.output import RequestOutput
from kvengine.errors import AuthenticationError, KVEngineError, ModelNotFoundError, OverloadedError, RequestError
from kvengine.sampling import SamplingParams
from kvengine.server.async_engine import AsyncEngine, Backend, RequestGroup
from kvengine.server.metrics import CONTENT_TYPE, ServerMetrics
from kvengine.server.openapi import openapi_document
from kvengine.server.protocol import (
    BodyT,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponseWriter,
    TokenizeRequest,
    error_body,
    error_from,
    parse_body,
    sse,
    system_fingerprint,
    usage,
)
from kvengine.server.text import TextCodec
from kvengine.server.thread import ServerThread  # noqa: F401 - (its home used to be here)
from kvengine.server.tool_stream import ToolStream
from kvengine.tools.plan import ToolPlan

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is read whole
REPLICA_HEADER = "x-kvengine-replica"  # which replica served the request (set when the backend has replicas)


class PayloadTooLarge(KVEngineError):
    status_code = 413


class UnsupportedMediaType(KVEngineError):
    status_code = 415


class ServerState:
    """What the routes share: the engine thread, metrics, the served model's name and the api keys."""

    def __init__(self, backend: Backend, model_name: str, api_keys: Sequence[str], metrics: ServerMetrics,
                 open_observability: bool) -> None:
        self.metrics = metrics
        self.engine = backend
        self.model_name = model_name
        self.api_keys = [k.encode() for k in api_keys]
        self.open_observability = open_observability
        self.started = time.time()
        self.fingerprint = system_fingerprint(model_name, backend.fingerprint)
        self.text = TextCodec(backend.tokenizer, backend.max_model_len)

    def authorize_observer(self, request: Request) -> None:
        """/metrics and the dashboard's state follow the api keys unless the operator opened them."""
        if not self.open_observability:
            self.authorize(request)

    def authorize(self, request: Request) -> str | None:
        """Check the bearer token (constant time, every key compared); returns the key's tenant salt."""
        if not self.api_keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        match = None
        for key in self.api_keys:
            if secrets.compare_digest(given, key):
                match = key
        if match is None or scheme.lower() != "bearer":
            what = "missing" if not given else "incorrect"
            raise AuthenticationError(f"{what} API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return "key:" + hashlib.sha256(match).hexdigest()[:16]

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFoundError(f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                                     param="model", code="model_not_found")


def create_app(llm_or_engine: Any, *, model_name: str | None = None, api_keys: Sequence[str] | str | None = None,
               max_waiting: int = 256, open_observability: bool = False) -> FastAPI:
    """The app serving `llm_or_engine` (an LLM or an LLMEngine). The engine must not be used elsewhere
    while the app runs: the app's engine thread owns it. With api keys, /metrics and /dashboard/state need a
    key too unless `open_observability`."""
    engine: LLMEngine = getattr(llm_or_engine, "engine", llm_or_engine)
    name = model_name or getattr(llm_or_engine, "model_name", None) or engine.model_config.name
    if max_waiting < 1:
        raise RequestError(f"max_waiting must be at least 1, got {max_waiting}", param="max_waiting")
    metrics = ServerMetrics()
    return create_backend_app(AsyncEngine(engine, max_waiting=max_waiting, metrics=metrics), name, api_keys, metrics,
                              open_observability=open_observability)


def create_backend_app(backend: Backend, model_name: str, api_keys: Sequence[str] | str | None = None,
                       metrics: ServerMetrics | None = None, open_observability: bool = False) -> FastAPI:
    """The same app over any Backend: one engine thread here, or kvengine replicas elsewhere (kvengine/cluster)."""
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    state = ServerState(backend, model_name, keys, metrics or ServerMetrics(), open_observability)
    state.metrics.name_model(model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="kvengine", summary="OpenAI-compatible server with a live KV-cache dashboard",
                  lifespan=lifespan)
    app.state.kv = state
    app.openapi = lambda: openapi_document(app)  # (the request bodies FastAPI does not see: server/openapi.py)
    _install_error_handlers(app)
    for add in (_add_model_routes, _add_generation_routes, _add_token_routes, _add_observer_routes):
        add(app, state)
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard-static")
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KVEngineError)
    async def kvengine_error(_: Request, exc: KVEngineError) -> JSONResponse:
        headers = {}
        if isinstance(exc, OverloadedError) or exc.status_code == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if isinstance(exc, AuthenticationError):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_from(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


def _add_model_routes(app: FastAPI, state: ServerState) -> None:
    """/health and the model list."""
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "kvengine",
                "max_model_len": state.engine.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        state.authorize(request)
        state.check_model(model_id)
        return model_card()


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    """The OpenAI generation endpoints."""
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        salt = state.authorize(request)
        body = await _parse(request, CompletionRequest)
        state.check_model(body.model)
        prompts = body.prompts()
        ids = [await state.text.encode(p) if isinstance(p, str) else p for p in prompts]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else await state.text.decode(p, "prompt") for p in prompts]
        return await _generate(state, request, "completion", body, ids, body.max_tokens, salt, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        salt = state.authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        state.check_model(body.model)
        plan = state.text.tool_plan(body)
        ids = await state.text.encode_chat(body.template_messages(), tools=plan.template_tools() if plan else None)
        return await _generate(state, request, "chat", body, [ids], body.requested_max_tokens, salt, tools=plan)


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    """vLLM's /tokenize and /detokenize."""
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        state.authorize(request)
        body = await _parse(request, TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send either prompt or messages", param="prompt")
        if body.messages is not None:
            messages = [m.as_template_dict() for m in body.messages]
            shown = ChatCompletionRequest(messages=body.messages, tools=body.tools, tool_choice="none")
            plan = state.text.tool_plan(shown)
            ids = await state.text.encode_chat(messages, body.add_generation_prompt,
                                               plan.template_tools() if plan else None)
        else:
            ids = await state.text.encode(body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        state.authorize(request)
        body = await _parse(request, DetokenizeRequest)
        state.check_model(body.model)
        return {"prompt": await state.text.decode(body.tokens)}


def _add_observer_routes(app: FastAPI, state: ServerState) -> None:
    """What an operator watches: /metrics and the dashboard (page and state)."""
    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.authorize_observer(request)
        stats = await state.engine.stats()
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/dashboard", response_class=HTMLResponse)
    @app.get("/dashboard/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        # the page is static and holds no data; everything it shows comes from /dashboard/state (keyed)
        return HTMLResponse((DASHBOARD_DIR / "index.html").read_text())

    @app.get("/dashboard/state")
    async def dashboard_state(request: Request) -> dict[str, Any]:
        state.authorize_observer(request)
        data = await state.engine.snapshot()
        e = state.engine
        data.update(model=state.model_name, max_num_seqs=e.max_num_seqs, max_model_len=e.max_model_len,
                    max_waiting=state.engine.max_waiting, uptime_s=time.time() - state.started, time=time.time())
        return data


async def _parse(request: Request, model: type[BodyT]) -> BodyT:
    """The body as `model`: JSON only (415 otherwise), at most MAX_BODY_BYTES, parsed off the event loop."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(f"the request body must be JSON (Content-Type: application/json), got {media!r}")
    raw = await _read_body(request)
    return await asyncio.to_thread(parse_body, raw, model)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 once it passes MAX_BODY_BYTES (whatever Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the request body is {int(declared)} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(state: ServerState, request: Request, kind: Literal["chat", "completion"],
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
