"""The seeds' own KV-cache experiments (seeds 000, 002, 004 in the project's seed documents): what each ran, on
what, and what it measured, so a `bench cache` report can set the seed's table beside kvengine's.

The seeds' numbers are quoted as published. Where this machine cannot generate as many tokens as the seed did,
the report extrapolates the measured trend (labelled as such): each run's time per token fitted to the analytic
matmul FLOPs of its steps (a fixed cost plus seconds per FLOP), summed over the steps of the seed's token count,
so the no-cache run's quadratic growth comes from the FLOP count, not from a curve through noisy times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvengine.accounting.flops import completion_flops
from kvengine.accounting.presets import get_preset
from kvengine.bench.cache import CacheBench, TimedRun
from kvengine.bench.report import Report, Table
from kvengine.errors import ConfigError
from kvengine.llm import LLM


@dataclass(slots=True, frozen=True)
class SeedExperiment:
    """One seed's experiment: its settings (which `kvengine bench seed` reuses) and its published figures."""

    seed: str
    model: str  # kvengine's stand-in: --model
    prompt: str
    new_tokens: int
    runs: int
    hardware: str
    seed_model: str
    seed_prompt_tokens: int | None
    without_s: float
    with_s: float
    max_run_tokens: int | None = None  # the most kvengine's stand-in can generate (learned positions)


SEEDS: dict[str, SeedExperiment] = {
    "004": SeedExperiment("004", "preset:gpt2", "Hello, I'm a language model", 1000, 5,
                          "Google Colab, NVIDIA T4 GPU (Hugging Face transformers, generate with use_cache on/off)",
                          "Hugging Face `gpt2` (124M, trained weights)", 7, 43.3307, 8.3611),
    "002": SeedExperiment("002", "preset:gpt2", "Hello, I'm a language model", 100, 1,
                          "not stated (a video of 'our GPT model')", "a GPT model (size not stated)", None, 42.0, 9.0),
    "000": SeedExperiment("000", "preset:seed000", "Please tell me about Paris", 10_000, 1,
                          "the author's GPU (not named; figures 17.9/17.10 chart its utilisation and memory)",
                          "the author's 20-layer GPT (width 1,280, 10 heads, vocab 65,536; trained)", 5, 269.0, 82.0,
                          max_run_tokens=2048 - 16),  # 2,048 learned positions, less the prompt
}
# Seed 004's closed-form table for GPT3-medium (d_model 1024, 24 layers, vocab 50,257): s -> (without, with).
SEED004_FLOPS = {10: (1.11e10, 7.07e9), 100: (5.64e11, 7.07e10), 500: (1.29e13, 3.53e11), 1000: (5.09e13, 7.07e11),
                 2000: (2.03e14, 1.41e12), 4000: (8.08e14, 2.83e12), 8000: (3.23e15, 5.66e12)}


def seed_experiment(seed: str) -> SeedExperiment:
    key = seed.removeprefix("seed").zfill(3)
    if key not in SEEDS:
        raise ConfigError(f"unknown seed experiment '{seed}' (choose from {', '.join(SEEDS)})")
    return SEEDS[key]


def extrapolated_total_s(run: TimedRun, measured_flops: list[int], target_flops: list[int]) -> float:
    """Wall time for the steps of `target_flops` (analytic matmul FLOPs per step, step 0 the prefill),
    extrapolated from `run`: per-token time = c0 + c1·(step FLOPs), c0, c1 >= 0, least squares over the run's
    steps after the first (whose FLOPs are `measured_flops`); the measured first token plus the fitted rest."""
    per = run.per_token_s
    x = np.array(measured_flops[1:len(per)], dtype=float)
    coef = nonnegative_fit(np.stack([np.ones_like(x), x], axis=1), np.array(per[1:len(x) + 1]))
    future = np.array(target_flops[1:], dtype=float)
    return float(per[0] + len(future) * coef[0] + coef[1] * future.sum())


def nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares x·c ≈ y with every c >= 0, by trying each subset of columns (there are at most three)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    for mask in range(1, 1 << x.shape[1]):
        cols = [j for j in range(x.shape[1]) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (c >= 0).all() and (err := float(np.sum((x[:, cols] @ c - y) ** 2))) < best_err:
            best, best_err = np.zeros(x.shape[1]), err
            best[cols] = c
    return best


def _secs(s: float) -> str:
    return f"{s:,.2f} s"


def seed_report(exp: SeedExperiment, bench: CacheBench, report: Report, llm: LLM) -> None:
    """The seed's table beside kvengine's measured one (and, for 004 and 000, their FLOP tables)."""
    c, u, n = bench.cached, bench.uncached, exp.new_tokens
    short = len(c.times_s) < n or len(u.times_s) < n
    rows = [
        ["hardware", exp.hardware, report.machine.describe()],
        ["model", exp.seed_model, f"{llm.model_name}: {llm.engine.weights_desc}"],
        ["prompt tokens", str(exp.seed_prompt_tokens or "not stated"), f"{c.prompt_tokens} (kvengine's tokenizer)"],
        ["new tokens (cache / no cache)", f"{n:,} / {n:,}", f"{len(c.times_s):,} / {len(u.times_s):,}"],
        ["runs averaged", str(exp.runs), str(len(bench.cached_totals_s) or 1)],
        ["without KV cache", _secs(exp.without_s), _secs(bench.mean_uncached_s)],
        ["with KV cache", _secs(exp.with_s), _secs(bench.mean_cached_s)],
        ["speedup", f"{exp.without_s / exp.with_s:.2f}x", f"{bench.mean_speedup:.2f}x"],
        ["time reduction", f"{(1 - exp.with_s / exp.without_s) * 100:.2f}%", f"{bench.time_reduction_pct:.2f}%"],
    ]
    if short:
        target = completion_flops(llm.model_config, c.prompt_tokens, n, lm_head="last")
        without = extrapolated_total_s(u, bench.flops_uncached.steps_without, target.steps_without)
        with_ = extrapolated_total_s(c, bench.flops.steps_with, target.steps_with)
        rows += [[f"EXTRAPOLATED to {n:,} tokens: without / with", f"{_secs(exp.without_s)} / {_secs(exp.with_s)}",
                  f"{_secs(without)} / {_secs(with_)} ({without / with_:.2f}x)"]]
        report.notes.append(f"Seed {exp.seed}: this machine's runs were capped at {len(c.times_s):,} tokens with the "
                            f"cache and {len(u.times_s):,} without (the seed: {n:,}); the EXTRAPOLATED row fits each "
                            "run's time per token to its steps' analytic matmul FLOPs (time = c0 + c1·FLOPs) and "
                            f"sums that over the steps of {n:,} tokens. It is an estimate, not a measurement.")
    report.tables.append(Table(f"Seed {exp.seed}'s published run beside kvengine's", ["", f"seed {exp.seed}",
                                                                                      "kvengine (this run)"], rows))
    if exp.seed == "004":
        report.tables.append(seed004_flops_table())
    if exp.seed == "000":
        report.tables.append(seed000_flops_table())
    report.results[f"seed{exp.seed}"] = {"published": {"without_s": exp.without_s, "with_s": exp.with_s,
                                                       "new_tokens": n, "hardware": exp.hardware},
                                        "table": [list(r) for r in rows]}


def seed004_flops_table() -> Table:
    """Seed 004's closed-form GPT3-medium table beside kvengine's counts: the same closed form (kv-only), and
    every matmul of the real steps (exact: attention scores and the causal prefill included)."""
    config, rows = get_preset("gpt3-medium"), []
    for s, (without, with_) in SEED004_FLOPS.items():
        kv = completion_flops(config, 1, s, "kv-only")
        ex = completion_flops(config, 1, s, "exact", "last")
        rows.append([f"{s:,}", f"{without:.2e}", f"{with_:.2e}", f"{(1 - with_ / without) * 100:.2f}%",
                     f"{kv.without_cache:.2e}", f"{kv.with_cache:.2e}", f"{kv.reduction * 100:.2f}%",
                     f"{ex.without_cache:.2e}", f"{ex.with_cache:.2e}", f"{ex.reduction * 100:.2f}%"])
    return Table("Seed 004's closed-form FLOPs for GPT3-medium beside kvengine's counts (s = positions fed)",
                 ["s", "seed: without", "seed: with", "seed: saved", "kv-only: without", "kv-only: with",
                  "kv-only: saved", "exact: without", "exact: with", "exact: saved"], rows)


def seed000_flops_table() -> Table:
    """Seed 000's tables 17.2 and 17.5 (a 5-token prompt, 20 new tokens) beside kvengine's count."""
    f = completion_flops(get_preset("seed000"), 5, 20)
    return Table("Seed 000's FLOPs for a 20-token completion of a 5-token prompt (tables 17.2, 17.5)",
                 ["", "seed 000", "kvengine (exact, LM head on every position)"],
                 [["without cache", "277e9", f"{f.without_cache / 1e9:,.1f}e9"],
                  ["with cache", "23e9", f"{f.with_cache / 1e9:,.1f}e9"]])
