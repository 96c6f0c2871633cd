"""The server's OpenAPI document, served at /openapi.json: FastAPI's description of the routes plus the JSON request
bodies, which the routes parse themselves (server/protocol.py: every bad body is one OpenAI-style 400) and FastAPI
therefore cannot see. Each body's schema is its pydantic model's; the fuzz test
(tests/server/test_server_schema_fuzz.py) generates requests from this document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kvengine.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERROR_STATUSES = {"400": "a bad request body or value", "401": "a missing or wrong API key",
                  "404": "an unknown model", "413": "a body over the size limit", "415": "a body that is not JSON",
                  "429": "the waiting queue is full"}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The document (built once, then cached on the app as FastAPI does)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        for path, model in REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            op = doc["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            _add_errors(op)
        app.openapi_schema = doc
    return app.openapi_schema


def _add_errors(op: dict[str, Any]) -> None:
    """The OpenAI-style error bodies a generation or token route answers with."""
    for status, why in ERROR_STATUSES.items():
        op["responses"][status] = {"description": why, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
