"""`kvengine bench cache | throughput | prefix | peers`: run a benchmark, write its results folder
(report.md, result.json, PNG plots), print the tables, end stdout with one JSON line.

Progress bars go to stderr so stdout stays tables + the final JSON line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from kvengine.accounting.flops import require_positive
from kvengine.bench.progress import progress_bars
from kvengine.bench.report import open_report
from kvengine.cli.app import bench_app
from kvengine.cli.options import FLAGS, EngineOptions, engine_options
from kvengine.cli.values import count_or_zero, parse_dtype_list, parse_int_list, parse_weights_list
from kvengine.errors import ConfigError

BENCH_OPTIONS = ("model", "dtype", "device", "num_threads")  # what every model benchmark takes
OutOpt = typer.Option(None, "--out", help="Results folder (default: results/<bench>-<timestamp>/).")
PromptOpt = typer.Option("Please tell me about Paris.", "--prompt", help="The prompt, sent as one user message.")
RawOpt = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template.")


def run_settings(llm: Any, engine: EngineOptions) -> dict[str, Any]:
    """The compute dtype, device and threads a benchmark ran with, as its report's settings list them."""
    return {"dtype": llm.config.resolved_dtype(), "device": engine.device, "threads": engine.num_threads}


@bench_app.command("cache")
@engine_options(*BENCH_OPTIONS)
def cache(
    max_tokens: int = typer.Option(1000, "--max-tokens", "-n", help="New tokens per run (greedy, EOS ignored)."),
    no_cache_max_tokens: int | None = typer.Option(
        None, "--no-cache-max-tokens", help="Cap the no-cache run (it is quadratic); the report states the cap."),
    prompt: str = PromptOpt,
    raw: bool = RawOpt,
    warmup: int = typer.Option(4, "--warmup", help="Untimed warm-up tokens per run before timing (0 = none)."),
    sample_interval: float = typer.Option(0.1, "--sample-interval", help="Seconds between CPU/memory samples."),
    runs: int = typer.Option(1, "--runs", help="Timed runs per mode; the summary averages them (seed 004: 5)."),
    seed: str | None = typer.Option(None, "--seed", help="Set a seed's own figures beside ours: 000, 002 or 004."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Generate N tokens with and without the KV cache: time per token, speedup, FLOPs, CPU and memory."""
    from kvengine.bench.cache import cache_report, encode_prompt, run_cache_bench

    require_positive(max_tokens, "--max-tokens")
    require_positive(runs, "--runs")
    from kvengine.bench.seeds import seed_experiment, seed_report

    experiment = seed_experiment(seed) if seed is not None else None
    # No prefix caching: the warm-up must not leave the prompt cached for the timed run.
    llm = engine.open_llm(max_num_seqs=1, enable_prefix_caching=False)
    ids = encode_prompt(llm, prompt, raw)
    params = {"model": llm.model_name, "prompt": prompt, "chat_template": not raw, "prompt_tokens": len(ids),
              "max_tokens": max_tokens, "no_cache_max_tokens": no_cache_max_tokens,
              **run_settings(llm, engine), "warmup_tokens": warmup, "sample_interval_s": sample_interval,
              "runs": runs, "seed": seed, "weights": llm.engine.weights_desc}
    report = open_report("cache", f"bench cache: {llm.model_name}, {max_tokens} tokens with and without the KV "
                         "cache", out, params)
    with progress_bars() as bar:
        result = run_cache_bench(llm, ids, max_tokens, no_cache_max_tokens, warmup, bar, sample_interval, runs)
    cache_report(result, report, llm.model_name)
    if experiment is not None:
        seed_report(experiment, result, report, llm)
    report.finish()


@bench_app.command("seed")
def seed_run(
    experiment: str = typer.Argument(..., help="The seed whose experiment to run: 000, 002 or 004."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="New tokens (default: the seed's)."),
    no_cache_max_tokens: int | None = typer.Option(
        None, "--no-cache-max-tokens", help="Cap the no-cache run; the report extrapolates to the seed's count."),
    runs: int | None = typer.Option(None, "--runs", help="Timed runs per mode (default: the seed's)."),
    threads: int | None = FLAGS["num_threads"].option(),
    warmup: int = typer.Option(4, "--warmup", help="Untimed warm-up tokens per run before timing (0 = none)."),
    out: Path | None = OutOpt,
) -> None:
    """A seed's KV-cache experiment as the seed ran it (its model as a random-weight preset, its prompt, its token
    count and runs), with the seed's published table beside kvengine's. Lower -n / --runs to fit the machine."""
    from kvengine.bench.seeds import seed_experiment

    exp = seed_experiment(experiment)
    n = max_tokens or min(exp.new_tokens, exp.max_run_tokens or exp.new_tokens)
    cache(max_tokens=n, no_cache_max_tokens=no_cache_max_tokens, model=exp.model,
          prompt=exp.prompt, raw=True, dtype="auto", device="cpu", num_threads=threads, warmup=warmup,
          sample_interval=0.1, runs=runs or exp.runs, seed=exp.seed, out=out)


@bench_app.command("throughput")
@engine_options(*BENCH_OPTIONS)
def throughput(
    concurrency: str = typer.Option("1,4,16,32,64", "--concurrency", "-c",
                                    help="Comma-separated numbers of requests sent at once."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="New tokens per request (greedy, EOS ignored)."),
    prefix_tokens: int = typer.Option(256, "--prefix-tokens",
                                      help="Tokens of the system message every request shares (0 = none)."),
    sharing: str = typer.Option("both", "--sharing", help="Prefix caching: both, on or off."),
    warmup: int = typer.Option(4, "--warmup", help="Untimed warm-up tokens (two requests) before timing."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Aggregate tok/s, p50/p99 TTFT and inter-token latency at each concurrency, prefix sharing on and off."""
    from kvengine.bench.throughput import MODES, run_throughput_bench, throughput_report

    levels = parse_int_list(concurrency, "--concurrency")
    require_positive(max_tokens, "--max-tokens")
    if sharing not in ("both", "on", "off"):
        raise ConfigError(f"--sharing must be both, on or off, got '{sharing}'")
    modes = {k: v for k, v in MODES.items() if sharing == "both" or v == (sharing == "on")}
    llm = engine.open_llm(max_num_seqs=1)
    params = {"model": llm.model_name, "concurrency": levels, "max_tokens": max_tokens,
              "prefix_tokens": prefix_tokens, "sharing": sharing, **run_settings(llm, engine), "warmup_tokens": warmup}
    report = open_report("throughput", f"bench throughput: {llm.model_name}, concurrent requests", out, params)
    with progress_bars() as bar:
        result = run_throughput_bench(llm, levels, max_tokens, prefix_tokens, modes, bar, warmup)
    throughput_report(result, report, llm.model_name).finish()


@bench_app.command("peers")
@engine_options("model", "device", "num_threads")
def peers(
    lengths: str = typer.Option("20,200,1000", "--lengths", "-n", help="Comma-separated new-token counts."),
    weights: str = typer.Option("auto", "--weights", help="Comma-separated kvengine variants, one row each: auto "
                                "(the float weights of each --dtypes), fp32, bf16, fp16, int8, int4. int8/int4 "
                                "compute in the dtype the engine picks for this CPU's kernel tier (float32; "
                                "bfloat16 on the avx512 tier, KVENGINE_ISA=avx512) unless --dtypes is given (then "
                                "once per dtype)."),
    dtypes: str | None = typer.Option(None, "--dtypes", help="Comma-separated compute dtypes for transformers and "
                                      "kvengine's auto/int8/int4 variants, e.g. float32,bfloat16 (default float32; "
                                      "llama.cpp keeps the GGUF's weights)."),
    compile_decode: bool = typer.Option(False, "--compile", help="torch.compile kvengine's decode steps, batch-1 "
                                        "and concurrent, where they do not run kvengine's one-op-per-layer path "
                                        "(compile seconds reported; cached on disk for later runs)."),
    concurrency: int = typer.Option(32, "--concurrency", help="Concurrent greedy requests for the aggregate tok/s "
                                    "goal, against llama.cpp's batch-1 decode (0 = skip)."),
    concurrent_tokens: int = typer.Option(64, "--concurrent-tokens", help="New tokens per concurrent request."),
    prefill_tokens: int = typer.Option(1024, "--prefill-tokens", help="Prompt length for the prefill-speed goal "
                                       "(0 = skip)."),
    no_cache_max_tokens: int | None = typer.Option(
        200, "--no-cache-max-tokens", help="Longest no-cache run (quadratic); 0 = no cap."),
    only: str = typer.Option("transformers,llama.cpp", "--peers", help="Which peers to run beside kvengine."),
    llama_python: Path | None = typer.Option(None, "--llama-cpp-python", help="The Python that runs llama.cpp's "
                                             "process (default: this one), e.g. a venv whose llama-cpp-python was "
                                             "built for AVX2 alone."),
    repeats: int = typer.Option(1, "--repeats", help="Runs per measurement; the median (by total time) is kept."),
    prompt: str = PromptOpt,
    raw: bool = RawOpt,
    warmup: int = typer.Option(4, "--warmup", help="Untimed warm-up tokens per system and setting."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """kvengine variants against transformers (cache on/off) and llama.cpp on the same prompt ids: batch-1 decode,
    concurrent requests and prefill, with the performance goals as ratios."""
    from kvengine.bench.peers import PeersPlan, run_peers_bench
    from kvengine.bench.peers_report import peers_report
    from kvengine.weights.source import open_model_source

    ns, variants, dts, chosen = _peers_choices(lengths, weights, dtypes, compile_decode, only, engine.device)
    require_positive(repeats, "--repeats")
    require_positive(concurrent_tokens, "--concurrent-tokens")
    plan = PeersPlan(ns, variants, dts, chosen, no_cache_max_tokens or None, repeats, warmup,
                     count_or_zero(concurrency, "--concurrency"), concurrent_tokens,
                     count_or_zero(prefill_tokens, "--prefill-tokens"), prompt, raw, engine.num_threads, engine.device,
                     _llama_python(llama_python))
    name = open_model_source(engine.model).name
    params = _peers_params(plan, name, weights, compile_decode)
    report = open_report("peers", f"bench peers: {name} against {', '.join(plan.peers) or 'no peers'}", out, params)
    with progress_bars() as bar:
        result = run_peers_bench(engine.model, plan, bar)
    peers_report(result, report, name).finish()


def _llama_python(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ConfigError(f"--llama-cpp-python: no Python interpreter at '{path}'")
    return str(path)


def _peers_params(plan: Any, name: str, weights: str, compile_decode: bool) -> dict[str, Any]:
    """The settings of a `bench peers` run, as its report lists them."""
    return {"model": name, "prompt": plan.prompt, "chat_template": not plan.raw, "lengths": plan.lengths,
            "dtypes": plan.dtypes, "weights": weights, "variants": [v.label for v in plan.variants],
            "compile": compile_decode, "concurrency": plan.concurrency, "concurrent_tokens": plan.concurrent_tokens,
            "prefill_tokens": plan.prefill_tokens, "no_cache_max_tokens": plan.no_cache_max_tokens,
            "peers": list(plan.peers), "repeats": plan.repeats, "device": plan.device, "threads": plan.threads,
            "warmup_tokens": plan.warmup_tokens, "llama_cpp_python": plan.llama_python}


def _peers_choices(lengths: str, weights: str, dtypes: str | None, compile_decode: bool,
                   only: str, device: str) -> tuple[list[int], list[Any], list[str], tuple[str, ...]]:
    """`bench peers`' lengths, kvengine variants, transformers' dtypes and the peers to run."""
    from kvengine.bench.peers import LLAMA_CPP, TRANSFORMERS, kvengine_variants

    ns, dts = parse_int_list(lengths, "--lengths"), parse_dtype_list(dtypes) if dtypes is not None else None
    variants = kvengine_variants(parse_weights_list(weights), dts, compile_decode, device)
    chosen = tuple(p.strip() for p in only.split(",") if p.strip())
    unknown = set(chosen) - {TRANSFORMERS, LLAMA_CPP}
    if unknown:
        raise ConfigError(f"unknown peer '{sorted(unknown)[0]}' (choose from {TRANSFORMERS}, {LLAMA_CPP})")
    return ns, variants, dts or ["float32"], chosen


@bench_app.command("prefix")
@engine_options(*BENCH_OPTIONS)
def prefix(
    requests: int = typer.Option(32, "--requests", "-r", help="Chat requests sent at once."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="New tokens per request (greedy, EOS ignored)."),
    sequential: int | None = typer.Option(None, "--sequential", help="How many of the requests to also run one "
                                          "at a time (default: all)."),
    cached_prefix_tokens: int = typer.Option(1024, "--cached-prefix-tokens",
                                             help="Shared system-message tokens for the warm/cold TTFT test."),
    repeats: int = typer.Option(3, "--repeats", help="Cold/warm TTFT pairs; the medians are reported."),
    no_transformers: bool = typer.Option(False, "--no-transformers", help="Skip transformers' batched generate."),
    block_size: int = typer.Option(16, "--block-size", help="KV block size in tokens (memory waste is about half "
                                   "a block per request)."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Batched vs one-at-a-time vs transformers' batched generate; warm vs cold prefix TTFT; KV memory waste."""
    from kvengine.bench.prefix import prefix_report, run_prefix_bench

    require_positive(requests, "--requests")
    require_positive(max_tokens, "--max-tokens")
    require_positive(cached_prefix_tokens, "--cached-prefix-tokens")
    require_positive(repeats, "--repeats")
    n_seq = requests if sequential is None else min(require_positive(sequential, "--sequential"), requests)
    llm = engine.open_llm(max_num_seqs=1, block_size=require_positive(block_size, "--block-size"))
    params = {"model": llm.model_name, "requests": requests, "max_tokens": max_tokens, "sequential": n_seq,
              "block_size": block_size,
              "cached_prefix_tokens": cached_prefix_tokens, "repeats": repeats, "transformers": not no_transformers,
              **run_settings(llm, engine)}
    report = open_report("prefix", f"bench prefix: {llm.model_name}, batching and prefix sharing", out, params)
    with progress_bars() as bar:
        result = run_prefix_bench(llm, requests, max_tokens, cached_prefix_tokens, n_seq, repeats,
                                  not no_transformers, bar)
    prefix_report(result, report, llm.model_name).finish()


@bench_app.command("sessions")
@engine_options("model", "dtype", "num_threads", "kv_cache_memory")
def bench_sessions(
    users: int = typer.Option(2, "--users", "-k", help="Conversations (K)."),
    turns: int = typer.Option(4, "--turns", "-t", help="Turns per conversation (T)."),
    restart_after: int | None = typer.Option(None, "--restart-after", help="Turns before the server is killed "
                                             "with SIGKILL and started again (default: T / 2)."),
    history_items: int = typer.Option(200, "--history-items", help="Records in each user's first message "
                                      "(200: about 2,500 tokens with the default model)."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", help="Tokens per answer (greedy, EOS ignored)."),
    out: Path | None = OutOpt,
    *, engine: EngineOptions,
) -> None:
    """Multi-turn chat across a server restart: TTFT per turn with no prefix cache, memory only, memory + disk
    (--kv-disk-dir) and memory + an emptied disk directory; decode speed of each."""
    from kvengine.bench.sessions import SessionsConfig, run_sessions, sessions_report

    for value, name in ((users, "--users"), (turns, "--turns"), (history_items, "--history-items"),
                        (max_tokens, "--max-tokens")):
        require_positive(value, name)
    if turns < 2:
        raise ConfigError("--turns must be at least 2 (one before the restart, one after)")
    restart = turns // 2 if restart_after is None else restart_after
    if not 0 < restart < turns:
        raise ConfigError(f"--restart-after must be between 1 and {turns - 1} (a turn before and after it)")
    config = SessionsConfig(model=engine.model, users=users, turns=turns, restart_after=restart,
                            history_items=history_items, max_tokens=max_tokens, engine=engine.config())
    report = open_report("sessions", "kvengine bench sessions: multi-turn chat across a kill -9", out,
                         {"model": engine.model or "default", "users": users, "turns": turns,
                          "restart_after": restart, "history_items": history_items, "max_tokens": max_tokens,
                          "dtype": engine.dtype})
    sessions_report(report, config, run_sessions(config)).finish()
