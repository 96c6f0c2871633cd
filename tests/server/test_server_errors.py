"""Bad input and faults, over raw HTTP: OpenAI-style error bodies with the right status, api keys (401),
per-key tenants, a full waiting queue (429 + Retry-After), a client that disconnects mid-stream (its request is
aborted and its blocks come back), and text sent to a model with no tokenizer (a 400 naming the field)."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from kvtest import tiny_pair

from kvengine.llm import LLM

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


def assert_error(response, status, param=None, type_="invalid_request_error", code=None, contains=""):
    got_status, _, body = response
    assert got_status == status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["param"] == param and err["code"] == code, err
    assert contains in err["message"], err["message"]
    assert "\n" not in err["message"]


@pytest.mark.parametrize(("path", "raw", "contains"), [
    (CHAT, b'{"model": "tiny", "messages": [', "not valid JSON"),
    (COMPLETIONS, b"\xff\xfe", "not valid JSON"),
    (COMPLETIONS, b"[1, 2]", "must be a JSON object"),
    (CHAT, b"", "not valid JSON"),
])
def test_malformed_json_is_400(tiny_server, path, raw, contains):
    assert_error(tiny_server.request("POST", path, raw), 400, contains=contains)


@pytest.mark.parametrize(("path", "body", "param"), [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": 42}, "prompt"),
    (COMPLETIONS, {"max_tokens": 3}, "prompt"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    (CHAT, {"messages": USER, "n": True}, "n"),
    (CHAT, {"messages": USER, "stop": [1, 2]}, "stop"),
])
def test_wrong_field_types_are_400_with_the_field(tiny_server, path, body, param):
    assert_error(tiny_server.request("POST", path, body), 400, param=param)


@pytest.mark.parametrize(("path", "body", "param", "contains"), [
    (CHAT, {"messages": []}, "messages", "must not be empty"),
    (CHAT, {"messages": USER, "temperature": -0.5}, "temperature", "temperature must be in [0, 2]"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p", "top_p"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 100000}, "max_tokens", "context is 512 tokens"),
    (CHAT, {"messages": USER, "max_tokens": 600}, "max_tokens", "context is 512 tokens"),
    (COMPLETIONS, {"prompt": "word " * 700, "max_tokens": 1}, "prompt", "context is 512 tokens"),
    (COMPLETIONS, {"prompt": [5, 100000], "max_tokens": 1}, "prompt", "token ids must be in"),
    (COMPLETIONS, {"prompt": ["a"] * 9, "n": 2}, "prompt", "at most 16 choices"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, "n", "n must be between"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, "seed", "64 bits"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "this model's chat template does not support tools (it never reads `tools`)"),  # (the tiny model's template)
])
def test_bad_values_are_400(tiny_server, path, body, param, contains):
    assert_error(tiny_server.request("POST", path, body), 400, param=param, contains=contains)


def test_oversized_body_is_413(tiny_server, monkeypatch):
    monkeypatch.setattr("kvengine.server.state.MAX_BODY_BYTES", 1000)
    resp = tiny_server.request("POST", COMPLETIONS, {"prompt": "x" * 2000})
    assert_error(resp, 413, contains="at most 1000")


def test_unknown_model_is_404_model_not_found(tiny_server):
    resp = tiny_server.request("POST", CHAT, {"model": "gpt-4o", "messages": USER})
    assert_error(resp, 404, param="model", type_="not_found_error", code="model_not_found", contains="gpt-4o")


def test_unknown_route_and_method_are_openai_errors(tiny_server):
    assert_error(tiny_server.request("GET", "/v1/nothing"), 404, type_="not_found_error")
    assert tiny_server.request("GET", COMPLETIONS)[0] == 405
    assert "error" in tiny_server.request("GET", COMPLETIONS)[2]


def test_bad_requests_leave_nothing_behind(tiny_server):
    tiny_server.request("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 100000, "n": 3})
    state = tiny_server.state_json()
    assert state["requests"] == [] and state["blocks_used"] == 0


# ---- api keys ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server(api_keys=["key-one", "key-two"])


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer key-on", "Basic key-one", "key-one", "Bearer "])
def test_missing_or_wrong_key_is_401(keyed_server, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path, body in (("GET", "/v1/models", None), ("POST", CHAT, {"messages": USER, "max_tokens": 1})):
        resp = keyed_server.request(method, path, body, headers)
        assert_error(resp, 401, type_="authentication_error", code="invalid_api_key")
        assert resp[1]["www-authenticate"] == "Bearer"


def test_right_key_passes_and_open_routes_need_none(keyed_server):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="key-two", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices[0].finish_reason
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/health", "/dashboard"):
        assert keyed_server.request("GET", path)[0] == 200


def test_each_key_is_its_own_prefix_cache_tenant(keyed_server):
    body = {"prompt": "Shared prefix that both tenants send. " * 4, "max_tokens": 1}

    def cached(key):
        status, _, data = keyed_server.request("POST", COMPLETIONS, body, {"Authorization": f"Bearer {key}"})
        assert status == 200, data
        return data["usage"]["prompt_tokens_details"]["cached_tokens"], data["usage"]["kvengine"]["miss_reason"]

    assert cached("key-one")[0] == 0
    assert cached("key-one")[0] > 0
    assert cached("key-two") == (0, "no_match")  # not "cache_salt": that would say key-one sent this prompt


# ---- overload and disconnects ----------------------------------------------------------------------------

def test_full_waiting_queue_is_429_with_retry_after(start_server):
    served = start_server(max_waiting=2)
    served.state.engine.pause()  # nothing runs: accepted requests stay waiting
    results = []

    def send():
        results.append(served.request("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 3}))

    threads = [threading.Thread(target=send) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        served.wait_for(lambda s: s["waiting"] == 2)
        resp = served.request("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 3})
        assert_error(resp, 429, type_="rate_limit_error", code="too_many_requests", contains="busy")
        assert resp[1]["retry-after"] == "1"
        assert_error(served.request("POST", COMPLETIONS, {"prompt": "hi", "n": 2}), 429, type_="rate_limit_error",
                     code="too_many_requests")
    finally:
        served.state.engine.resume()
        for t in threads:
            t.join(60)
    assert [r[0] for r in results] == [200, 200]
    assert served.request("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 3})[0] == 200
    status, _, text = served.request("GET", "/metrics")
    assert "kvengine_requests_rejected_total 2.0" in text


def test_disconnect_mid_stream_aborts_and_frees_blocks(start_server):
    served = start_server()
    baseline = served.state_json()["blocks_used"]
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    body = {"prompt": "Once upon a time " * 8, "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn.request("POST", COMPLETIONS, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: {")
    served.state.engine.pause()  # the request cannot finish by itself from here on
    try:
        held = served.wait_for(lambda s: s["running"] == 1)
        assert held["blocks_used"] > baseline
        conn.sock.shutdown(2)
        conn.close()
        after = served.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0)
        assert after["blocks_used"] == baseline
        assert after["requests"] == []
    finally:
        served.state.engine.resume()
    assert 'finish_reason="length"' not in served.request("GET", "/metrics")[2]
    assert served.request("POST", COMPLETIONS, {"prompt": "still there?", "max_tokens": 2})[0] == 200


def test_disconnect_while_waiting_without_streaming_aborts(start_server):
    served = start_server()
    served.state.engine.pause()  # the request waits in the queue and cannot finish by itself
    try:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        conn.request("POST", COMPLETIONS, body=json.dumps({"prompt": "hi", "max_tokens": 50}),
                     headers={"Content-Type": "application/json"})
        served.wait_for(lambda s: s["waiting"] == 1)
        conn.sock.shutdown(2)
        conn.close()
        after = served.wait_for(lambda s: s["waiting"] == 0 and s["running"] == 0)
        assert after["requests"] == [] and after["blocks_used"] == 0
    finally:
        served.state.engine.resume()
    assert 'finish_reason="length"' not in served.request("GET", "/metrics")[2]


def test_a_model_without_a_tokenizer_names_the_field_that_needs_one(start_server):
    """A model served with no tokenizer (LLM.from_model without one) takes token ids only: text sent to a route
    that would need a tokenizer is one 400 naming the field it came in, and token ids still generate."""
    model, _ = tiny_pair("llama", num_hidden_layers=2)
    served = start_server(llm=LLM.from_model(model, None, kv_cache_memory=1 << 20, block_size=4))
    name = served.request("GET", "/v1/models")[2]["data"][0]["id"]
    cases = [(COMPLETIONS, {"model": name, "prompt": "hello", "max_tokens": 2}, "prompt"),
             (CHAT, {"model": name, "messages": USER, "max_tokens": 2}, "messages"),
             ("/tokenize", {"prompt": "hello"}, "prompt"),
             ("/detokenize", {"tokens": [1, 2]}, "tokens")]
    for path, body, param in cases:
        assert_error(served.request("POST", path, body), 400, param=param, contains="no tokenizer")
    status, _, body = served.request("POST", COMPLETIONS, {"model": name, "prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2
    state = served.state_json()
    assert state["requests"] == [] and state["blocks_used"] == 0
