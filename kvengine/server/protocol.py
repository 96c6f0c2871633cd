"""The OpenAI wire format's requests: request models (validated strictly), their parsing, errors. The responses'
side (bodies, chunks, usage) is server/responses.py.

Request bodies are parsed here, not by FastAPI, so every bad input becomes one OpenAI-style error
`{"error": {"message", "type", "param", "code"}}` with HTTP 400 (malformed JSON, wrong types, bad values).
Nothing here touches the engine: the app turns these models into token ids and SamplingParams.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvengine.errors import KVEngineError, RequestError
from kvengine.sampling import MAX_LOGPROBS, SamplingParams, check_range
from kvengine.structured import StructuredOutput
from kvengine.tools.plan import ToolPlan, history_tool_calls, plan_tools

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_JSON_DEPTH = 64  # nesting levels of a request body (json_schema included); deeper bodies are a 400
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
    min_p: float = 0.0  # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    min_tokens: int = 0  # extension (vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, min_length=1)  # vLLM's name: tenants with different salts never share
    user: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def sampling_params(self, max_tokens: int) -> list[SamplingParams]:
        """Parameters of each of the n choices (a seeded request's choice i uses seed + i), validated with
        OpenAI's ranges; every bad value is a RequestError naming its param."""
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        check_range("temperature", self.temperature, 0, 2)  # OpenAI's cap; the other ranges are SamplingParams'
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - self.n:
            raise RequestError(f"seed must fit in 64 bits, got {self.seed}", param="seed")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise RequestError(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty", param="stop")
        self._check_unsupported()
        base = SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(), logprobs=self.num_logprobs, structured=self._structured(),
            prompt_logprobs=self.num_prompt_logprobs)
        return [replace(base, seed=self.seed + i if self.seed is not None else None) for i in range(self.n)]

    def _logit_bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        return bias

    def _structured(self) -> StructuredOutput | None:
        """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind not in ("json_object", "json_schema"):
            raise RequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                               param="response_format")
        if kind == "json_object":
            return StructuredOutput("json_object")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                               "{...}}}", param="response_format")
        return StructuredOutput("json_schema", spec["schema"])

    def _check_unsupported(self) -> None:
        """Parameters this server does not implement are refused, never silently ignored."""

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token when log-probabilities are asked for, else None."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top alternatives per prompt token when the prompt's log-probabilities are asked for, else None."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token (0..20)
    best_of: int | None = None
    suffix: str | None = None

    def _check_unsupported(self) -> None:
        super()._check_unsupported()
        for name, value in (("tools", self.tools), ("tool_choice", self.tool_choice not in (None, "none"))):
            if value:
                raise RequestError(f"{name} is for /v1/chat/completions, not completions", param=name)
        if self.suffix:
            raise RequestError("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of must equal n ({self.n}): this server returns every candidate it "
                               f"generates, got best_of={self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs: the echoed prompt's tokens carry log-probabilities too (vLLM, OpenAI's legacy API)."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each as text or token ids (one request may carry several)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("the prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if len(p) * self.n > MAX_N:
            raise RequestError(f"at most {MAX_N} choices per request: {len(p)} prompts x n={self.n}", param="prompt")
        return [x if isinstance(x, str) else list(x) for x in p]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = history_tool_calls(self.tool_calls)
        out.update({k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v is not None})
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self, template: str | None, template_has_tools: bool) -> ToolPlan | None:
        """How this request may call its tools (None without tools); bad tools or tool_choice are a 400."""
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls is not False, template,
                          template_has_tools)

    def _check_unsupported(self) -> None:
        super()._check_unsupported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise RequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                   param="top_logprobs")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise RequestError("messages must not be empty", param="messages")
        return [m.as_template_dict() for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages run through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _reject_constant(name: str) -> float:
    raise RequestError(f"the request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"the request body is not valid JSON for this API: the number {text[:40]} is too large")
    return value


def json_depth_over(data: Any, limit: int) -> bool:
    """True if `data` nests lists/objects more than `limit` levels deep (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def parse_body(raw: bytes, model: type[BodyT]) -> BodyT:
    """Validate a raw JSON body; malformed JSON (NaN and Infinity included), nesting deeper than MAX_JSON_DEPTH,
    non-objects and wrong field types raise RequestError. Work proportional to the body: call it off the loop."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(f"the request body nests more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    if json_depth_over(data, MAX_JSON_DEPTH):
        raise RequestError(f"the request body nests more than {MAX_JSON_DEPTH} levels deep")
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
