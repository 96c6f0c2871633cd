"""A tool call as OpenAI returns it, and the reply a choice makes of its text (content and/or calls)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def arguments_text(arguments: dict[str, Any]) -> str:
    """A call's arguments as OpenAI's JSON text (one spelling whichever way the call was made)."""
    return json.dumps(arguments, ensure_ascii=False)


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)
    id: str = field(default_factory=new_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """`{id, type, function: {name, arguments}}`; with `index` for a streamed delta."""
        body: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


@dataclass(slots=True)
class ToolReply:
    """What a choice says: text (None when it only calls) and its calls, in order."""

    content: str | None
    calls: list[ToolCall] = field(default_factory=list)
