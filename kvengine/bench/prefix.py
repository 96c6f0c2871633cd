"""`bench prefix`: what the paged, prefix-sharing cache buys when many chats share one engine.

Three measurements in one run, on one model:
- batched throughput: `requests` chat requests at once (`max_tokens` new each) through one engine, against
  the same requests one at a time, and against transformers' batched `generate` on left-padded prompts;
- a warm prefix: time to first token of a request whose first `cached_prefix_tokens` tokens an earlier
  request already computed, against the same request cold (a cache salt of its own keeps it cold);
- memory waste at steady state, sampled from `engine.stats()` after every step of the batched run:
  (bytes of allocated blocks - bytes of the tokens those blocks hold) / bytes of allocated blocks.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from kvengine.bench import plots
from kvengine.bench.peers import load_transformers
from kvengine.bench.report import Report, Table, ms, num
from kvengine.bench.throughput import (
    ConcurrentRun,
    chat_prompts,
    fresh_engine,
    questions,
    reference_text,
    run_concurrent,
)
from kvengine.engine.engine import LLMEngine
from kvengine.engine.stats import EngineStats
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

VLLM_WASTE = 0.04  # vLLM's paper: under 4% of KV memory wasted with paging


def held_tokens(stats: EngineStats) -> int:
    """Tokens whose KV the used blocks hold, each counted once: a block shared by k requests (prefix sharing)
    appears in k tables, so k - 1 of its copies are taken back out. Shared blocks are full blocks."""
    copies = sum(r.shared_blocks for r in stats.requests) - stats.blocks_shared
    return sum(r.computed_tokens for r in stats.requests) - copies * stats.block_size


@dataclass(slots=True)
class WasteSample:
    step: int
    blocks_used: int
    allocated_bytes: float
    held_bytes: float
    steady: bool  # every request admitted and decoding

    @property
    def waste(self) -> float:
        return (self.allocated_bytes - self.held_bytes) / self.allocated_bytes if self.allocated_bytes else 0.0


class WasteSampler:
    """An `on_step` hook for run_concurrent: one WasteSample per engine step."""

    def __init__(self, num_requests: int) -> None:
        self.num_requests = num_requests
        self.samples: list[WasteSample] = []

    def __call__(self, engine: LLMEngine) -> None:
        st = engine.stats()
        steady = (len(st.requests) == self.num_requests and st.waiting == 0
                  and all(r.tokens - r.computed_tokens == 1 for r in st.requests))
        if st.blocks_used == 0:
            return  # nothing allocated (every request finished): no waste to speak of
        self.samples.append(WasteSample(st.steps, st.blocks_used, st.blocks_used * st.bytes_per_block,
                                        held_tokens(st) * st.bytes_per_token, steady))

    def steady_waste(self) -> list[float]:
        return [s.waste for s in self.samples if s.steady]


@dataclass(slots=True)
class PrefixBench:
    batched: ConcurrentRun
    sequential: list[ConcurrentRun]
    hf_batched: tuple[float, int] | None  # (wall seconds, tokens)
    ttft_cold: list[float]
    ttft_warm: list[float]
    cached_tokens: int  # prompt tokens the warm request got from the cache
    prompt_tokens: int  # of the warm/cold request
    waste: WasteSampler
    notes: list[str] = field(default_factory=list)

    @property
    def sequential_tokens_per_s(self) -> float:
        wall = sum(r.wall_s for r in self.sequential)
        return sum(r.output_tokens for r in self.sequential) / wall if wall else 0.0

    @property
    def hf_tokens_per_s(self) -> float | None:
        return self.hf_batched[1] / self.hf_batched[0] if self.hf_batched else None

    @property
    def ttft_speedup(self) -> float:
        return statistics.median(self.ttft_cold) / statistics.median(self.ttft_warm)


def _first_token_s(llm: LLM, ids: list[int], salt: str) -> tuple[float, int]:
    """(time to first token, prompt tokens served from the cache) of one request under `salt`."""
    out = llm.generate(None, SamplingParams(max_tokens=1, temperature=0.0), prompt_token_ids=[ids],
                       cache_salt=salt)[0]
    return out.metrics.ttft_s, out.metrics.cached_tokens


def measure_warm_prefix(llm: LLM, prefix_tokens: int, repeats: int) -> tuple[list[float], list[float], int, int]:
    """Cold and warm TTFT of the same request (a `prefix_tokens`-token shared system message, then a question).
    Warm: an earlier request with the same system message ran under the same salt; cold: a fresh salt."""
    system = reference_text(prefix_tokens, llm)
    first, second = chat_prompts(llm, ["Please tell me about Paris.", "Please tell me about Rome."], system)
    engine = fresh_engine(llm, 4, max(len(first), len(second)) + 8)
    _first_token_s(engine, second, "warm-up")  # untimed: first calls pay for allocator growth
    cold, warm, cached = [], [], 0
    for i in range(repeats):
        cold.append(_first_token_s(engine, second, f"cold-{i}")[0])
        _first_token_s(engine, first, f"warm-{i}")  # the earlier request that leaves the prefix cached
        ttft, cached = _first_token_s(engine, second, f"warm-{i}")
        warm.append(ttft)
    return cold, warm, cached, len(second)


def run_prefix_bench(llm: LLM, requests: int, max_tokens: int, cached_prefix_tokens: int, sequential: int,
                     repeats: int = 3, hf: bool = True,
                     progress: Callable[[str, int], Callable[[int], None]] | None = None) -> PrefixBench:
    prompts = chat_prompts(llm, questions(requests), None)
    max_len = max(len(p) for p in prompts) + max_tokens
    run_concurrent(fresh_engine(llm, 2, max_len), prompts[:2], 4)  # untimed warm-up
    waste = WasteSampler(requests)
    on_token = progress(f"{requests} at once", requests * max_tokens) if progress else None
    batched = run_concurrent(fresh_engine(llm, requests, max_len), prompts, max_tokens, "batched", waste, on_token)
    seq_runs = []
    one = fresh_engine(llm, 1, max_len)
    on_token = progress("one at a time", sequential * max_tokens) if progress else None
    for i, p in enumerate(prompts[:sequential]):
        hook = (lambda n, i=i: on_token(i * max_tokens + n)) if on_token else None
        seq_runs.append(run_concurrent(one, [p], max_tokens, "one at a time", on_token=hook))
    hf_result, notes = None, []
    if hf:
        peer, note = load_transformers(llm.source.path, llm.config.resolved_dtype(), llm.tokenizer) \
            if llm.source is not None else (None, "transformers: skipped (the model has no source files)")
        if peer is not None:
            peer.generate_batch(prompts[:2], 4)  # untimed warm-up
            hf_result = peer.generate_batch(prompts, max_tokens)
            notes.append(f"transformers {peer.version}: one batched generate, prompts left-padded, "
                         f"min_new_tokens = max_new_tokens = {max_tokens}, greedy.")
            del peer
        else:
            notes.append(note)
    cold, warm, cached, n_prompt = measure_warm_prefix(llm, cached_prefix_tokens, repeats)
    return PrefixBench(batched, seq_runs, hf_result, cold, warm, cached, n_prompt, waste, notes)


def prefix_report(bench: PrefixBench, report: Report, model_name: str) -> Report:
    """Tables, notes, plots and JSON of a `bench prefix` run, into `report`."""
    _tables(bench, report, model_name)
    report.notes += [
        "tok/s: output tokens / wall time. One at a time: the same requests through one engine, each after the "
        "previous finished; its tok/s is over their summed wall time.",
        "Warm: an earlier request with the same system message ran first (same cache salt); cold: the same "
        "request under a salt nothing was cached with. TTFT as the engine reports it (arrival to first token).",
        "Waste: allocated = blocks in use x bytes per block; held = tokens with KV in those blocks (a block "
        "shared through the prefix cache counted once) x bytes per token. Steady state: every request admitted "
        "and decoding. Sampled after every engine step.",
        *bench.notes,
    ]
    _plots(bench, report, model_name)
    s, hf = bench.waste.samples, bench.hf_batched
    report.results = {
        "batched": bench.batched.to_dict(), "sequential": [r.to_dict() for r in bench.sequential],
        "sequential_tokens_per_s": bench.sequential_tokens_per_s,
        "transformers_batched": {"wall_s": hf[0], "tokens": hf[1], "tokens_per_s": bench.hf_tokens_per_s}
        if hf else None,
        "ttft_cold_s": bench.ttft_cold, "ttft_warm_s": bench.ttft_warm, "cached_tokens": bench.cached_tokens,
        "waste": [{"step": x.step, "blocks_used": x.blocks_used, "allocated_bytes": x.allocated_bytes,
                   "held_bytes": x.held_bytes, "waste": x.waste, "steady": x.steady} for x in s]}
    steady = bench.waste.steady_waste()
    report.summary = {"model": model_name, "batched_tokens_per_s": bench.batched.tokens_per_s,
                      "sequential_tokens_per_s": bench.sequential_tokens_per_s,
                      "transformers_batched_tokens_per_s": bench.hf_tokens_per_s,
                      "ttft_cold_s": statistics.median(bench.ttft_cold),
                      "ttft_warm_s": statistics.median(bench.ttft_warm), "ttft_speedup": bench.ttft_speedup,
                      "steady_waste_mean": statistics.mean(steady) if steady else None,
                      "steady_waste_max": max(steady) if steady else None}
    return report


def _tables(bench: PrefixBench, report: Report, model_name: str) -> None:
    """Throughput against one at a time and transformers; cold against warm TTFT; KV memory waste."""
    b, n_req = bench.batched, bench.batched.concurrency
    seq_tok_s, hf_tok_s = bench.sequential_tokens_per_s, bench.hf_tokens_per_s
    report.tables.append(Table(
        f"{model_name}: {n_req} chat requests, {_new_tokens(bench)} new tokens each",
        ["system", "how", "tok/s", "vs kvengine"], [
            ["kvengine", f"{n_req} at once (one engine)", num(b.tokens_per_s), "1.00"],
            ["kvengine", f"one at a time ({len(bench.sequential)} requests)", num(seq_tok_s),
             num(seq_tok_s / b.tokens_per_s if b.tokens_per_s else None)],
            ["transformers", f"batched generate, {n_req} left-padded", num(hf_tok_s),
             num(hf_tok_s / b.tokens_per_s if hf_tok_s and b.tokens_per_s else None)]]))
    cold, warm = statistics.median(bench.ttft_cold), statistics.median(bench.ttft_warm)
    report.tables.append(Table(
        f"Time to first token, {bench.prompt_tokens}-token prompt ({bench.cached_tokens} tokens cached when warm)",
        ["run", f"TTFT (median of {len(bench.ttft_cold)})", "cold / warm"],
        [["cold (nothing cached)", ms(cold), "1.00"], ["warm (prefix cached by an earlier request)", ms(warm),
                                                        f"{bench.ttft_speedup:,.1f}x"]]))
    steady = bench.waste.steady_waste()
    report.tables.append(Table(
        "KV memory waste during the batched run: (allocated - held) / allocated",
        ["samples", "steady-state samples", "mean at steady state", "max at steady state", "vLLM paper"],
        [[str(len(bench.waste.samples)), str(len(steady)), _pct(statistics.mean(steady) if steady else None),
          _pct(max(steady) if steady else None), "< 4%"]]))


def _new_tokens(bench: PrefixBench) -> int:
    return len(bench.batched.times_s[0]) if bench.batched.times_s else 0


def _plots(bench: PrefixBench, report: Report, model_name: str) -> None:
    """Aggregate tok/s bars, cold/warm TTFT bars, waste at every step."""
    m, n_req = report.machine.describe(), bench.batched.concurrency
    labels = [f"kvengine\n{n_req} at once", "kvengine\none at a time", f"transformers\nbatched ({n_req})"]
    plots.bars(report.plot_path("prefix_throughput.png", "Aggregate tok/s: batched engine, one at a time, "
                                "transformers batched generate"), labels,
               {"output tokens/s": [bench.batched.tokens_per_s, bench.sequential_tokens_per_s,
                                    bench.hf_tokens_per_s]}, "aggregate output tokens/s",
               f"{model_name}: {n_req} chat requests x {_new_tokens(bench)} new tokens", m)
    cold, warm = statistics.median(bench.ttft_cold), statistics.median(bench.ttft_warm)
    plots.bars(report.plot_path("prefix_ttft.png", "Time to first token, cold against a cached prefix"),
               ["cold (nothing cached)", f"warm ({bench.cached_tokens} tokens cached)"],
               {"TTFT": [cold * 1000, warm * 1000]}, "time to first token (ms)",
               f"{model_name}: TTFT of a {bench.prompt_tokens}-token prompt, cold / warm = {bench.ttft_speedup:,.1f}x",
               m)
    s = bench.waste.samples
    plots.lines(report.plot_path("prefix_waste.png", "KV memory waste at every step of the batched run"),
                {"waste, all steps": ([x.step for x in s], [x.waste * 100 for x in s]),
                 "waste, steady state": ([x.step for x in s if x.steady], [x.waste * 100 for x in s if x.steady])},
                "engine step", "allocated but not holding a token (% of allocated KV bytes)",
                f"{model_name}: KV memory waste, {n_req} requests", m, hline=(VLLM_WASTE * 100, "vLLM paper: 4%"))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"

