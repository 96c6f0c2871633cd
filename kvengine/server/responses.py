"""The OpenAI wire format's responses: completion and chat bodies and their stream chunks (`ResponseWriter`), usage
with kvengine's FLOP/byte readout, log-probabilities, ids, fingerprints and server-sent events. The requests'
side (bodies, parsing, errors) is server/protocol.py."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from kvengine.cache.block_manager import MissReason
from kvengine.engine.output import RequestMetrics, RequestOutput
from kvengine.sampling import TokenLogprob
from kvengine.tools.call import ToolReply
from kvengine.tools.plan import ToolPlan


def new_id(kind: Literal["chat", "completion"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def tenant_miss_reason(reason: str | None) -> str | None:
    """The miss reason as the caller's own salt can see it: a block cached under another tenant's salt is, to
    this tenant, a block nobody cached ("no_match"); anything else would tell it what others sent."""
    return "no_match" if reason == MissReason.CACHE_SALT else reason


def usage(prompt_tokens: int, metrics: list[RequestMetrics], n: int = 1) -> dict[str, Any]:
    """OpenAI's usage (each prompt counted once, completions summed) plus kvengine's own FLOP/byte readout.
    `metrics` are per choice, n per prompt; the prefix-cache fields are summed over the prompts' first choices."""
    completion = sum(m.completion_tokens for m in metrics)
    firsts = [m for m in metrics[::n] if m is not None]
    cached = sum(m.cached_tokens for m in firsts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "kvengine": {
            "flops": sum(m.flops for m in metrics),
            "flops_no_cache": sum(m.flops_no_cache for m in metrics),
            "kv_cache_bytes": sum(m.kv_cache_bytes for m in metrics),
            "cached_tokens": cached,
            "cached_tokens_memory": sum(m.memory_tokens for m in firsts),
            "cached_tokens_disk": sum(m.disk_tokens for m in firsts),
            "disk_bytes_read": sum(m.disk_bytes_read for m in firsts),
            "disk_load_s": sum(m.disk_load_s for m in firsts),
            "reuse_flops_memory": sum(m.reuse_flops_memory for m in firsts),
            "reuse_flops_disk": sum(m.reuse_flops_disk for m in firsts),
            "recompute_s": firsts[0].recompute_s if firsts else None,
            "miss_reason": tenant_miss_reason(firsts[0].miss_reason) if firsts else None,
            "num_preemptions": sum(m.num_preemptions for m in metrics),
            "prompt_logprobs_flops": sum(m.prompt_logprobs_flops for m in metrics),
        },
    }


def system_fingerprint(model_name: str, configuration: str) -> str:
    """fp_ + a hash of the model and what makes its outputs differ (weights format, dtypes, KV format)."""
    return "fp_" + hashlib.sha256(f"{model_name}|{configuration}".encode()).hexdigest()[:12]


def chat_logprobs(items: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                        for x in items]}


def completion_logprobs(items: list[TokenLogprob], token_text: Callable[[int], str], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: parallel lists; text offsets start at `offset`."""
    tokens = [token_text(x.token_id) for x in items]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [{token_text(t): lp for t, lp in x.top} for x in items], "text_offset": offsets}


def prompt_logprobs_body(out: RequestOutput, token_text: Callable[[int], str]) -> dict[str, Any] | None:
    """Completions `logprobs` of an echoed prompt's tokens (the first has none: null), offsets from 0."""
    if out.prompt_logprobs is None:
        return None
    first = token_text(out.prompt_token_ids[0])
    rest = completion_logprobs([x for x in out.prompt_logprobs if x is not None], token_text, len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def echoed_logprobs(out: RequestOutput, token_text: Callable[[int], str], echo: str) -> dict[str, Any] | None:
    """Completions `logprobs` of an echoed choice: the prompt's tokens, then the generated ones, whose text
    offsets start after the echoed prompt `echo`."""
    body = prompt_logprobs_body(out, token_text)
    if body is not None and out.logprobs:
        for key, values in completion_logprobs(out.logprobs, token_text, len(echo)).items():
            body[key] += values
    return body


def assistant_message(reply: ToolReply) -> dict[str, Any]:
    """OpenAI's assistant message: content (None when it only calls tools) and tool_calls when it made any."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = [c.to_openai() for c in reply.calls]
    return message


class ResponseWriter:
    """Builds one request's response bodies (whole or chunked) in OpenAI's shape for chat or completions."""

    def __init__(self, kind: Literal["chat", "completion"], model: str, fingerprint: str | None = None,
                 token_text: Callable[[int], str] = str, tools: ToolPlan | None = None) -> None:
        self.kind = kind
        self.tools = tools if tools is not None and tools.calls_possible else None  # reads calls out of the text
        self.id = new_id(kind)
        self.model = model
        self.fingerprint = fingerprint
        self.token_text = token_text
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _logprobs(self, items: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
        if items is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(items, self.token_text)
        return completion_logprobs(items, self.token_text, offset)

    def full(self, outputs: list[RequestOutput], usage_body: dict[str, Any],
             echo: list[str] | None = None) -> dict[str, Any]:
        chat = self.kind == "chat"
        body = self._head("chat.completion" if chat else "text_completion")
        choices = []
        for i, out in enumerate(outputs):
            prefix = echo[i] if echo is not None else ""
            lp = self._logprobs(out.logprobs, len(prefix))
            if echo is not None and out.prompt_logprobs is not None:
                lp = echoed_logprobs(out, self.token_text, prefix)
            choice = {"index": i, "logprobs": lp, "finish_reason": out.finish_reason}
            if chat:
                reply = self.tools.reply(out.text) if self.tools is not None else ToolReply(out.text)
                choice["message"] = assistant_message(reply)
                if reply.calls:
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = prefix + out.text
            choices.append(choice)
        body["choices"] = choices
        body["usage"] = usage_body
        return body

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              with_usage_field: bool = False, logprobs: list[TokenLogprob] | None = None,
              text_offset: int = 0, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        chat = self.kind == "chat"
        body = self._head("chat.completion.chunk" if chat else "text_completion")
        lp = self._logprobs(logprobs, text_offset)
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if with_usage_field:
            body["usage"] = None
        return body

    def echo_chunk(self, index: int, echo: str, first: RequestOutput, with_usage_field: bool) -> dict[str, Any]:
        """A completions stream's echoed prompt, with its tokens' log-probabilities when they were asked for (they
        come with the choice's `first` output)."""
        body = self.chunk(index, echo, with_usage_field=with_usage_field)
        body["choices"][0]["logprobs"] = prompt_logprobs_body(first, self.token_text)
        return body

    def usage_chunk(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage_body
        return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying a JSON body (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
