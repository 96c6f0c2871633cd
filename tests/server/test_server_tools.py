"""Tool calling in OpenAI's shape through the `openai` client against a real server whose tiny random model has a
Hermes-style (`<tool_call>`) chat template: forced calls ("required", a named function) parse and validate against
the tool's schema, greedy and sampled; streamed calls reassemble to the non-streamed one; a follow-up turn with a
`tool` message renders; every bad input is a 400 naming its param; the "auto" parser reads crafted text."""

from __future__ import annotations

import json

import pytest
from kvtest import make_tiny_hf_folder
from test_server_errors import CHAT, COMPLETIONS, USER, assert_error

from kvengine.errors import RequestError
from kvengine.llm import LLM
from kvengine.server.tool_stream import ToolStream
from kvengine.tools.hermes import HermesParser
from kvengine.tools.plan import ToolMode, plan_tools

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

HERMES_TEMPLATE = (
    "{% if tools %}<|user|>Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call></s>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response></s>"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|bot|>{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}</s>"
    "{% else %}{{ '<|user|>' if m.role == 'user' else '<|bot|>' }}{{ m.content }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}")
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
CLOCK = {"type": "object", "additionalProperties": False, "required": ["zone"],
         "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
KV_BYTES = 4 << 20  # (as the server fixtures; `conftest` is not importable by name when several test folders run)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """This module's servers run a model whose template shows tools (overrides the session's plain one)."""
    return make_tiny_hf_folder(tmp_path_factory.mktemp("tools") / "tiny", max_position_embeddings=1024,
                               chat_template=HERMES_TEMPLATE)


def assert_valid_calls(message, names=tuple(SCHEMAS)):
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_parse_and_validate(client, temperature, parallel):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", n=3,
                                       max_tokens=200, temperature=temperature, seed=3, parallel_tool_calls=parallel)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message)
        assert parallel or len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_named_function_is_called(client, temperature):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=NAMED, n=2,
                                       max_tokens=100, temperature=temperature, seed=5)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message, names=("get_weather",))


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_streamed_call_reassembles_to_the_non_streamed_one(client, choice):
    args = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons, content = [], ""
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    assert content == "" and reasons[-1] == "tool_calls"
    assert calls[0]["id"].startswith("call_")
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_none_and_auto_return_text_when_no_call_is_written(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                           max_tokens=8, temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert "<tool_call>" not in r.choices[0].message.content


def test_follow_up_turn_with_a_tool_message(client, tiny_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}]
    status, _, tokens = tiny_server.request("POST", "/tokenize", {"messages": messages, "tools": TOOLS})
    assert status == 200, tokens
    _, _, text = tiny_server.request("POST", "/detokenize", {"tokens": tokens["tokens"]})
    assert text["prompt"].endswith('hello<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
                                   '</tool_call><tool_response>rain, 4 C</tool_response>')  # (special tokens dropped)
    assert '"name": "get_time"' in text["prompt"]  # the tools were shown
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=0)
    assert_valid_calls(r.choices[0].message)


def _tool(name="f", parameters=None):
    fn = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": fn}


@pytest.mark.parametrize(("path", "body", "param", "contains"), [
    (CHAT, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names the function 'nope', which is not among the tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    (CHAT, {"tool_choice": NAMED}, "tool_choice", "tool_choice needs tools"),
    (CHAT, {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be none, auto, required or a function"),
    (CHAT, {"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "{\"type\": \"function\""),
    (CHAT, {"tools": [_tool(parameters={"type": "objectx"})]}, "tools",
     "tools[0].function.parameters: the JSON schema is invalid"),
    (CHAT, {"tools": [{"type": "retrieval"}]}, "tools", "tools[0] must be {\"type\": \"function\""),
    (CHAT, {"tools": [_tool("bad name!")]}, "tools", "tools[0].function.name must be 1-64 letters"),
    (CHAT, {"tools": [_tool(), _tool()]}, "tools", "tools[1]: the function name 'f' is used twice"),
    (CHAT, {"tools": [_tool(parameters=[1])]}, "tools", "parameters must be a JSON schema object"),
    (CHAT, {"tools": "f"}, "tools", "tools"),
    (CHAT, {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "response_format cannot be combined with tool_choice 'required'"),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            "tools": TOOLS}, "messages", "tool call 'f': arguments are not JSON"),
    (COMPLETIONS, {"tools": TOOLS}, "tools", "tools is for /v1/chat/completions, not completions"),
    (COMPLETIONS, {"tool_choice": "required"}, "tool_choice", "tool_choice is for /v1/chat/completions"),
])
def test_bad_tool_input_is_400_with_param(tiny_server, path, body, param, contains):
    base = {"messages": USER} if path == CHAT else {"prompt": "hi"}
    assert_error(tiny_server.request("POST", path, {**base, **body}), 400, param=param, contains=contains)


def test_hermes_parser_reads_calls_out_of_text():
    parser, names = HermesParser(), {"get_weather", "get_time"}
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 3}}\n' \
           '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    reply = parser.parse(text, names)
    assert reply.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Lima", "days": 3}), ("get_time", {"zone": "UTC"})]
    unclosed = parser.parse('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}', names)
    assert unclosed.content is None and unclosed.calls[0].name == "get_time"
    for bad in ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "<tool_call>{not json</tool_call>",
                "no calls here", '<tool_call>{"name": "get_time", "arguments": 5}</tool_call>'):
        assert parser.parse(bad, names).content == bad and parser.parse(bad, names).calls == []


def test_auto_stream_sends_text_until_a_call_starts():
    plan = plan_tools(TOOLS, "auto", True, HERMES_TEMPLATE, True)
    assert plan.mode == ToolMode.AUTO
    stream = ToolStream(plan)
    pieces = ["Sure", ", one moment. <tool", '_call>{"name": "get_time", ', '"arguments": {"zone": "UTC"}}',
              "</tool_call>"]
    sent = "".join(stream.feed(p) for p in pieces)
    assert sent == "Sure, one moment. "
    rest, calls, reason = stream.finish("stop")
    assert rest == "" and reason == "tool_calls"
    assert calls == [{"index": 0, "id": calls[0]["id"], "type": "function",
                      "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]
    plain = ToolStream(plan)
    assert plain.feed("a <tool") == "a " and plain.finish("length") == ("<tool", None, "length")


def test_llm_chat_with_tools(tiny_folder):
    llm = LLM(str(tiny_folder), weights="fp32", kv_cache_memory=KV_BYTES)
    from kvengine.sampling import SamplingParams
    outs = llm.chat(USER, SamplingParams(max_tokens=200, temperature=1.0, seed=1), tools=TOOLS,
                    tool_choice="required")
    assert outs[0].finish_reason == "tool_calls" and outs[0].tool_calls
    for call in outs[0].tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    plain = LLM(str(make_tiny_hf_folder(tiny_folder.parent / "plain")), weights="fp32", kv_cache_memory=KV_BYTES)
    with pytest.raises(RequestError, match="does not support tools") as e:
        plain.chat(USER, tools=TOOLS)
    assert e.value.param == "tools"
