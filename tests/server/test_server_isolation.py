"""No request can hurt another, no tenant can learn about another (real server, raw HTTP and the `openai`
client): OpenAI's ranges checked at the edge (400 naming the param), a failure in one sequence of an engine step
fails only that request (injected with a wrapped model forward / NaN logits: a mock of the fault, the rest is
real), deep JSON is a 400, tokenizing runs off the event loop, /metrics and the dashboard state follow the api
keys, and a non-streaming client that disconnects is aborted without another engine step."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from kvtest import poisoned_run
from test_server_errors import CHAT, COMPLETIONS, USER, assert_error

from kvengine.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Return the value of", "if the object has no such"]


@pytest.mark.parametrize(("body", "param", "contains"), [
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "[0.01, 2]"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "max_tokens=4"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"a": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"100000": 1}}, "logit_bias", "outside the vocabulary"),
    ({"stop": ["x", ""]}, "stop", "must not be empty"),
    ({"stop_token_ids": [100000]}, "stop_token_ids", "outside the vocabulary"),
    ({"top_k": -2}, "top_k", "top_k"),
    ({"n": 17}, "n", "between 1 and 16"),
    ({"response_format": {"type": "xml"}}, "response_format", "must be text, json_object or json_schema"),
])
def test_sampling_values_outside_openai_ranges_are_400(tiny_server, body, param, contains):
    for path, base in ((COMPLETIONS, {"prompt": "hi"}), (CHAT, {"messages": USER})):
        assert_error(tiny_server.request("POST", path, {**base, **body}), 400, param=param, contains=contains)


@pytest.mark.parametrize(("path", "body", "param", "contains"), [
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, "best_of", "must equal n"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
])
def test_other_refused_parameters_name_their_param(tiny_server, path, body, param, contains):
    assert_error(tiny_server.request("POST", path, body), 400, param=param, contains=contains)


@pytest.mark.parametrize("raw", [
    b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "top_p": -Infinity}',
    b'{"prompt": "hi", "temperature": 1e400}',
])
def test_non_finite_numbers_are_400(tiny_server, raw):
    assert_error(tiny_server.request("POST", COMPLETIONS, raw), 400, contains="JSON")


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_body_is_400_not_500(tiny_server, depth):
    raw = b'{"prompt": "hi", "extra": ' + b"[" * depth + b"]" * depth + b"}"
    assert_error(tiny_server.request("POST", COMPLETIONS, raw), 400, contains="nests more than 64 levels")
    assert tiny_server.request("POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 1})[0] == 200


def test_non_json_content_type_is_415(tiny_server):
    resp = tiny_server.request("POST", COMPLETIONS, {"prompt": "hi"}, {"Content-Type": "text/plain"})
    assert_error(resp, 415, contains="application/json")


def _concurrently(served, bodies):
    results: list = [None] * len(bodies)

    def send(i):
        results[i] = served.request("POST", COMPLETIONS, bodies[i])
    served.state.engine.pause()  # all of them join the same steps
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        served.wait_for(lambda s: s["waiting"] == len(bodies))
    finally:
        served.state.engine.resume()
        for t in threads:
            t.join(60)
    return results


def _greedy(prompt):
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _offline(reference, prompt):
    out = reference.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    return out.text


@pytest.mark.parametrize("fault", ["forward", "nan_logits"])
def test_a_failing_sequence_fails_alone_and_the_others_finish_normally(start_server, tiny_reference, fault):
    """The fault is injected (a mock): the model forward raises, or returns NaN logits, whenever the batch holds
    the poisoned prompt's first token; the engine re-runs the step's sequences one by one (forward) or isolates
    the row (sampler), so only the poisoned request fails."""
    served = start_server()
    poison = served.llm.tokenizer.encode("zzz zzz poison")
    runner = served.llm.engine.runner
    real_run = runner.run

    runner.run = poisoned_run(real_run, poison, fault)
    try:
        results = _concurrently(served, [_greedy(p) for p in PROMPTS] + [{**_greedy(""), "prompt": poison}])
    finally:
        runner.run = real_run
    for prompt, (status, _, body) in zip(PROMPTS, results, strict=False):
        assert status == 200, body
        assert body["choices"][0]["text"] == _offline(tiny_reference, prompt)
        assert body["choices"][0]["finish_reason"] == "length"
    assert_error(results[-1], 500, type_="server_error", code="engine_error",
                 contains="injected fault" if fault == "forward" else "non-finite logits")
    state = served.wait_for(lambda s: s["running"] == 0)
    assert state["requests"] == [] and state["blocks_used"] == 0
    assert served.request("POST", COMPLETIONS, _greedy(PROMPTS[0]))[0] == 200


def test_a_bad_request_among_good_ones_changes_nothing(start_server, tiny_reference):
    served = start_server()
    results = _concurrently(served, [_greedy(p) for p in PROMPTS])
    bad = served.request("POST", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}')
    assert bad[0] == 400
    for prompt, (status, _, body) in zip(PROMPTS, results, strict=True):
        assert status == 200 and body["choices"][0]["text"] == _offline(tiny_reference, prompt)


# ---- tenants -------------------------------------------------------------------------------------------

def test_metrics_and_dashboard_state_need_a_key_unless_opened(start_server):
    keyed = start_server(api_keys=["key-one"])
    for path in ("/metrics", "/dashboard/state"):
        assert_error(keyed.request("GET", path), 401, type_="authentication_error", code="invalid_api_key")
        assert keyed.request("GET", path, headers={"Authorization": "Bearer key-one"})[0] == 200
    opened = start_server(api_keys=["key-one"], open_observability=True)
    for path in ("/metrics", "/dashboard/state"):
        assert opened.request("GET", path)[0] == 200
    assert_error(opened.request("GET", "/v1/models"), 401, type_="authentication_error", code="invalid_api_key")


def test_miss_reason_never_tells_a_tenant_what_another_sent(tiny_server):
    prompt = "A prompt that only tenant one sends, long enough for full blocks. " * 3

    def reason(salt):
        body = {"prompt": prompt, "max_tokens": 1, "cache_salt": salt}
        return tiny_server.request("POST", COMPLETIONS, body)[2]["usage"]["kvengine"]["miss_reason"]

    fresh = reason("tenant-two-first")  # nobody has sent it under this salt: the reason a tenant sees
    reason("tenant-one")
    assert reason("tenant-two") == fresh == "no_match"


# ---- the event loop ------------------------------------------------------------------------------------

def test_tokenizing_runs_off_the_event_loop(start_server):
    """encode blocks until /health has answered: if it ran on the event loop, /health could not answer."""
    served = start_server()
    tokenizer = served.llm.tokenizer
    real_encode = tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text, *args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real_encode(text, *args, **kwargs)

    tokenizer.encode = slow_encode
    result = []
    sender = threading.Thread(target=lambda: result.append(
        served.request("POST", COMPLETIONS, {"prompt": "hello", "max_tokens": 2})))
    try:
        sender.start()
        assert entered.wait(30)
        assert served.request("GET", "/health")[0] == 200  # while the tokenizer is busy
    finally:
        release.set()
        sender.join(60)
        tokenizer.encode = real_encode
    assert result[0][0] == 200


def test_a_maximum_size_prompt_is_refused_without_tokenizing(start_server, monkeypatch):
    served = start_server()
    calls = []
    real_encode = served.llm.tokenizer.encode
    monkeypatch.setattr(served.llm.tokenizer, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    text = "x" * (15 << 20)  # just under the 16 MiB body limit
    for path, body in ((COMPLETIONS, {"prompt": text}), (CHAT, {"messages": [{"role": "user", "content": text}]})):
        param = "prompt" if path == COMPLETIONS else "messages"
        assert_error(served.request("POST", path, body), 400, param=param, contains="context is 512 tokens")
    assert calls == []
    assert served.request("GET", "/health")[0] == 200


# ---- disconnects ---------------------------------------------------------------------------------------

def test_non_streaming_disconnect_aborts_without_another_step(start_server):
    """The engine is paused once the request is running, so it is aborted with no further step: the abort
    comes from the disconnect itself, not from a poll or from generation ending."""
    served = start_server()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    body = {"prompt": "Once upon a time " * 8, "max_tokens": 400, "ignore_eos": True}
    conn.request("POST", COMPLETIONS, body=json.dumps(body), headers={"Content-Type": "application/json"})
    held = served.wait_for(lambda s: s["running"] == 1 and s["tokens_generated"] > 0)
    served.state.engine.pause()
    try:
        steps = served.state_json()["steps"]
        assert held["blocks_used"] > 0
        conn.sock.shutdown(2)
        conn.close()
        after = served.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0)
        assert after["requests"] == [] and after["blocks_used"] == 0
        assert after["steps"] == steps
    finally:
        served.state.engine.resume()
    assert 'finish_reason="length"' not in served.request("GET", "/metrics")[2]
