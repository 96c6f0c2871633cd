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
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvengine.engine.engine import LLMEngine
from kvengine.engine.output import RequestOutput
from kvengine.errors import AuthenticationError, KVEngineError, ModelNotFoundError, OverloadedError, RequestError
from kvengine.server.async_engine import AsyncEngine, Backend, RequestGroup
from kvengine.server.metrics import CONTENT_TYPE, ServerMetrics
from kvengine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseWriter,
    error_body,
    error_from,
    parse_body,
    sse,
    usage,
)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is read whole
REPLICA_HEADER = "x-kvengine-replica"  # which replica served the request (set when the backend has replicas)


class PayloadTooLarge(KVEngineError):
    status_code = 413


class ServerState:
    """What the routes share: the engine thread, metrics, the served model's name and the api keys."""

    def __init__(self, backend: Backend, model_name: str, api_keys: Sequence[str], metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.engine = backend
        self.model_name = model_name
        self.api_keys = [k.encode() for k in api_keys]
        self.started = time.time()

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
               max_waiting: int = 256) -> FastAPI:
    """The app serving `llm_or_engine` (an LLM or an LLMEngine). The engine must not be used elsewhere
    while the app runs: the app's engine thread owns it."""
    engine: LLMEngine = getattr(llm_or_engine, "engine", llm_or_engine)
    name = model_name or getattr(llm_or_engine, "model_name", None) or engine.model_config.name
    if max_waiting < 1:
        raise RequestError(f"max_waiting must be at least 1, got {max_waiting}", param="max_waiting")
    metrics = ServerMetrics()
    return create_backend_app(AsyncEngine(engine, max_waiting=max_waiting, metrics=metrics), name, api_keys, metrics)


def create_backend_app(backend: Backend, model_name: str, api_keys: Sequence[str] | str | None = None,
                       metrics: ServerMetrics | None = None) -> FastAPI:
    """The same app over any Backend: one engine thread here, or kvengine replicas elsewhere (kvengine/cluster)."""
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    state = ServerState(backend, model_name, keys, metrics or ServerMetrics())

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
    _install_error_handlers(app)
    _add_routes(app, state)
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


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.authorize(request)
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "kvengine",
            "max_model_len": state.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        salt = state.authorize(request)
        body = parse_body(await _read_body(request), CompletionRequest)
        state.check_model(body.model)
        if body.echo:
            raise RequestError("echo is not supported by this server", param="echo")
        prompt = body.prompt_text_or_ids()
        ids = _encode(state, prompt) if isinstance(prompt, str) else prompt
        return await _generate(state, request, "completion", body, ids, body.max_tokens, salt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        salt = state.authorize(request)
        body = parse_body(await _read_body(request), ChatCompletionRequest)
        state.check_model(body.model)
        messages = body.template_messages()
        tokenizer = state.engine.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer; send token ids to /v1/completions")
        ids = tokenizer.encode_chat(messages)
        return await _generate(state, request, "chat", body, ids, body.requested_max_tokens, salt)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await state.engine.stats()
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/dashboard", response_class=HTMLResponse)
    @app.get("/dashboard/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse((DASHBOARD_DIR / "index.html").read_text())

    @app.get("/dashboard/state")
    async def dashboard_state() -> dict[str, Any]:
        data = await state.engine.snapshot()
        e = state.engine
        data.update(model=state.model_name, max_num_seqs=e.max_num_seqs, max_model_len=e.max_model_len,
                    max_waiting=state.engine.max_waiting, uptime_s=time.time() - state.started, time=time.time())
        return data


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


def _encode(state: ServerState, text: str) -> list[int]:
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise RequestError("this model has no tokenizer; send the prompt as token ids", param="prompt")
    return tokenizer.encode(text)


async def _generate(state: ServerState, request: Request, kind: Literal["chat", "completion"],
                    body: ChatCompletionRequest | CompletionRequest, ids: list[int], max_tokens: int | None,
                    cache_salt: str | None) -> Response:
    if max_tokens is None:  # chat without a limit: up to the end of the context
        max_tokens = max(1, state.engine.max_model_len - len(ids))
    params = body.sampling_params(max_tokens)
    salt = "|".join(s for s in (cache_salt, body.cache_salt) if s) or None
    writer = ResponseWriter(kind, state.model_name)
    rids = [f"{writer.id}-{i}" for i in range(body.n)]
    group = await state.engine.add(rids, ids, params, salt)
    headers = {REPLICA_HEADER: group.replica} if group.replica else None
    if body.stream:
        return _GroupStream(state.engine, group, _stream(group, writer, body.include_usage), headers)
    finals = await _collect(state, request, group)
    if finals is None:
        return Response(status_code=499)  # the client went away; nobody reads this
    return JSONResponse(writer.full(finals, usage(group.prompt_tokens, [o.metrics for o in finals])),
                        headers=headers)


async def _collect(state: ServerState, request: Request, group: RequestGroup) -> list[RequestOutput] | None:
    """Every choice's final output, or None if the client disconnected (its requests are aborted)."""
    finals: list[RequestOutput | None] = [None] * len(group.request_ids)
    try:
        while not group.done:
            try:
                index, out = await group.next(timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if out.finished:
                finals[index] = out
    finally:
        if not group.done:
            state.engine.abort(group)
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
            if not self.group.done:
                self.engine.abort(self.group)


async def _stream(group: RequestGroup, writer: ResponseWriter, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat), text deltas, a finish chunk per choice, the usage
    chunk (if asked), then [DONE]."""
    chat = writer.kind == "chat"
    n = len(group.request_ids)
    metrics = [None] * n
    try:
        if chat:
            for i in range(n):
                yield sse(writer.chunk(i, "", role=True, with_usage_field=include_usage))
        async for index, out in group.outputs():
            if out.delta_text:
                yield sse(writer.chunk(index, out.delta_text, with_usage_field=include_usage))
            if out.finished:
                metrics[index] = out.metrics
                yield sse(writer.chunk(index, None, out.finish_reason, with_usage_field=include_usage))
        if include_usage:
            yield sse(writer.usage_chunk(usage(group.prompt_tokens, metrics)))
    except KVEngineError as e:
        yield sse(error_from(e))
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, as OpenAI does
        yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
    yield sse("[DONE]")


class ServerThread:
    """Runs an app with uvicorn on a background thread, bound to host:port (0 = a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="kvengine-uvicorn")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
