"""What a chat request with `tools` does: the tools it offers (validated), how it may call them (`tool_choice`),
the grammar that forces a call when one is required, and how each choice's text becomes calls.

- "none": the template sees the tools; the model's text is returned as text.
- "auto": the model writes text or calls in its template's own format; a parser (one per format, chosen from the
  template) reads the calls out of the text.
- "required" / a named function: generation is constrained (kvengine/structured.py) to JSON that is the call(s):
  for "required" an array of `{"name", "arguments"}` (one item when parallel calls are off), for a named function
  the arguments object itself. The output always parses and follows each tool's parameters schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from kvengine.errors import RequestError
from kvengine.sampling import SamplingParams
from kvengine.structured import StructuredOutput, check_json_schema
from kvengine.tools.call import ToolCall, ToolReply, arguments_text
from kvengine.tools.hermes import HermesParser

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
PARSERS = (HermesParser,)  # the formats "auto" reads, tried in order against the chat template
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolMode(StrEnum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any] = field(hash=False, compare=False)

    def template_dict(self) -> dict[str, Any]:
        """The tool as chat templates expect it (OpenAI's shape, as transformers passes `tools`)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """JSON schema of one call of this tool: {"name": <this name>, "arguments": <its parameters>}."""
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": self.name}, "arguments": self.parameters}}


@dataclass(slots=True)
class ToolPlan:
    tools: list[Tool]
    mode: ToolMode
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True
    parser: HermesParser | None = None  # how "auto" reads calls from text

    @property
    def calls_possible(self) -> bool:
        return self.mode != ToolMode.NONE

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.template_dict() for t in self.tools]

    def structured(self) -> StructuredOutput | None:
        """The grammar of a forced call ("required" or named), else None."""
        if self.mode == ToolMode.NAMED:
            return StructuredOutput("json_schema", self._tool(self.name).parameters, param="tools")
        if self.mode != ToolMode.REQUIRED:
            return None
        items: dict[str, Any] = {"anyOf": [t.call_schema() for t in self.tools]}
        schema = {"type": "array", "minItems": 1, "items": items, **({} if self.parallel else {"maxItems": 1})}
        return StructuredOutput("json_schema", schema, param="tools")

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """`params` with the forced call's grammar (a request cannot also ask for a response_format)."""
        grammar = self.structured()
        if grammar is None:
            return params
        if params.structured is not None:
            raise RequestError(f"response_format cannot be combined with tool_choice {self.mode.value!r}",
                               param="response_format")
        return replace(params, structured=grammar)

    def reply(self, text: str) -> ToolReply:
        """The calls in one choice's text; text that holds no (complete) call is returned as content."""
        if self.mode == ToolMode.AUTO and self.parser is not None:
            return self.parser.parse(text, {t.name for t in self.tools})
        if self.mode in (ToolMode.NONE, ToolMode.AUTO):
            return ToolReply(text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:  # cut short (max_tokens): no call was made
            return ToolReply(text)
        if self.mode == ToolMode.NAMED:
            return ToolReply(None, [ToolCall(self.name, arguments_text(value))])
        return ToolReply(None, [ToolCall(c["name"], arguments_text(c["arguments"])) for c in value])

    def _tool(self, name: str | None) -> Tool:
        return next(t for t in self.tools if t.name == name)


def plan_tools(tools: Any, tool_choice: Any, parallel: bool, template: str | None,
               template_has_tools: bool) -> ToolPlan | None:
    """The plan of a chat request (None without tools); every bad input is a RequestError naming its param."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not template_has_tools:
        raise RequestError("this model's chat template does not support tools (it never reads `tools`)",
                           param="tools")
    offered = parse_tools(tools)
    mode, name = _choice(tool_choice, {t.name for t in offered})
    parser = next((p() for p in PARSERS if p.matches(template or "")), None)
    if mode == ToolMode.AUTO and parser is None:
        raise RequestError("tool_choice 'auto' needs a tool-call format kvengine reads (hermes <tool_call>); "
                           "this model's template uses another: use 'required' or a named function",
                           param="tool_choice")
    return ToolPlan(offered, mode, name, parallel, parser)


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    parsed: list[Tool] = []
    for i, entry in enumerate(tools):
        fn = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(fn, dict):
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name, params, desc = fn.get("name"), fn.get("parameters", EMPTY_PARAMETERS), fn.get("description")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", param="tools")
        if any(t.name == name for t in parsed):
            raise RequestError(f"tools[{i}]: the function name {name!r} is used twice", param="tools")
        if not isinstance(params, dict) or not (desc is None or isinstance(desc, str)):
            raise RequestError(f"tools[{i}].function: parameters must be a JSON schema object and description "
                               f"a string", param="tools")
        check_json_schema(params, f"tools[{i}].function.parameters", "tools")
        parsed.append(Tool(name, desc, params))
    return parsed


def _choice(choice: Any, names: set[str]) -> tuple[ToolMode, str | None]:
    if choice is None:
        return ToolMode.AUTO, None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestError(f"tool_choice must be none, auto, required or a function, got {choice!r}",
                               param="tool_choice")
        return ToolMode(choice), None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise RequestError("tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param="tool_choice")
    if name not in names:
        raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools",
                           param="tool_choice")
    return ToolMode.NAMED, name


def history_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's earlier `tool_calls` for the template: arguments as an object (templates write
    them with `tojson`, as transformers expects), not OpenAI's JSON text."""
    out = []
    for call in calls:
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError("each tool_calls entry needs {\"function\": {\"name\", \"arguments\"}}",
                               param="messages")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            raise RequestError(f"tool call {fn['name']!r}: arguments are not JSON", param="messages") from None
        out.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out
