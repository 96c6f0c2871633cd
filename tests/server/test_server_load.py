"""Load: 64 concurrent streaming clients (the real async `openai` client, loopback only, bounded in time).
Every request completes, greedy outputs equal offline `llm.generate` for the same prompts, no KV block is
leaked afterwards, and the server still answers."""

from __future__ import annotations

import asyncio

import pytest

from kvengine.sampling import SamplingParams

CLIENTS = 64
MAX_TOKENS = 16
OVERALL_TIMEOUT_S = 240


def prompts() -> list[str]:
    subjects = ["the sea", "a lamp", "numbers", "the wind", "a garden", "old maps", "snow", "bridges"]
    return [f"Request {i}: a few words about {subjects[i % len(subjects)]}" for i in range(CLIENTS)]


async def stream_all(base_url: str, texts: list[str]) -> list[tuple[str, str | None, int]]:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> tuple[str, str | None, int]:
        text, finish, tokens = "", None, 0
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in texts)), OVERALL_TIMEOUT_S)
    finally:
        await client.close()


def test_64_concurrent_streams_match_offline_and_leak_nothing(start_server, tiny_reference):
    served = start_server(max_num_seqs=16)  # 64 clients, 16 slots: requests join as others leave
    texts = prompts()
    results = asyncio.run(stream_all(served.url, texts))
    offline = tiny_reference.generate(texts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert len(results) == CLIENTS
    assert [r[0] for r in results] == [o.text for o in offline]
    assert [r[1] for r in results] == [o.finish_reason for o in offline]
    assert [r[2] for r in results] == [len(o.token_ids) for o in offline]
    state = served.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout=10)
    assert state["blocks_used"] == 0 and state["requests"] == []
    assert state["tokens_generated"] == sum(r[2] for r in results)
    status, _, body = served.request("POST", "/v1/completions", {"prompt": texts[0], "max_tokens": MAX_TOKENS,
                                                                   "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == offline[0].text
    assert served.request("GET", "/health")[0] == 200
