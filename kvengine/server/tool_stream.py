"""ToolStream: one streamed chat choice whose text may hold tool calls.

Text goes out as content deltas until a call may be starting (the parser's marker, or the start of it held
back), then nothing more: the calls go out whole in one delta at the end (OpenAI's shape: index, id, type,
function name and arguments), followed by finish_reason "tool_calls". A forced call ("required" or named) sends
no content at all. If the text held no complete call, what was held back goes out as content at the end.
"""

from __future__ import annotations

from typing import Any

from kvengine.tools.plan import ToolMode, ToolPlan


class ToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        forced = plan.mode in (ToolMode.REQUIRED, ToolMode.NAMED)
        self.marker = None if forced or plan.parser is None else plan.parser.marker

    def feed(self, delta: str) -> str:
        """The content that can go out now."""
        self.text += delta
        if self.marker is None:
            return ""
        found = self.text.find(self.marker)
        end = found if found >= 0 else len(self.text) - _partial_marker(self.text, self.marker)
        out = self.text[self.sent:max(self.sent, end)]
        self.sent = max(self.sent, end)
        return out

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict[str, Any]] | None, str | None]:
        """(content still to send, the calls' delta entries or None, the finish reason)."""
        reply = self.plan.reply(self.text)
        if reply.calls:
            return "", [c.to_openai(i) for i, c in enumerate(reply.calls)], "tool_calls"
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest, None, finish_reason


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
