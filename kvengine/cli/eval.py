"""`kvengine eval kv`: every KV dtype against full precision on one model: one table, then one JSON line.

Progress goes to stderr, so stdout is the table and the JSON line (`--json`: the JSON line alone).
"""

from __future__ import annotations

import json
import sys

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from kvengine.cli.app import eval_app
from kvengine.cli.options import EngineOptions, engine_options
from kvengine.cli.values import at_least_one
from kvengine.errors import ConfigError
from kvengine.eval.kv import CHAT_PROMPTS, DEFAULT_DTYPES, KVEvalReport

PROBE_KV_MEMORY = 16 << 20  # the loaded LLM's own pool is unused: every measurement builds its own


@eval_app.command("kv")
@engine_options("model", "dtype", "device", "num_threads", "weights")
def kv(
    text: str | None = typer.Option(None, "--text", help="Held text file for perplexity (default: CPython's "
                                    "pydoc topics)."),
    tokens: int = typer.Option(2048, "--tokens", "-n", help="Tokens of the text to score."),
    generate: int = typer.Option(64, "--generate", "-g", help="Greedy tokens per prompt for token agreement "
                                 "(0 = skip)."),
    dtypes: str = typer.Option(",".join(DEFAULT_DTYPES), "--dtypes", help="Comma-separated KV dtypes to compare "
                               "with the model's dtype: float32, bfloat16, float16, fp8, int8, int4."),
    budget: str = typer.Option("1GiB", "--budget", help="KV pool bytes for the capacity column (e.g. 1GiB, 2e9)."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Sequence length for the capacity column."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="Chat prompt for token agreement "
                                            "(repeatable; default: four built-in prompts)."),
    chunk: int = typer.Option(256, "--chunk", help="Prefill chunk for perplexity (1 = token by token)."),
    block_size: int = typer.Option(16, "--block-size", help="KV block size (int4 key scales are per block)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON line."),
    *, engine: EngineOptions,
) -> None:
    """Perplexity, logit drift, greedy agreement, bytes per token and capacity for every KV dtype."""
    from kvengine.accounting.memory import parse_bytes
    from kvengine.eval.kv import evaluate_kv_dtypes, held_text, text_tokens

    for value, name in ((tokens, "--tokens"), (seq_len, "--seq-len"), (chunk, "--chunk")):
        at_least_one(value, name)
    if generate < 0:
        raise ConfigError(f"--generate must be 0 or more, got {generate}")
    names = _kv_dtypes(dtypes)
    nbytes = parse_bytes(budget)
    err = Console(stderr=True)
    text_name, body = held_text(text)
    llm = engine.open_llm(kv_cache_memory=PROBE_KV_MEMORY, max_num_seqs=1, quiet=as_json)
    ids = text_tokens(llm.tokenizer, body, tokens)
    prompts = llm.encode_chats([[{"role": "user", "content": p}] for p in (prompt or CHAT_PROMPTS)])
    report = evaluate_kv_dtypes(
        llm.engine.model, llm.tokenizer, ids, prompts, names, generate=generate, chunk_size=chunk,
        block_size=block_size, budget=nbytes, seq_len=seq_len, device=engine.device,
        text_name=text_name, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    report.model = llm.model_name
    if not as_json:  # piped output is not wrapped at 80 columns
        Console(width=None if sys.stdout.isatty() else 160).print(kv_table(report))
    print(json.dumps({"eval": "kv", **report.to_dict()}))


def _kv_dtypes(text: str) -> list[str]:
    """--dtypes 'fp8,int4' -> the KV dtypes' canonical names; at least one."""
    from kvengine.cache.spec import kv_dtype

    names = [kv_dtype(d.strip()).name for d in text.split(",") if d.strip()]
    if not names:
        raise ConfigError(f"--dtypes needs at least one KV dtype, got '{text}'")
    return names


def kv_table(report: KVEvalReport) -> Table:
    """One row per KV dtype; the reference row first."""
    gib = report.budget_bytes / 2**30
    table = Table(title=f"KV dtypes vs {report.reference} KV: {report.model}, {report.tokens} tokens of {report.text}",
                  caption=f"B/token: KV bytes per token, scales included (block {report.block_size}); Δlogit: vs "
                  f"{report.reference} over every position and vocabulary entry; greedy: prompts whose greedy tokens "
                  f"all match (shortest match); seqs: {report.seq_len}-token sequences the engine admits in "
                  f"{gib:.3g} GiB", box=box.SIMPLE_HEAD)
    for col in ("KV dtype", "B/token", f"× {report.reference}", "× bf16", "ppl", "Δppl", "mean |Δlogit|",
                "max |Δlogit|", f"greedy ×{report.results[0].greedy_tokens}", "seqs"):
        table.add_column(col, justify="left" if col == "KV dtype" else "right")
    for r in report.results:
        greedy = "-"
        if r.greedy_tokens:
            full = sum(n == r.greedy_tokens for n in r.greedy_identical)
            greedy = f"{full}/{len(r.greedy_identical)}" + ("" if full == len(r.greedy_identical)
                                                            else f" ({min(r.greedy_identical)})")
        table.add_row(r.kv_dtype, f"{r.bytes_per_token:,.0f}", f"{r.ratio_to_reference:.3f}", f"{r.ratio_to_bf16:.3f}",
                      f"{r.ppl:.4f}", f"{r.ppl_change_pct:+.3f}%", f"{r.mean_abs_logit_diff:.4f}",
                      f"{r.max_abs_logit_diff:.3f}", greedy, f"{r.max_concurrent_seqs}")
    return table
