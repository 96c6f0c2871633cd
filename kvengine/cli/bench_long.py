"""`kvengine bench long`: a long text scored with a full cache, a plain window and sinks + window:
perplexity per segment, KV memory and time per token over position; tables and a final JSON line on stdout,
progress bars on stderr, report.md / result.json / PNG plots in the results folder.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kvengine.bench.long import DEFAULT_CHUNK, DEFAULT_SEGMENT, MODES, LongPlan, parse_modes
from kvengine.bench.progress import progress_bars
from kvengine.bench.report import open_report
from kvengine.cli.app import bench_app
from kvengine.cli.bench import BENCH_OPTIONS, OutOpt, run_settings
from kvengine.cli.options import EngineOptions, engine_options

PROBE_KV_MEMORY = 16 << 20  # the loaded LLM's own pool is unused: every mode builds its own


@bench_app.command("long")
@engine_options(*BENCH_OPTIONS)
def long(
    tokens: int | None = typer.Option(None, "--tokens", "-n", help="Tokens of the text to score (default: 1.5x the "
                                      "model's context, e.g. 12288 for SmolLM2)."),
    text: str | None = typer.Option(None, "--text", help="Text file to score (default: CPython's pydoc topics)."),
    kv_window: int = typer.Option(1024, "--kv-window", help="Recent tokens every layer keeps in the window modes."),
    sink_tokens: int = typer.Option(4, "--sink-tokens", help="First tokens kept beside the window (sinks mode)."),
    modes: str = typer.Option(",".join(MODES), "--modes", help="Comma-separated modes: full (every token, stops at "
                              "the model's context), window (--kv-window, no sinks), sinks (--sink-tokens + "
                              "--kv-window)."),
    chunk: int = typer.Option(DEFAULT_CHUNK, "--chunk", help="Tokens per forward pass."),
    segment: int = typer.Option(DEFAULT_SEGMENT, "--segment", help="Positions per perplexity segment."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="KV cache dtype (auto: the model's dtype; fp8, int8, "
                                 "int8-token, int4, bfloat16, ...)."),
    block_size: int = typer.Option(16, "--block-size", help="KV block size in tokens."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Score a long text with a full cache, a plain window and sinks + window: perplexity per segment, KV memory
    and time per token over position."""
    from kvengine.bench.long import long_report, run_long_bench
    from kvengine.cache.spec import kv_dtype as resolve_kv_dtype
    from kvengine.eval.kv import held_text, text_tokens

    plan = LongPlan(tokens, chunk, kv_window, sink_tokens, segment, parse_modes(modes), block_size,
                    kv_dtype if kv_dtype == "auto" else resolve_kv_dtype(kv_dtype).name)
    text_name, body = held_text(text)
    llm = engine.open_llm(max_num_seqs=1, kv_cache_memory=PROBE_KV_MEMORY)
    net = llm.engine.model
    n = plan.tokens_for(net.config.max_position_embeddings)
    ids = text_tokens(llm.tokenizer, body, n)
    params = {"model": llm.model_name, "text": text_name, "tokens": n, "modes": list(plan.modes),
              "kv_window": kv_window, "sink_tokens": sink_tokens, "chunk": chunk, "segment": segment,
              "kv_dtype": kv_dtype, "block_size": block_size, **run_settings(llm, engine)}
    report = open_report("long", f"bench long: {llm.model_name}, {n:,} tokens with full, windowed and sink caches",
                     out, params)
    with progress_bars() as bar:
        result = run_long_bench(net, ids, plan, engine.device, bar)
    long_report(result, report, llm.model_name, text_name).finish()
