"""`kvengine cluster`'s endpoint: the real openai client against 2 replicas on a local Ray instance."""

from __future__ import annotations

import httpx
import pytest
from clustertest import needs_ray

pytestmark = [needs_ray, pytest.mark.ray]
MESSAGES = [{"role": "user", "content": "Tell me about the import statement in Python."}]


def test_chat_and_completions_with_the_openai_client(cluster):
    client = cluster.client()
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=6,
                                                           temperature=0)
    chat = raw.parse()
    assert raw.headers["x-kvengine-replica"] in cluster.replica_pids()
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content  # greedy: the same text from either replica
    assert chunks[-1].usage.completion_tokens == 6
    done = client.completions.create(model=model, prompt="def main():", max_tokens=4, n=2, temperature=0)
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 8


def test_errors_and_auth_are_the_servers(cluster):
    import openai

    client = cluster.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=client.models.list().data[0].id, prompt="x", max_tokens=0)
    too_long = httpx.post(cluster.url + "/v1/completions", json={"prompt": list(range(3, 300)) * 5, "max_tokens": 2},
                          timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(cluster.url + "/metrics", timeout=30).status_code == 200


def test_a_replica_hands_its_kv_events_in_vllms_schema(cluster):
    import msgpack
    from ray import serve

    handle = serve.get_deployment_handle("engine", app_name="kvengine")
    batch = msgpack.unpackb(handle.kv_events.remote().result(timeout_s=60))
    assert set(batch) == {"ts", "events"}
    assert {e["type"] for e in batch["events"]} <= {"AllBlocksCleared", "BlockStored", "BlockRemoved"}
    older = msgpack.unpackb(handle.kv_events.remote(array_like=True).result(timeout_s=60))
    assert isinstance(older, list) and isinstance(older[1], list)
