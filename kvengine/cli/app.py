"""The `kvengine` Typer application and its command groups; command modules register themselves on them."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kvengine",
    help="kvengine: LLM inference built around the KV cache. Generate, chat, serve, benchmark, and see what "
    "the cache saves (FLOPs, bytes, seconds).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: tables, plots, a Markdown report and one JSON line.", no_args_is_help=True)
eval_app = typer.Typer(help="Quality readouts (perplexity, logit drift, token agreement).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
