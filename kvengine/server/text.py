"""TextCodec: the server's text <-> token ids, off the event loop and bounded by what the context can hold.

Tokenizing and chat templating take time proportional to the text, so they run on worker threads (the
`tokenizers` backend releases the GIL while it encodes). A text with more characters than
max_model_len x the longest token's UTF-8 bytes cannot fit the context whatever its tokens are (each token
covers at most that many bytes, and a character is at least one byte), so it is refused before it is
tokenized: a maximum-size body costs a length check, not seconds of BPE.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from kvengine.errors import RequestError, check_token_ids
from kvengine.server.protocol import ChatCompletionRequest
from kvengine.tools.plan import ToolPlan
from kvengine.weights.tokenizer import Tokenizer


class TextCodec:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._max_token_bytes: int | None = None

    def _need(self, what: str, param: str) -> Tokenizer:
        """The tokenizer, or a 400 naming the field (`param`) whose text needs one."""
        if self.tokenizer is None:
            raise RequestError(f"this model has no tokenizer; {what}", param=param)
        return self.tokenizer

    def max_token_bytes(self, tokenizer: Tokenizer) -> int:
        """The longest token's UTF-8 length (computed once, on a worker thread)."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max(len(tokenizer.decode([i], skip_special_tokens=False).encode())
                                        for i in range(tokenizer.vocab_size))
        return self._max_token_bytes

    def check_size(self, tokenizer: Tokenizer, chars: int, param: str) -> None:
        limit, most = self.max_model_len, self.max_token_bytes(tokenizer)
        if chars > limit * most:
            raise RequestError(f"the {param} has {chars} characters; this model's context is {limit} tokens and a "
                               f"token spans at most {most} bytes, so it cannot fit", param=param)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._need("send the prompt as token ids", "prompt")

        def encode() -> list[int]:
            self.check_size(tokenizer, len(text), "prompt")
            return tokenizer.encode(text, add_special_tokens)
        return await asyncio.to_thread(encode)

    async def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat template applied (with the tools a request offers) and encoded."""
        tokenizer = self._need("send token ids to /v1/completions", "messages")

        def encode() -> list[int]:
            self.check_size(tokenizer, sum(len(m["content"]) for m in messages), "messages")
            if tools:
                self.check_size(tokenizer, len(json.dumps(tools)), "tools")
            return tokenizer.encode_chat(messages, add_generation_prompt, tools)
        return await asyncio.to_thread(encode)

    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan | None:
        """How the request may call its tools, given what this model's chat template can show."""
        tokenizer = self.tokenizer
        return body.tool_plan(tokenizer.chat_template if tokenizer else None,
                              tokenizer is not None and tokenizer.supports_tools)

    async def decode(self, ids: list[int], param: str = "tokens") -> str:
        """The text of token ids a client sent (`param`: the field they came in); ids outside the tokenizer's
        vocabulary are a 400, not a 5xx from the tokenizer's own conversion."""
        tokenizer = self._need("it cannot detokenize", param)
        check_token_ids(ids, tokenizer.vocab_size, param)
        return await asyncio.to_thread(tokenizer.decode, ids)

    def token_text(self) -> Callable[[int], str]:
        """One token's text (logprobs entries); its id as text without a tokenizer."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            return str
        return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
