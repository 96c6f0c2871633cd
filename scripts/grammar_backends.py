#!/usr/bin/env python
"""Which grammar library should constrain kvengine's structured output? llguidance (the one kvengine uses),
xgrammar and outlines-core, on the default model's tokenizer, one JSON schema, one valid document: the time to
prepare the tokenizer, to compile the schema, and per token to compute the mask of allowed tokens and advance.
The per-token figure is what a constrained sequence adds to every decode step.

    .venv/bin/pip install xgrammar outlines-core      # not kvengine dependencies
    .venv/bin/python scripts/grammar_backends.py      # a table, then one JSON line

A library that is not installed or fails is one line in the table, not a crash.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from kvengine.weights.catalog import resolve_model
from kvengine.weights.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "city": {"type": "string", "enum": ["Paris", "Lyon", "Marseille"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
DOCUMENT = {"name": "Marie Curie", "age": 66, "city": "Paris", "tags": ["physics", "chemistry", "radioactivity"]}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def walk(ids: list[int], mask: Callable[[], Any], accept: Callable[[int], Any]) -> list[float]:
    """Seconds per token: compute the mask, then advance by the document's next token (a refused token is an
    error: the figures are only meaningful along a path the grammar accepts)."""
    times = []
    for tok in ids:
        t0 = time.perf_counter()
        mask()
        ok = accept(tok)
        times.append(time.perf_counter() - t0)
        if ok is False:
            raise RuntimeError(f"the grammar refused token {tok}")
    return times


def llguidance_run(tok: Tokenizer, ids: list[int], eos: list[int]) -> dict[str, Any]:
    from llguidance import LLMatcher, LLTokenizer

    lt, prep = timed(lambda: LLTokenizer(tok.to_json(), eos_token=eos))
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    m, compile_s = timed(lambda: LLMatcher(lt, grammar, log_level=0))
    return {"prepare_s": prep, "compile_s": compile_s,
            "per_token": walk(ids, m.compute_logit_bias, m.consume_token)}


def xgrammar_run(tok: Tokenizer, ids: list[int], eos: list[int]) -> dict[str, Any]:
    import xgrammar as xgr
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tok.to_json()))
    info, prep = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=eos))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    compiled, compile_s = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                         separators=(",", ":")))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    return {"prepare_s": prep, "compile_s": compile_s,
            "per_token": walk(ids, lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token)}


def outlines_run(tok: Tokenizer, ids: list[int], eos: list[int]) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tok.to_json()))
    pieces: dict[str, list[int]] = {}
    for piece, i in hf.get_vocab().items():
        if i not in eos:
            pieces.setdefault(piece, []).append(i)
    vocab, prep = timed(lambda: Vocabulary(eos[0], pieces))
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index, compile_s = timed(lambda: Index(regex, vocab))
    guide = Guide(index)
    return {"prepare_s": prep, "compile_s": compile_s,
            "per_token": walk(ids, guide.get_tokens, guide.advance)}


def main() -> None:
    path = resolve_model(None)
    tok = Tokenizer.from_gguf(path)
    eos = list(tok.eos_token_ids)
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    results: dict[str, Any] = {}
    for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run), ("outlines-core", outlines_run)):
        try:
            r = run(tok, ids, eos)
            per = sorted(r.pop("per_token"))
            results[name] = {**r, "per_token_median_ms": 1e3 * statistics.median(per),
                             "per_token_p90_ms": 1e3 * per[int(0.9 * (len(per) - 1))], "tokens": len(per)}
        except Exception as e:  # a library missing or failing is a row, not a crash
            results[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}
    print(f"{path.name}, {len(ids)}-token document, schema with 4 required fields")
    print(f"{'library':14} {'prepare s':>10} {'compile s':>10} {'mask+advance median ms':>23} {'p90 ms':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:14} {r['error']}")
        else:
            print(f"{name:14} {r['prepare_s']:10.3f} {r['compile_s']:10.3f} {r['per_token_median_ms']:23.3f} "
                  f"{r['per_token_p90_ms']:8.3f}")
    print(json.dumps({"bench": "grammar_backends", "model": path.name, "results": results}))


if __name__ == "__main__":
    main()
