"""Structured output: a grammar decides which tokens a sequence may sample next, so its text always parses.

`StructuredOutput` is what a request asks for (any JSON object, or JSON valid under a schema); a
`GrammarCompiler` (one per tokenizer: building llguidance's token trie is the slow part) turns it into a
`Constraint`, the per-sequence state: `allowed()` gives the [vocab] mask of tokens the grammar accepts next
(end-of-sequence only once the text is complete), `accept(token)` advances it, and `done` says the grammar
can take nothing more. JSON is compact (no free whitespace), so a model cannot pad it forever.

llguidance (Microsoft's Rust grammar engine, one of vLLM's structured-output backends) is used because it
installs as one wheel with no build step and needs no precompiled per-tokenizer state (its cost per token is in
docs/server.md). It is optional: without it, requests for structured output are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kvengine.errors import RequestError


@dataclass(slots=True, frozen=True)
class StructuredOutput:
    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    param: str = field(default="response_format", compare=False)  # the request field a bad schema is blamed on

    def grammar_schema(self) -> dict[str, Any]:
        return {"type": "object"} if self.kind == "json_object" else (self.schema or {})


def check_json_schema(schema: dict[str, Any], what: str, param: str) -> Any:
    """llguidance's grammar of `schema` (no tokenizer needed); a schema it cannot compile is a RequestError
    naming `param`. Without llguidance nothing is checked (None)."""
    if not available():
        return None
    from llguidance import LLMatcher
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"whitespace_flexible": False})
    except ValueError as e:
        raise RequestError(f"{what}: the JSON schema is invalid: {e}", param=param) from None
    error = LLMatcher.validate_grammar(grammar, None)
    if error and not error.startswith("WARNING"):
        raise RequestError(f"{what}: the JSON schema is invalid: {error}", param=param)
    return grammar


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar accepts next."""
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8) > 0  # [tok vocab]
        n = min(self.vocab_size, mask.shape[0])
        allowed[:n] = mask[:n]
        return allowed

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped()


class GrammarCompiler:
    def __init__(self, tokenizer_json: str, eos_token_ids: list[int], vocab_size: int) -> None:
        from llguidance import LLTokenizer
        self._tokenizer = LLTokenizer(tokenizer_json, eos_token=eos_token_ids)
        self.vocab_size = vocab_size

    def constraint(self, spec: StructuredOutput) -> Constraint:
        """A fresh constraint; a schema llguidance cannot compile is a RequestError naming spec.param."""
        from llguidance import LLMatcher
        grammar = check_json_schema(spec.grammar_schema(), spec.param, spec.param)
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise RequestError(f"{spec.param}: the JSON schema cannot be used: {error}", param=spec.param)
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"{spec.param}: {matcher.get_error()}", param=spec.param)
        return Constraint(matcher, self.vocab_size)
