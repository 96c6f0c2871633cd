"""`bench cache`: the seeds' experiment. Generate N tokens with the KV cache and without it (every step
recomputes the whole text), time every token, and set the analytic matmul FLOPs of both beside the times.

Also owns the pieces the other benches reuse: the prompt encoding and `timed_stream`, which times each
token of one kvengine request.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvengine.accounting.flops import FLOP_CONVENTION, CompletionFlops, completion_flops
from kvengine.bench import plots
from kvengine.bench.report import Report, Table, gflop, mib, ms, num
from kvengine.bench.sampler import ResourceSampler, SampleSeries
from kvengine.errors import ConfigError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

DEFAULT_PROMPT = "Please tell me about Paris."
CACHED, UNCACHED = "with KV cache", "without cache"
OnToken = Callable[[int], None]  # called with the number of tokens generated so far


def encode_prompt(llm: LLM, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`: as one user message through the chat template, or as is (`raw`, or a model
    without a template)."""
    tok = llm.tokenizer
    if tok is None:
        raise ConfigError("the benchmarks need a model with a tokenizer")
    if raw or tok.chat_template is None:
        return tok.encode(prompt)
    return tok.encode_chat([{"role": "user", "content": prompt}])


@dataclass(slots=True)
class TimedRun:
    """One request, each generated token with the time it arrived (seconds since the request was sent)."""

    label: str
    use_cache: bool
    prompt_tokens: int
    token_ids: list[int]
    times_s: list[float]
    text: str = ""
    engine_flops: int = 0  # what the engine counted for the request (RequestMetrics.flops)
    resources: SampleSeries | None = None

    @property
    def total_s(self) -> float:
        return self.times_s[-1] if self.times_s else 0.0

    @property
    def ttft_s(self) -> float:
        return self.times_s[0] if self.times_s else 0.0

    @property
    def per_token_s(self) -> list[float]:
        """Time each token took; token 0's is the time to first token (the prefill step)."""
        return [t - (self.times_s[i - 1] if i else 0.0) for i, t in enumerate(self.times_s)]

    @property
    def positions(self) -> list[int]:
        """Position of each generated token in the whole sequence (0-based)."""
        return [self.prompt_tokens + k for k in range(len(self.times_s))]

    @property
    def tokens_per_s(self) -> float:
        """End to end: tokens / (time from sending the request to the last token)."""
        return len(self.times_s) / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first / time between the first and the last token."""
        n = len(self.times_s)
        return (n - 1) / (self.times_s[-1] - self.times_s[0]) if n > 1 and self.times_s[-1] > self.times_s[0] \
            else None

    def latency_growth(self) -> float | None:
        """Median time per token over the last tenth of the tokens / over the first tenth (token 0, the
        prefill, left out): about 1 when per-token time is flat, large when it grows with position."""
        steps = self.per_token_s[1:]
        k = max(1, len(steps) // 10)
        if len(steps) < 2 * k:
            return None
        return statistics.median(steps[-k:]) / statistics.median(steps[:k])

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "use_cache": self.use_cache, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.token_ids), "total_s": self.total_s, "ttft_s": self.ttft_s,
                "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "latency_growth": self.latency_growth(), "engine_flops": self.engine_flops, "text": self.text,
                "token_ids": self.token_ids, "times_s": self.times_s,
                "resources": self.resources.to_dict() if self.resources else None}


def timed_stream(llm: LLM, prompt_ids: list[int], max_tokens: int, use_cache: bool = True,
                 on_token: OnToken | None = None, label: str | None = None) -> TimedRun:
    """Greedy, end-of-sequence ignored, so exactly `max_tokens` tokens come out; every token timestamped."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    times: list[float] = []
    final = None
    t0 = time.perf_counter()
    for out in llm.stream(prompt_token_ids=prompt_ids, sampling_params=params, use_cache=use_cache):
        now = time.perf_counter() - t0
        times += [now] * len(out.delta_token_ids)
        final = out
        if on_token is not None:
            on_token(len(times))
    assert final is not None and final.finished
    flops = final.metrics.flops if final.metrics is not None else 0
    return TimedRun(label or (CACHED if use_cache else UNCACHED), use_cache, len(prompt_ids), final.token_ids,
                    times, final.text, flops)


@dataclass(slots=True)
class CacheBench:
    cached: TimedRun
    uncached: TimedRun
    flops: CompletionFlops  # analytic, for the cached run's length
    flops_uncached: CompletionFlops  # analytic, for the no-cache run's length (may be capped)
    capped: bool  # the no-cache run generated fewer tokens than the cached one
    first_divergence: int | None = None  # first token where the two runs' greedy tokens differ
    warmup_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    # wall time of every timed run (--runs), seed 004's way: averaged; `cached`/`uncached` are the median runs
    cached_totals_s: list[float] = field(default_factory=list)
    uncached_totals_s: list[float] = field(default_factory=list)

    @property
    def mean_cached_s(self) -> float:
        return statistics.mean(self.cached_totals_s or [self.cached.total_s])

    @property
    def mean_uncached_s(self) -> float:
        return statistics.mean(self.uncached_totals_s or [self.uncached.total_s])

    @property
    def mean_speedup(self) -> float:
        """Seed 004's speedup factor: mean no-cache time / mean cached time (same token counts only)."""
        return self.mean_uncached_s / self.mean_cached_s if not self.capped else self.speedup

    @property
    def time_reduction_pct(self) -> float:
        """Seed 004's time reduction: (1 - cached / no-cache) x 100."""
        return (1 - 1 / self.mean_speedup) * 100

    @property
    def compared_tokens(self) -> int:
        return len(self.uncached.times_s)

    @property
    def speedup(self) -> float:
        """No-cache wall time / cached wall time, over the tokens both runs generated."""
        cached_s = self.cached.times_s[self.compared_tokens - 1]
        return self.uncached.total_s / cached_s if cached_s else float("nan")

    @property
    def flop_ratio(self) -> float:
        """No-cache matmul FLOPs / cached, over the tokens both runs generated."""
        return self.flops_uncached.ratio

    def summary(self) -> dict[str, Any]:
        return {"model": None, "prompt_tokens": self.cached.prompt_tokens, "new_tokens": len(self.cached.times_s),
                "no_cache_tokens": self.compared_tokens, "cached_s": self.cached.total_s,
                "no_cache_s": self.uncached.total_s, "speedup": self.speedup, "flop_ratio": self.flop_ratio,
                "cached_latency_growth": self.cached.latency_growth(),
                "no_cache_latency_growth": self.uncached.latency_growth(),
                "same_tokens": self.first_divergence is None, "runs": len(self.cached_totals_s) or 1,
                "mean_cached_s": self.mean_cached_s, "mean_no_cache_s": self.mean_uncached_s,
                "mean_speedup": self.mean_speedup, "time_reduction_pct": self.time_reduction_pct}


def run_cache_bench(llm: LLM, prompt_ids: list[int], max_tokens: int, no_cache_max_tokens: int | None = None,
                    warmup_tokens: int = 4, progress: Callable[[str, int], OnToken] | None = None,
                    sample_interval_s: float = 0.1, runs: int = 1) -> CacheBench:
    """`runs` cached runs of `max_tokens`, then `runs` no-cache runs (capped at `no_cache_max_tokens`), each
    sampled; the run of median wall time stands for its mode. `progress(label, total)` returns the per-token
    callback of a progress bar."""
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    n_uncached = min(max_tokens, no_cache_max_tokens or max_tokens)
    if n_uncached < 1:
        raise ConfigError(f"--no-cache-max-tokens must be at least 1, got {no_cache_max_tokens}")
    if warmup_tokens > 0:  # first calls pay for allocator growth and kernel selection; keep that out
        for use_cache in (True, False):
            timed_stream(llm, prompt_ids, warmup_tokens, use_cache)
    if runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {runs}")
    timed: dict[bool, list[TimedRun]] = {True: [], False: []}
    for use_cache, n in ((True, max_tokens), (False, n_uncached)):
        for i in range(runs):
            label = (CACHED if use_cache else UNCACHED) + (f" ({i + 1}/{runs})" if runs > 1 else "")
            on_token = progress(label, n) if progress is not None else None
            with ResourceSampler(sample_interval_s) as sampler:
                run = timed_stream(llm, prompt_ids, n, use_cache, on_token, CACHED if use_cache else UNCACHED)
            run.resources = sampler.series
            timed[use_cache].append(run)
    runs_by_mode = {mode: sorted(rs, key=lambda r: r.total_s)[(len(rs) - 1) // 2] for mode, rs in timed.items()}
    config, p = llm.model_config, len(prompt_ids)
    # The engine's convention: the LM head on the last position of every forward pass.
    flops = completion_flops(config, p, max_tokens, lm_head="last")
    flops_uncached = flops if n_uncached == max_tokens else completion_flops(config, p, n_uncached, lm_head="last")
    cached, uncached = runs_by_mode[True], runs_by_mode[False]
    pairs = enumerate(zip(cached.token_ids, uncached.token_ids, strict=False))
    diverge = next((i for i, (a, b) in pairs if a != b), None)
    return CacheBench(cached, uncached, flops, flops_uncached, n_uncached < max_tokens, diverge, warmup_tokens,
                      cached_totals_s=[r.total_s for r in timed[True]],
                      uncached_totals_s=[r.total_s for r in timed[False]])


def cache_report(bench: CacheBench, report: Report, model_name: str) -> Report:
    """Tables, notes, plots and JSON of a `bench cache` run, into `report`."""
    c, f, n = bench.cached, bench.flops, bench.compared_tokens
    _tables(bench, report, model_name)
    report.notes += [
        f"Speedup {bench.speedup:,.2f}x in wall time beside {bench.flop_ratio:,.2f}x in matmul FLOPs over the "
        f"first {n} tokens. FLOPs: {FLOP_CONVENTION}; {f.describe()}.",
        "TTFT: time to first token (the prefill step). Growth = median time per token over the last tenth of "
        "the positions / over the first tenth (first token left out): ~1 means flat. GFLOP: analytic matmul "
        "FLOPs of the run; GFLOP (engine): what the engine counted step by step; CPU %: this process, mean, "
        "% of all cores.",
        "Greedy tokens of the two runs: " + ("identical" if bench.first_divergence is None else
                                               f"differ from token {bench.first_divergence} on"),
        f"Warm-up before timing: {bench.warmup_tokens} tokens with and without the cache (not timed).",
    ]
    if bench.capped:
        report.notes.append(f"The no-cache run was capped at {n} tokens (--no-cache-max-tokens); the cached run "
                            f"generated {len(c.times_s)}. Speedup and FLOP ratio compare the first {n} tokens.")
    _plots(bench, report, model_name)
    report.results = {"cached": c.to_dict(), "no_cache": bench.uncached.to_dict(), "flops": f.to_dict(),
                      "flops_no_cache_run": bench.flops_uncached.to_dict(), "speedup": bench.speedup,
                      "flop_ratio": bench.flop_ratio, "first_divergence": bench.first_divergence,
                      "capped": bench.capped}
    report.summary = {**bench.summary(), "model": model_name}
    return report


def _tables(bench: CacheBench, report: Report, model_name: str) -> None:
    """Both runs side by side, what the cache saved, and seed 004's summary lines."""
    c, u, f, fu = bench.cached, bench.uncached, bench.flops, bench.flops_uncached
    rows = []
    for run, fl, steps in ((c, f.with_cache, f.steps_with), (u, fu.without_cache, fu.steps_without)):
        per = run.per_token_s
        rows.append([run.label, str(len(run.times_s)), f"{run.total_s:,.2f} s", num(run.tokens_per_s),
                     ms(run.ttft_s), ms(statistics.median(per[1:]) if len(per) > 1 else None),
                     num(run.latency_growth()), gflop(fl), gflop(run.engine_flops), gflop(steps[-1]),
                     mib(run.resources.peak_rss()), num(run.resources.mean_cpu(), 0)])
    report.tables.append(Table(
        f"{model_name}: {len(c.times_s)} new tokens after a {c.prompt_tokens}-token prompt",
        ["run", "tokens", "wall time", "tok/s", "TTFT", "median/token", "growth", "GFLOP", "GFLOP (engine)",
         "GFLOP last step", "peak RSS", "CPU %"], rows))
    n = bench.compared_tokens
    report.tables.append(Table(f"What the cache saved over {n} tokens", ["measure", "no cache / cache"], [
        ["wall time (speedup)", f"{bench.speedup:,.2f}x"],
        ["matmul FLOPs (analytic)", f"{bench.flop_ratio:,.2f}x"]]))
    runs = len(bench.cached_totals_s) or 1
    report.tables.append(Table(f"Results summary (seed 004's lines; mean of {runs} run{'s' * (runs > 1)} each)",
                               ["measure", "value"], [
        ["Without KV cache", f"{bench.mean_uncached_s:,.4f} seconds ({n} tokens)"],
        ["With KV cache", f"{bench.mean_cached_s:,.4f} seconds ({len(c.times_s)} tokens)"],
        ["Speedup factor", f"{bench.mean_speedup:,.2f}x"],
        ["Time reduction", f"{bench.time_reduction_pct:,.2f}%"]]))


def _plots(bench: CacheBench, report: Report, model_name: str) -> None:
    """Time per token (with each step's FLOPs), cumulative time, CPU and memory."""
    c, u, f, fu, m = bench.cached, bench.uncached, bench.flops, bench.flops_uncached, report.machine.describe()
    step_flops = {CACHED: (c.positions, f.steps_with), UNCACHED: (u.positions, fu.steps_without)}
    plots.token_latency(report.plot_path("token_latency.png", "Time per generated token against its position, "
                                         "with the analytic FLOPs of each step"),
                        {CACHED: (c.positions, c.per_token_s), UNCACHED: (u.positions, u.per_token_s)},
                        step_flops, f"{model_name}: time per token, with and without the KV cache", m)
    plots.cumulative(report.plot_path("cumulative_time.png", "Total time against tokens generated"),
                     {r.label: ([0, *range(1, len(r.times_s) + 1)], [0.0, *r.times_s]) for r in (c, u)},
                     f"{model_name}: time to generate N tokens", m)
    plots.resources(report.plot_path("resources.png", "CPU utilisation and process memory over each run "
                                     "(seed 000's charts)"),
                    {CACHED: c.resources, UNCACHED: u.resources},
                    f"{model_name}: utilisation and memory while generating", m)
