"""The OpenAI API through the real `openai` client against a real server on 127.0.0.1 (tiny model):
completions and chat, streamed and not, equal to offline generation; usage, n, seed, stop, cache salts,
multi-turn prefix reuse, /v1/models, /health and /metrics."""

from __future__ import annotations

import re

import pytest

from kvengine.sampling import SamplingParams

PROMPT = "The quick brown fox"
LONG = "Return the value of the attribute named by the string; if the object has no such attribute, " * 2


def offline(llm, prompt_ids, max_tokens, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return llm.generate(prompt_token_ids=[prompt_ids], sampling_params=params)[0]


def test_models_lists_the_served_model(client, tiny_server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "kvengine"


def test_completion_equals_offline_generate_with_usage(client, tiny_reference):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    ids = tiny_reference.tokenizer.encode(PROMPT)
    ref = offline(tiny_reference, ids, 12)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.choices[0].logprobs is None
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert u.prompt_tokens_details.cached_tokens == 0
    ext = u.model_extra["kvengine"]
    assert 0 < ext["flops"] < ext["flops_no_cache"]
    assert ext["kv_cache_bytes"] > 0


def test_completion_accepts_token_ids_and_a_one_string_list(client, tiny_reference):
    ids = tiny_reference.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_list = client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_list.choices[0].text == offline(tiny_reference, ids, 6).text


def test_streamed_completion_equals_the_whole_response(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_offline_and_streams_role_then_content(client, tiny_reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    ref = offline(tiny_reference, tiny_reference.tokenizer.encode_chat(messages), 8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref.text
    assert stream[-1].choices[0].finish_reason == ref.finish_reason


def test_chat_content_parts_equal_plain_text(client):
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ab cd"}],
                                           max_tokens=5, temperature=0)
    parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "ab"},
                                                             {"type": "text", "text": " cd"}]}],
        max_tokens=5, temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_n_choices_with_seed_are_reproducible_and_use_seed_plus_index(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9)
    two = client.completions.create(n=2, seed=7, **kw)
    again = client.completions.create(n=2, seed=7, **kw)
    second_alone = client.completions.create(n=1, seed=8, **kw)
    texts = [c.text for c in sorted(two.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(two.choices, key=lambda c: c.index)] == [0, 1]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[1] == second_alone.choices[0].text
    assert two.usage.completion_tokens == 24
    assert two.usage.prompt_tokens == second_alone.usage.prompt_tokens


def test_streamed_n_choices_each_finish(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                                 max_tokens=4, temperature=0.8, seed=1, stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1, 2]


def test_stop_string_cuts_the_text(client, tiny_reference):
    ids = tiny_reference.tokenizer.encode(PROMPT)
    full = offline(tiny_reference, ids, 16).text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and full[i:i + 2]
                not in full[:i])
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_multi_turn_chat_reuses_the_first_turn_blocks(client, tiny_server):
    block = tiny_server.llm.kv_cache_spec.block_size
    turn1 = [{"role": "user", "content": LONG + "(multi-turn)"}]
    r1 = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    n1 = r1.usage.prompt_tokens
    assert n1 >= 2 * block
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens >= (n1 // block) * block


def test_cache_salt_separates_tenants(client):
    prompt = LONG + "(salted)"

    def cached(salt):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"cache_salt": salt})
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.model_extra["kvengine"]["miss_reason"]

    assert cached("tenant-a")[0] == 0
    assert cached("tenant-a")[0] > 0
    assert cached("tenant-b") == (0, "no_match")  # another salt's blocks are invisible


def test_metrics_under_vllm_names(client, tiny_server):
    """Routers built for vLLM (its production-stack router parses /metrics with prometheus_client and reads these
    samples) see the same figures under vLLM's names, labelled with the served model."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(2):  # the second reuses the first's full blocks: a prefix-cache hit
        client.completions.create(model="tiny", prompt=LONG, max_tokens=3, temperature=0)
    _, _, text = tiny_server.request("GET", "/metrics")
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    own = {name: samples[name].value for name in samples if name.startswith("kvengine_")}
    vllm = {name: s for name, s in samples.items() if name.startswith("vllm:")}
    assert all(s.labels == {"model_name": "tiny"} for s in vllm.values())
    pairs = {"vllm:num_requests_running": "kvengine_requests_running",
             "vllm:num_requests_waiting": "kvengine_requests_waiting",
             "vllm:gpu_cache_usage_perc": "kvengine_kv_cache_usage_ratio",
             "vllm:kv_cache_usage_perc": "kvengine_kv_cache_usage_ratio",
             "vllm:gpu_prefix_cache_hit_rate": "kvengine_prefix_cache_hit_rate",
             "vllm:gpu_prefix_cache_hits_total": "kvengine_prefix_cache_hit_tokens_total",
             "vllm:gpu_prefix_cache_queries_total": "kvengine_prefix_cache_query_tokens_total",
             "vllm:prefix_cache_hits_total": "kvengine_prefix_cache_hit_tokens_total",
             "vllm:prefix_cache_queries_total": "kvengine_prefix_cache_query_tokens_total",
             "vllm:num_preemptions_total": "kvengine_preemptions_total",
             "vllm:generation_tokens_total": "kvengine_generation_tokens_total"}
    assert {name: vllm[name].value for name in pairs} == {name: own[o] for name, o in pairs.items()}
    assert vllm["vllm:gpu_prefix_cache_hits_total"].value > 0 and vllm["vllm:generation_tokens_total"].value >= 6


def test_health_and_metrics(client, tiny_server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    status, _, body = tiny_server.request("GET", "/health")
    assert status == 200 and body == {"status": "ok"}
    status, headers, text = tiny_server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")

    def value(name):
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert m, f"{name} missing from /metrics"
        return float(m.group(1))

    assert value("kvengine_kv_blocks_total") == tiny_server.llm.engine.block_tables.num_blocks
    assert value("kvengine_kv_blocks_used") == 0
    assert value("kvengine_requests_running") == 0 and value("kvengine_requests_waiting") == 0
    assert value("kvengine_generation_tokens_total") >= 3
    assert value("kvengine_time_to_first_token_seconds_count") >= 1
    assert value("kvengine_inter_token_latency_seconds_count") >= 2
    assert 0 <= value("kvengine_prefix_cache_hit_rate") <= 1
    assert value("kvengine_preemptions_total") == 0
    assert 'kvengine_kv_cache_info{block_size="16",dtype="float32"} 1.0' in text


def test_raw_stream_ends_with_done(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    status, headers, text = tiny_server.request("POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_blocks_held_after_requests(tiny_server, path):
    body = {"model": "tiny", "max_tokens": 2, "prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}
    assert tiny_server.request("POST", path, body)[0] == 200
    state = tiny_server.state_json()
    assert state["blocks_used"] == 0 and state["running"] == 0 and state["requests"] == []
