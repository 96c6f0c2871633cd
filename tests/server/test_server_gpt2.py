"""The seeds' model family behind the server: a tiny random GPT-2 folder (learned positions, LayerNorm, fused QKV,
tied head) served through the same paged cache and OpenAI routes as the Llama family, with the real `openai` client.

Served text equals offline generation on the same weights, streamed text equals the whole response, a shared prefix
is reused from the cache, and a chat request to a model with no chat template is one 400.
"""

from __future__ import annotations

import pytest
from gpt2test import make_gpt2_folder, tiny_gpt2_hf

from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

openai = pytest.importorskip("openai")

PROMPT = "The cache keeps the keys and values of earlier tokens, so"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Overrides conftest's Llama folder: start_server, tiny_server and client serve GPT-2 in this module."""
    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2-server") / "tiny-gpt2", tiny_gpt2_hf(n_positions=512))


def test_served_completion_equals_offline_generation(client, tiny_folder):
    offline = LLM(str(tiny_folder), weights="fp32", kv_cache_memory=4 << 20)
    assert type(offline.engine.model).__name__.startswith("GPT2")
    want = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == 12
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == want.text


def test_shared_prefix_is_reused_from_the_cache(tiny_server, client):
    model = client.models.list().data[0].id
    history = "GPT-2 learns one position vector per place in its context; " * 3  # byte-level: ~180 tokens
    first = client.completions.create(model=model, prompt=history + " First", max_tokens=2, temperature=0)
    second = client.completions.create(model=model, prompt=history + " Second", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # at least one whole block of the history
    state = tiny_server.wait_for(lambda s: s["requests"] == [])
    assert state["blocks_used"] == 0  # nothing running holds a block


def test_chat_without_a_template_is_one_400(client):
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.status_code == 400
    assert "chat template" in err.value.body["message"]
