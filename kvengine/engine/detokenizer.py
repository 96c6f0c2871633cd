"""Streaming text out of generated token ids, one token at a time.

Each `add` decodes only a short window of recent ids, never the whole sequence. The window starts at
an earlier point where the text was complete, so tokens whose text depends on what precedes them
(SentencePiece's '▁' and decoders that strip the first space) come out as they would inside the
full decode. A token that ends inside a multi-byte character (byte-level BPE or '<0xNN>' byte
fallback) has that character held back until the bytes that complete it arrive: no U+FFFD from a split
character ever leaves here. `flush()` releases whatever is held, as `decode` would show it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvengine.weights.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens kept as leading context for the first generated tokens.
PROMPT_CONTEXT = 5
# A character held back this many tokens is not a split character but bytes that never form one:
# release it so a model emitting raw garbage cannot make every step decode an ever-longer window.
MAX_HELD_TOKENS = 64


class IncrementalDetokenizer:
    """Turns a stream of token ids into the text each one makes final.

    Invariant (for decoders whose output for a sequence starts with their output for any of its prefixes,
    which holds for byte-level BPE and SentencePiece): the concatenation of every `add` and the final
    `flush` equals `tokenizer.decode(generated ids)`, or, with `prompt_ids`, the text those ids add after
    the prompt (so '▁Hello' after a prompt is ' Hello' even where decoding it alone would strip the space).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                 ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        while self._ids and self._decode(0).startswith(REPLACEMENT):
            del self._ids[0]  # context must start on a character boundary, not inside one
        self._start = 0  # window start: a clean point before the last clean point (its context)
        self._clean = len(self._ids)  # the last point where all text before it was complete
        self._emitted = len(self._decode(0))  # characters of the window's text already given out
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became final with it (may be '')."""
        self._ids.append(int(token_id))
        window = self._decode(self._start)
        new = window[self._emitted:]
        held = len(new) - len(new.rstrip(REPLACEMENT))
        if held and len(self._ids) - self._clean < MAX_HELD_TOKENS:
            new = new[:-held]  # an unfinished character: keep its bytes for the next tokens
            self._emitted += len(new)
        else:
            self._mark_clean(window)
        if new:
            self._pieces.append(new)
        return new

    def flush(self) -> str:
        """The held-back rest, as `decode` shows it (a never-completed character becomes U+FFFD)."""
        window = self._decode(self._start)
        new = window[self._emitted:]
        self._mark_clean(window)
        if new:
            self._pieces.append(new)
        return new

    def _mark_clean(self, window: str) -> None:
        """All of `window` (the text from the window start) is out: the window now starts at the previous
        clean point, which keeps at least one earlier token as context."""
        if self._start != self._clean:
            self._start = self._clean
            window = self._decode(self._start)
        self._clean = len(self._ids)
        self._emitted = len(window)
        if self._start > 4 * MAX_HELD_TOKENS:  # drop ids that no window can reach again
            del self._ids[:self._start]
            self._clean -= self._start
            self._start = 0

    def _decode(self, start: int) -> str:
        return self._tokenizer.decode(self._ids[start:], skip_special_tokens=self._skip)
