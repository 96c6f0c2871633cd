"""The OpenAI-compatible HTTP app: `create_app(llm_or_engine, ...)` returns a FastAPI app whose engine thread
starts and stops with the app's lifespan.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not), GET /health,
GET /metrics (Prometheus), GET /dashboard (static page) and GET /dashboard/state (its JSON).
With api keys, every /v1 route needs `Authorization: Bearer KEY`, and each key is its own prefix-cache
tenant (its hash is part of the cache salt), so tenants never share KV blocks. `ServerThread` runs an
app with uvicorn on a background thread (tests and benchmarks). What the routes share and how they read a body:
server/state.py; a generation request's run: server/generation.py; the wire format: server/protocol.py (requests)
and server/responses.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvengine.engine.engine import LLMEngine
from kvengine.errors import AuthenticationError, KVEngineError, OverloadedError, RequestError
from kvengine.server.async_engine import AsyncEngine, Backend
from kvengine.server.generation import generate
from kvengine.server.metrics import CONTENT_TYPE, ServerMetrics
from kvengine.server.openapi import openapi_document
from kvengine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    error_from,
)
from kvengine.server.state import ServerState, parse_request
from kvengine.server.thread import ServerThread  # noqa: F401 - (its home used to be here)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
RETRY_AFTER_S = 1


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
        body = await parse_request(request, CompletionRequest)
        state.check_model(body.model)
        prompts = body.prompts()
        ids = [await state.text.encode(p) if isinstance(p, str) else p for p in prompts]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else await state.text.decode(p, "prompt") for p in prompts]
        return await generate(state, request, "completion", body, ids, body.max_tokens, salt, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        salt = state.authorize(request)
        body = await parse_request(request, ChatCompletionRequest)
        state.check_model(body.model)
        plan = state.text.tool_plan(body)
        ids = await state.text.encode_chat(body.template_messages(), tools=plan.template_tools() if plan else None)
        return await generate(state, request, "chat", body, [ids], body.requested_max_tokens, salt, tools=plan)


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    """vLLM's /tokenize and /detokenize."""
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        state.authorize(request)
        body = await parse_request(request, TokenizeRequest)
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
        body = await parse_request(request, DetokenizeRequest)
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


