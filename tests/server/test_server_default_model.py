"""End to end on the real default model (SmolLM2-135M-Instruct): a two-turn chat through the `openai` client
reports the first turn's tokens as cached, streamed chat equals the whole response, and both equal offline
`llm.chat` on the same engine."""

from __future__ import annotations

import pytest

from kvengine.llm import LLM
from kvengine.sampling import SamplingParams
from kvengine.server.app import ServerThread, create_app

pytestmark = pytest.mark.real_model

TURN1 = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_two_turn_chat_reuses_cache_and_streaming_matches(default_gguf):
    openai = pytest.importorskip("openai")
    llm = LLM(str(default_gguf), kv_cache_memory=64 << 20, max_num_seqs=4)
    block = llm.kv_cache_spec.block_size
    with ServerThread(create_app(llm)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        r1 = client.chat.completions.create(model=model, messages=TURN1, max_tokens=24, temperature=0)
        answer = r1.choices[0].message.content
        turn2 = TURN1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And of Italy?"}]
        chunks = list(client.chat.completions.create(model=model, messages=turn2, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        whole2 = client.chat.completions.create(model=model, messages=turn2, max_tokens=24, temperature=0)
    assert "Paris" in answer
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    usage2 = chunks[-1].usage
    assert usage2.prompt_tokens == len(llm.tokenizer.encode_chat(turn2))
    # everything the first turn computed (its prompt and answer, whole blocks) came from the cache
    first_turn_tokens = r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert usage2.prompt_tokens_details.cached_tokens >= (first_turn_tokens // block) * block - block
    assert usage2.prompt_tokens_details.cached_tokens >= (r1.usage.prompt_tokens // block) * block > 0
    assert usage2.model_extra["kvengine"]["flops"] < usage2.model_extra["kvengine"]["flops_no_cache"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole2.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    greedy = SamplingParams(max_tokens=24, temperature=0)
    assert llm.chat(TURN1, greedy)[0].text == answer  # the server is gone; the engine is ours again
    assert llm.chat(turn2, greedy)[0].text == streamed
    assert llm.engine.block_tables.num_used_blocks == 0
