"""Property test of the request validator: any JSON body, however wrong, is parsed into a request and its
SamplingParams, or refused with a RequestError naming what is wrong; never any other exception (a 5xx)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.errors import RequestError
from kvengine.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body

FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "n", "best_of", "max_tokens", "min_tokens", "seed", "stop", "stop_token_ids", "logit_bias", "logprobs",
          "top_logprobs", "echo", "suffix", "stream", "response_format", "tools", "tool_choice", "cache_salt"]
EXAMPLES = 300  # per request kind; recorded in docs/server.md


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                        allow_infinity=False), st.text(max_size=6))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=8)


def _validator_property(model, base):
    """Built by a factory so the test function has no parameters with defaults (hypothesis would refuse)."""
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @given(st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=5))
    def check(fields):
        raw = json.dumps({**base, **fields}).encode()
        try:
            body = parse_body(raw, model)
            body.sampling_params(16)
            if isinstance(body, CompletionRequest):
                body.prompts()
            else:
                body.tool_plan("{{ tools }}<tool_call>", True)
        except RequestError as e:
            assert e.message and "\n" not in e.message
    return check


test_completion_validator_never_fails_otherwise = _validator_property(CompletionRequest, {"prompt": "hi"})
test_chat_validator_never_fails_otherwise = _validator_property(
    ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
