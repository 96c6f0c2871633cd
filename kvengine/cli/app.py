"""The `kvengine` Typer application object; command modules register themselves on it."""

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
