"""The OpenAI wire format: request models (validated strictly), response and chunk bodies, usage, errors.

Request bodies are parsed here, not by FastAPI, so every bad input becomes one OpenAI-style error
`{"error": {"message", "type", "param", "code"}}` with HTTP 400 (malformed JSON, wrong types, bad values).
Nothing here touches the engine: the app turns these models into token ids and SamplingParams.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvengine.engine.output import RequestMetrics, RequestOutput
from kvengine.errors import KVEngineError, RequestError
from kvengine.sampling import SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
BodyT = TypeVar("BodyT", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # union-member tags in pydantic locations


class _Body(BaseModel):
    """Unknown fields are ignored (clients send many); known fields must have the right JSON type."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, min_length=1)  # vLLM's name: tenants with different salts never share
    user: str | None = None
    logprobs: bool | int | None = None

    def sampling_params(self, max_tokens: int) -> list[SamplingParams]:
        """Parameters of each of the n choices (a seeded request's choice i uses seed + i)."""
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported by this server", param="logprobs")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - self.n:
            raise RequestError(f"seed must fit in 64 bits, got {self.seed}", param="seed")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise RequestError(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        return [SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, seed=self.seed + i if self.seed is not None else None, stop=stop,
                               stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)
                for i in range(self.n)]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False

    def prompt_text_or_ids(self) -> str | list[int]:
        """The one prompt, as text or token ids (a batch of prompts is not supported)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise RequestError("the prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return list(p)
        if len(p) != 1:
            raise RequestError(f"send one prompt per request (got a list of {len(p)}); use n for several "
                               "choices", param="prompt")
        return p[0]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise RequestError("messages must not be empty", param="messages")
        return [m.as_template_dict() for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(raw: bytes, model: type[BodyT]) -> BodyT:
    """Validate a raw JSON body; malformed JSON, non-objects and wrong field types raise RequestError."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = error_param(err["loc"])
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def error_param(loc: tuple[Any, ...]) -> str | None:
    """'messages.0.content' from a pydantic location, without the union-member tags pydantic adds."""
    parts = [str(p) for p in loc if isinstance(p, int) or (str(p).lower() not in _TYPE_TAGS and "[" not in str(p))]
    return ".".join(parts) or None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_from(exc: KVEngineError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


# ---- responses -----------------------------------------------------------------------------------------

def new_id(kind: Literal["chat", "completion"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, metrics: list[RequestMetrics]) -> dict[str, Any]:
    """OpenAI's usage (the prompt counted once, completions summed) plus kvengine's own FLOP/byte readout."""
    completion = sum(m.completion_tokens for m in metrics)
    first = metrics[0] if metrics else None
    cached = first.cached_tokens if first else 0
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
            "cached_tokens_memory": first.memory_tokens if first else 0,
            "cached_tokens_disk": first.disk_tokens if first else 0,
            "disk_bytes_read": first.disk_bytes_read if first else 0,
            "disk_load_s": first.disk_load_s if first else 0.0,
            "reuse_flops_memory": first.reuse_flops_memory if first else 0,
            "reuse_flops_disk": first.reuse_flops_disk if first else 0,
            "recompute_s": first.recompute_s if first else None,
            "miss_reason": first.miss_reason if first else None,
            "num_preemptions": sum(m.num_preemptions for m in metrics),
        },
    }


class ResponseWriter:
    """Builds one request's response bodies (whole or chunked) in OpenAI's shape for chat or completions."""

    def __init__(self, kind: Literal["chat", "completion"], model: str) -> None:
        self.kind = kind
        self.id = new_id(kind)
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, outputs: list[RequestOutput], usage_body: dict[str, Any]) -> dict[str, Any]:
        chat = self.kind == "chat"
        body = self._head("chat.completion" if chat else "text_completion")
        body["choices"] = [
            {"index": i, "logprobs": None, "finish_reason": out.finish_reason,
             **({"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text})}
            for i, out in enumerate(outputs)
        ]
        body["usage"] = usage_body
        return body

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              with_usage_field: bool = False) -> dict[str, Any]:
        chat = self.kind == "chat"
        body = self._head("chat.completion.chunk" if chat else "text_completion")
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if with_usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage_body
        return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying a JSON body (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
