"""The OpenAI parameters work, through the real `openai` client against a real server (tiny model), each
against a reference computation: logprobs equal the log-softmax of the engine's own logits (recomputed without
a cache), a +100 logit_bias forces its token, penalties remove repetition, min_tokens holds back the end, echo,
several prompts in one completions request, models.retrieve, system_fingerprint, /tokenize and /detokenize."""

from __future__ import annotations

import pytest
import torch
from test_server_errors import COMPLETIONS, assert_error

from kvengine.sampling import SamplingParams

PROMPT = "The quick brown fox"
USER = [{"role": "user", "content": "Tell me about the object attribute."}]


def _reference_logprobs(llm, prompt_ids, output_ids):
    """log_softmax of the engine's logits at each output position: [len(output_ids), vocab]."""
    tokens = prompt_ids + output_ids
    logits = llm.engine.runner.full_logits_no_cache(tokens[:-1], len(prompt_ids) - 1)
    return torch.log_softmax(logits.float(), dim=-1)


def _offline(llm, ids, max_tokens, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)
    return llm.generate(prompt_token_ids=[ids], sampling_params=params)[0]


def test_chat_logprobs_are_the_log_softmax_of_the_engine_logits(client, tiny_reference):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    tok = tiny_reference.tokenizer
    ids = tok.encode_chat(USER)
    out = _offline(tiny_reference, ids, 6)
    ref = _reference_logprobs(tiny_reference, ids, out.token_ids)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for i, (entry, token) in enumerate(zip(content, out.token_ids, strict=True)):
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(ref[i, token]), abs=1e-3)
        top_values, top_ids = torch.topk(ref[i], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([int(t)], skip_special_tokens=False)
                                                         for t in top_ids]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top one


def test_completion_logprobs_streamed_and_whole(client, tiny_reference):
    tok = tiny_reference.tokenizer
    ids = tok.encode(PROMPT)
    out = _offline(tiny_reference, ids, 5)
    ref = _reference_logprobs(tiny_reference, ids, out.token_ids)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([float(ref[i, t]) for i, t in enumerate(out.token_ids)], abs=1e-3)
    assert [len(d) for d in lp.top_logprobs] == [2] * 5
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_sampled_logprobs_are_of_the_truncated_distribution(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0.8,
                                  logprobs=3, seed=7, extra_body={"top_k": 1, "ignore_eos": True})
    lp = r.choices[0].logprobs
    # top-k 1 keeps one token: it has probability 1 and every alternative is outside the kept set
    assert lp.token_logprobs == pytest.approx([0.0] * 4, abs=1e-6)
    assert all(sorted(d.values())[:2] == [-9999.0, -9999.0] for d in lp.top_logprobs)


def test_logit_bias_forces_a_token(client, tiny_reference):
    tok = tiny_reference.tokenizer
    forced = tok.encode(" object", add_special_tokens=False)[0]
    for temperature in (0, 1.0):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=temperature, seed=3,
                                      logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode([forced] * 5)
    banned = _offline(tiny_reference, tok.encode(PROMPT), 5).token_ids[0]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                  logit_bias={str(banned): -100}, logprobs=0, extra_body={"ignore_eos": True})
    assert tok.decode([banned], skip_special_tokens=False) not in r.choices[0].logprobs.tokens


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"extra_body": {"repetition_penalty": 1.8, "ignore_eos": True}}])
def test_penalties_remove_repetition(client, penalty):
    def distinct(**kw):
        kw.setdefault("extra_body", {"ignore_eos": True})
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, logprobs=0, **kw)
        return len(set(r.choices[0].logprobs.tokens))  # (distinct token texts)

    plain = distinct()
    assert plain < 25  # the tiny model repeats itself when nothing stops it
    assert distinct(**penalty) > plain


def test_min_tokens_holds_back_the_end_of_sequence(tiny_server):
    eos = tiny_server.llm.engine.eos_token_ids[0]
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logit_bias": {str(eos): 100}}
    status, _, plain = tiny_server.request("POST", COMPLETIONS, body)
    assert status == 200 and plain["usage"]["completion_tokens"] == 1
    status, _, held = tiny_server.request("POST", COMPLETIONS, {**body, "min_tokens": 4})
    assert status == 200 and held["usage"]["completion_tokens"] == 5
    assert held["choices"][0]["finish_reason"] == "stop"


def test_min_p_keeps_only_likely_tokens(client, tiny_reference):
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, n=3,
                                  extra_body={"min_p": 1.0, "ignore_eos": True})
    assert [c.text for c in r.choices] == [greedy] * 3  # min_p 1 keeps only the most likely token


def test_echo_and_several_prompts(client, tiny_reference):
    prompts = [PROMPT, "Return the value of"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2, echo=True,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    tok = tiny_reference.tokenizer
    for i, c in enumerate(r.choices):
        prompt = prompts[i // 2]
        assert c.text == prompt + _offline(tiny_reference, tok.encode(prompt), 4).text
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 16
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == PROMPT


def test_echo_with_logprobs_scores_the_prompt(client, tiny_reference):
    """echo + logprobs: the prompt's tokens (first null) then the generated ones, each prompt logprob equal to the
    log-softmax of one full no-cache pass over the prompt; whole and streamed agree."""
    tok = tiny_reference.tokenizer
    ids = tok.encode(PROMPT)
    out = _offline(tiny_reference, ids, 3)
    ref = torch.log_softmax(tiny_reference.engine.runner.full_logits_no_cache(ids + out.token_ids[:-1], 0), -1)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text == PROMPT + out.text
    full = ids + out.token_ids
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in full]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[i, full[i + 1]]) for i in range(len(full) - 1)],
                                                  abs=1e-3)
    assert all(1 <= len(d) <= 2 for d in lp.top_logprobs[1:])  # (keyed by text: two tokens may decode alike)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(PROMPT)  # generated text starts after it
    assert r.usage.model_extra["kvengine"]["prompt_logprobs_flops"] > 0
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text == PROMPT
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_best_of_equal_to_n_is_accepted(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, n=2, best_of=2, seed=1)
    assert len(r.choices) == 2


def test_models_retrieve_and_system_fingerprint(client, tiny_server):
    openai = pytest.importorskip("openai")
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    a = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    b = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert a.system_fingerprint and a.system_fingerprint.startswith("fp_")
    assert a.system_fingerprint == b.system_fingerprint == tiny_server.state.fingerprint
    chunk = next(iter(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, stream=True)))
    assert chunk.system_fingerprint == a.system_fingerprint


def test_tokenize_and_detokenize(tiny_server, tiny_reference):
    tok = tiny_reference.tokenizer
    status, _, data = tiny_server.request("POST", "/tokenize", {"prompt": PROMPT})
    assert status == 200 and data["tokens"] == tok.encode(PROMPT) and data["count"] == len(data["tokens"])
    assert data["max_model_len"] == 512
    status, _, chat = tiny_server.request("POST", "/tokenize", {"messages": USER})
    assert status == 200 and chat["tokens"] == tok.encode_chat(USER)
    status, _, text = tiny_server.request("POST", "/detokenize", {"tokens": tok.encode(PROMPT)})
    assert status == 200 and text["prompt"] == tok.decode(tok.encode(PROMPT))
    assert_error(tiny_server.request("POST", "/detokenize", {"tokens": [10**6]}), 400, param="tokens")
    for bad in (-1, 2**40):  # the tokenizer's own conversion overflowed on these (a 500 before the check)
        assert_error(tiny_server.request("POST", "/detokenize", {"tokens": [bad]}), 400, param="tokens")
        body = {"model": "tiny", "prompt": [bad], "max_tokens": 1, "echo": True}
        assert_error(tiny_server.request("POST", "/v1/completions", body), 400, param="prompt",
                     contains="token ids must be in [0, ")
    assert_error(tiny_server.request("POST", "/tokenize", {}), 400, param="prompt")
