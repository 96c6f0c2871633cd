"""Fuzzing as a standing test: schemathesis generates requests from the server's own OpenAPI document
(/openapi.json, server/openapi.py: the routes and their pydantic request bodies), both valid ones and ones that
break the schema, against a real server on a tiny random model. Every response must be below 500, and every 4xx
an OpenAI-style JSON error body.

Bounded for CI: `EXAMPLES` generated cases per operation and mode (derandomized, so a run is repeatable), on a
server whose context is short (`MAX_MODEL_LEN`), so a fuzzed max_tokens or n cannot make one case long."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 15  # per operation and generation mode (valid bodies, schema-breaking bodies): 30 per operation
MAX_MODEL_LEN = 64
BODY_ROUTES = {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"}


def _check_response(label: str, response) -> None:
    assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        assert isinstance(error["type"], str), response.text


def _fuzz(operation, mode: GenerationMode, counts: dict[str, int]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        counts[label] = counts.get(label, 0) + 1
        _check_response(label, case.call(timeout=60))

    run()


def test_no_request_from_the_openapi_schema_gets_a_5xx(start_server):
    served = start_server(max_model_len=MAX_MODEL_LEN)
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        _fuzz(operation, GenerationMode.POSITIVE, counts)
        try:
            _fuzz(operation, GenerationMode.NEGATIVE, counts)
        except Unsatisfiable:  # nothing in it can break the schema (no inputs, or only a free-form path string)
            assert operation.method.upper() + " " + operation.path not in BODY_ROUTES
    print(f"schemathesis: {sum(counts.values())} cases, none a 5xx: {counts}")  # (seen with -s)
    assert BODY_ROUTES <= set(counts), counts  # the body-carrying routes were fuzzed, with their bodies
    assert served.request("GET", "/health")[0] == 200  # and the server still serves
