"""The Hermes tool-call format (Hermes 2 Pro, Qwen 2.5/3, and the templates that copy them): each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's text, after any prose."""

from __future__ import annotations

import json
import re

from kvengine.tools.call import ToolCall, ToolReply, arguments_text

MARKER = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # an unclosed last block runs to the end


class HermesParser:
    """Reads the calls out of a whole reply; a reply whose calls do not parse is all text."""

    marker = MARKER

    @staticmethod
    def matches(template: str) -> bool:
        """Whether a chat template writes calls this way."""
        return MARKER in template

    def parse(self, text: str, names: set[str]) -> ToolReply:
        start = text.find(MARKER)
        if start < 0:
            return ToolReply(text)
        calls = []
        for block in _BLOCK.finditer(text, start):
            call = _call(block.group(1), names)
            if call is None:
                return ToolReply(text)
            calls.append(call)
        return ToolReply(text[:start].strip() or None, calls)


def _call(body: str, names: set[str]) -> ToolCall | None:
    """One block's call, or None if it is not JSON naming one of `names` with an object of arguments."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
    if name not in names or not isinstance(args, dict):
        return None
    return ToolCall(name, arguments_text(args))
