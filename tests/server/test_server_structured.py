"""Structured output through the `openai` client against a real server (tiny model): json_schema (strict) and
json_object responses always parse, and validate with `jsonschema`; streamed too; a bad schema is a 400."""

from __future__ import annotations

import json

import pytest
from test_server_errors import CHAT, USER, assert_error

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "tag"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "green", "blue"]}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_parses_and_validates(client, temperature):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=60, temperature=temperature, seed=2,
                                       n=3, response_format=FORMAT)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_and_completions_and_stream(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)
    chunks = client.chat.completions.create(model="tiny", messages=USER, max_tokens=60, temperature=0.7, seed=4,
                                            response_format=FORMAT, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(("fmt", "contains"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "objectx"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
    ({"type": "xml"}, "must be text, json_object or json_schema"),
])
def test_bad_response_format_is_400(tiny_server, fmt, contains):
    resp = tiny_server.request("POST", CHAT, {"messages": USER, "response_format": fmt})
    assert_error(resp, 400, param="response_format", contains=contains)


def test_structured_output_through_the_llm_api(tiny_reference):
    from kvengine.sampling import SamplingParams
    from kvengine.structured import StructuredOutput

    params = SamplingParams(max_tokens=60, temperature=1.0, seed=9, structured=StructuredOutput("json_schema", SCHEMA))
    out = tiny_reference.generate(["The quick brown fox"], params)[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
