"""What the server's routes share: `ServerState` (the engine thread, metrics, the served model's name, the api
keys and their checks) and how a request body is read (JSON only, bounded in size, parsed off the event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Sequence

from fastapi import Request

from kvengine.errors import AuthenticationError, KVEngineError, ModelNotFoundError
from kvengine.server.async_engine import Backend
from kvengine.server.metrics import ServerMetrics
from kvengine.server.protocol import BodyT, parse_body
from kvengine.server.responses import system_fingerprint
from kvengine.server.text import TextCodec

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is read whole


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


async def parse_request(request: Request, model: type[BodyT]) -> BodyT:
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
