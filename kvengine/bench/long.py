"""`bench long`: one long text scored teacher-forced with three KV caches, over the same token ids.

- full: every token kept; it stops at the model's context (past it the queries would sit at positions the model
  never saw, and the engine refuses a full cache there);
- window: every layer keeps its last W tokens (sinks 0), so the first tokens leave the cache at position W;
- sinks: the first S tokens ("attention sinks", StreamingLLM) plus the last W.

The modes run in lockstep, one chunk each in turn, so they share the machine's background load. Per mode: the
NLL of every predicted token (perplexity per segment of the text), the KV bytes held after each chunk and the
seconds per token of each chunk's forward pass. Scoring is kvengine/eval/perplexity.py's `score_chunks`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from kvengine.accounting.flops import require_positive
from kvengine.accounting.memory import kv_cache_spec_for
from kvengine.bench import plots
from kvengine.bench.report import Report, Table, mib, ms, num
from kvengine.errors import ConfigError
from kvengine.eval.perplexity import ScoredChunk, chunk_nll, score_chunks

FULL, WINDOW, SINKS = "full", "window", "sinks"
MODES = (FULL, WINDOW, SINKS)
DEFAULT_SEGMENT = 1024
DEFAULT_CHUNK = 64
CONTEXT_FACTOR = 1.5  # default --tokens: this many times the model's context
WARMUP_CHUNKS = 2  # untimed chunks scored once before the timed runs
OnToken = Callable[[int], None]


def parse_modes(text: str) -> tuple[str, ...]:
    """'full,sinks' -> ('full', 'sinks'), in the order given; a one-line ConfigError for anything else."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ConfigError(f"unknown mode '{bad[0] if bad else text}' in --modes (choose from {', '.join(MODES)})")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--modes lists a mode twice: '{text}'")
    return modes


@dataclass(slots=True)
class LongPlan:
    """What to score and how; validated on creation, with the option names a user typed."""

    tokens: int | None  # None: CONTEXT_FACTOR x the model's context
    chunk: int = DEFAULT_CHUNK
    kv_window: int = 1024
    sink_tokens: int = 4
    segment: int = DEFAULT_SEGMENT
    modes: tuple[str, ...] = MODES
    block_size: int = 16
    kv_dtype: str = "auto"  # auto: the model's dtype

    def __post_init__(self) -> None:
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 2):
            raise ConfigError(f"--tokens must be at least 2 (one prediction), got {self.tokens}")
        for value, name in ((self.chunk, "--chunk"), (self.kv_window, "--kv-window"), (self.segment, "--segment"),
                            (self.block_size, "--block-size")):
            require_positive(value, name)
        if self.sink_tokens < 0:
            raise ConfigError(f"--sink-tokens must be 0 or more, got {self.sink_tokens}")
        if SINKS in self.modes and self.sink_tokens == 0:
            raise ConfigError("the sinks mode needs --sink-tokens of at least 1 (or leave it out of --modes)")

    def tokens_for(self, context: int) -> int:
        return self.tokens if self.tokens is not None else int(CONTEXT_FACTOR * context)

    def cache_bound(self, mode: str) -> tuple[int | None, int]:
        """(kv_window, sink_tokens) of `mode`."""
        return {FULL: (None, 0), WINDOW: (self.kv_window, 0), SINKS: (self.kv_window, self.sink_tokens)}[mode]

    def label(self, mode: str) -> str:
        return {FULL: "full cache", WINDOW: f"window {self.kv_window}",
                SINKS: f"{self.sink_tokens} sinks + window {self.kv_window}"}[mode]


@dataclass(slots=True)
class Segment:
    """Perplexity of the predictions made by the queries at positions start .. end - 1 (the prediction at
    position p is of token p + 1, from the tokens 0 .. p the cache kept)."""

    start: int
    end: int
    tokens: int  # predictions scored in the segment (fewer than end - start where the run stopped)
    ppl: float | None  # None: no prediction scored here


def ppl_over(nll: Sequence[float], start: int, end: int) -> float | None:
    """Perplexity of the predictions at query positions start .. end - 1 that were scored (nll[p] is the NLL of
    token p + 1); None when none were."""
    part = nll[start:end]
    return math.exp(math.fsum(part) / len(part)) if len(part) else None


def segment_perplexities(nll: Sequence[float], segment: int, predictions: int) -> list[Segment]:
    """Segments of `segment` query positions covering `predictions` positions (the text's length - 1); a run
    that stopped early (len(nll) < predictions) leaves its later segments partial or empty."""
    segs = []
    for start in range(0, predictions, segment):
        end = min(start + segment, predictions)
        segs.append(Segment(start, end, max(0, min(end, len(nll)) - start), ppl_over(nll, start, end)))
    return segs


@dataclass(slots=True)
class ModeRun:
    mode: str
    label: str
    kv_window: int | None
    sink_tokens: int
    tokens: int  # tokens fed through the cache
    stopped_at: int | None = None  # the full cache: the model's context, when the text is longer
    nll: list[float] = field(default_factory=list)  # [p]: NLL of token p + 1
    positions: list[int] = field(default_factory=list)  # per chunk: tokens in the cache's text after it
    kv_bytes: list[float] = field(default_factory=list)  # per chunk: KV bytes held after it
    blocks: list[int] = field(default_factory=list)  # per chunk: KV blocks held after it
    seconds: list[float] = field(default_factory=list)  # per chunk: its forward pass
    chunk_tokens: list[int] = field(default_factory=list)
    analytic_kv_bytes: float = 0.0  # the accounting's exact-token KV bytes at the last position
    segments: list[Segment] = field(default_factory=list)

    def add(self, step: ScoredChunk, nll: torch.Tensor) -> None:
        n = step.logits.shape[0]
        self.nll += nll.tolist()
        self.positions.append(step.start + n)
        self.kv_bytes.append(step.kv_bytes)
        self.blocks.append(step.blocks_held)
        self.seconds.append(step.seconds)
        self.chunk_tokens.append(n)

    @property
    def per_token_s(self) -> list[float]:
        return [s / n for s, n in zip(self.seconds, self.chunk_tokens, strict=True)]

    @property
    def peak_kv_bytes(self) -> float:
        return max(self.kv_bytes, default=0.0)

    @property
    def ppl(self) -> float | None:
        return ppl_over(self.nll, 0, len(self.nll))

    def time_growth(self) -> float | None:
        """Median seconds per token over the last tenth of the chunks / over the first tenth: ~1 when flat."""
        per = self.per_token_s
        k = max(1, len(per) // 10)
        if len(per) < 2 * k or not statistics.median(per[:k]):
            return None
        return statistics.median(per[-k:]) / statistics.median(per[:k])

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "label": self.label, "kv_window": self.kv_window, "sink_tokens": self.sink_tokens,
                "tokens": self.tokens, "stopped_at": self.stopped_at, "predictions": len(self.nll), "ppl": self.ppl,
                "peak_kv_bytes": self.peak_kv_bytes, "analytic_kv_bytes": self.analytic_kv_bytes,
                "time_growth": self.time_growth(), "total_s": math.fsum(self.seconds),
                "segments": [asdict(s) for s in self.segments], "positions": self.positions,
                "kv_bytes": self.kv_bytes, "blocks": self.blocks, "seconds": self.seconds,
                "chunk_tokens": self.chunk_tokens, "nll": self.nll}


@dataclass(slots=True)
class LongBench:
    plan: LongPlan
    tokens: int  # the text's tokens every mode was given
    context: int  # the model's max_position_embeddings
    kv_dtype: str
    runs: dict[str, ModeRun]

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "context": self.context, "kv_window": self.plan.kv_window,
                "sink_tokens": self.plan.sink_tokens, "chunk": self.plan.chunk, "segment": self.plan.segment,
                "kv_dtype": self.kv_dtype, "modes": list(self.runs),
                "full_stopped_at": self.runs[FULL].stopped_at if FULL in self.runs else None,
                "ppl": {m: r.ppl for m, r in self.runs.items()},
                "segment_ppl": {m: [s.ppl for s in r.segments] for m, r in self.runs.items()},
                "peak_kv_bytes": {m: r.peak_kv_bytes for m, r in self.runs.items()},
                "time_growth": {m: r.time_growth() for m, r in self.runs.items()}}


def _lockstep(streams: dict[str, Iterator[ScoredChunk]]) -> Iterator[tuple[str, ScoredChunk]]:
    """One chunk of each live stream in turn until every stream ends."""
    live = dict(streams)
    while live:
        for mode in list(live):
            step = next(live[mode], None)
            if step is None:
                del live[mode]
            else:
                yield mode, step


def run_long_bench(model: torch.nn.Module, token_ids: Sequence[int], plan: LongPlan,
                   device: torch.device | str = "cpu",
                   progress: Callable[[str, int], OnToken] | None = None) -> LongBench:
    """Score `token_ids` in every mode of `plan`; `progress(label, total)` returns a per-mode token callback."""
    ids = list(token_ids)
    context = model.config.max_position_embeddings
    kv_dtype = (str(next(model.parameters()).dtype).removeprefix("torch.") if plan.kv_dtype == "auto"
                else plan.kv_dtype)
    base = kv_cache_spec_for(model.config, kv_dtype, plan.block_size)
    for _ in score_chunks(model, ids[:WARMUP_CHUNKS * plan.chunk + 1], kv_dtype, plan.chunk, plan.block_size,
                          device):
        pass  # first calls pay for allocator growth and kernel choice: keep them out of the timings
    runs, streams, bars = {}, {}, {}
    for mode in plan.modes:
        window, sinks = plan.cache_bound(mode)
        n = len(ids) if window is not None else min(len(ids), context)
        run = ModeRun(mode, plan.label(mode), window, sinks, n, context if n < len(ids) else None)
        run.analytic_kv_bytes = replace(base, kv_window=window, sink_tokens=sinks).bytes_for_sequence(n)
        runs[mode] = run
        streams[mode] = score_chunks(model, ids[:n], kv_dtype, plan.chunk, plan.block_size, device, window, sinks)
        bars[mode] = progress(run.label, n) if progress is not None else None
    for mode, step in _lockstep(streams):
        # the full ids: the full cache's last query (position context - 1) still predicts the token after it
        runs[mode].add(step, chunk_nll(step.logits, ids, step.start))
        if bars[mode] is not None:
            bars[mode](runs[mode].positions[-1])
    for run in runs.values():
        run.segments = segment_perplexities(run.nll, plan.segment, len(ids) - 1)
    return LongBench(plan, len(ids), context, kv_dtype, runs)


def _after_eviction(bench: LongBench) -> str | None:
    """One sentence: each mode's perplexity over the query positions from the first eviction (W) to where every
    mode still scored, so the modes compare on the same predictions."""
    start = bench.plan.kv_window
    end = min(len(r.nll) for r in bench.runs.values())
    if end <= start or len(bench.runs) < 2:
        return None
    ppl = {m: ppl_over(r.nll, start, end) for m, r in bench.runs.items()}
    parts = [f"{r.label} {num(ppl[m])}" + (f" ({ppl[m] / ppl[FULL]:.2f}x the full cache's)" if m != FULL and
                                          FULL in ppl else "") for m, r in bench.runs.items()]
    return (f"Perplexity over the same predictions, query positions {start}..{end - 1} (from the first eviction at "
            f"position W = {start} to where every mode still scored): " + ", ".join(parts) + ".")


def long_report(bench: LongBench, report: Report, model_name: str, text_name: str) -> Report:
    """Tables, notes, plots and JSON of a `bench long` run, into `report`."""
    plan, runs, m = bench.plan, bench.runs, report.machine.describe()
    rows = []
    for r in runs.values():
        per = r.per_token_s
        rows.append([r.label, f"{r.tokens:,}", f"{r.stopped_at:,}" if r.stopped_at else "-", num(r.ppl, 3),
                     mib(r.peak_kv_bytes), mib(r.kv_bytes[-1] if r.kv_bytes else None), mib(r.analytic_kv_bytes),
                     f"{max(r.blocks, default=0):,}", ms(statistics.median(per) if per else None),
                     num(r.time_growth()), f"{math.fsum(r.seconds):,.1f} s"])
    report.tables.append(Table(
        f"{model_name}: {bench.tokens:,} tokens of {text_name}, chunks of {plan.chunk} (context {bench.context:,})",
        ["mode", "tokens", "stopped at", "ppl", "peak KV held", "KV held at end", "KV (accounting) at end",
         "peak blocks", "median/token", "time growth", "forward time"], rows))
    seg_rows = []
    for k, seg in enumerate(next(iter(runs.values())).segments):
        cells = []
        for r in runs.values():
            s = r.segments[k]
            cells.append("stopped" if s.ppl is None else num(s.ppl, 3) + ("" if s.tokens == s.end - s.start
                                                                           else f" ({s.tokens} of {s.end - s.start})"))
        seg_rows.append([f"{seg.start:,}..{seg.end - 1:,}", *cells])
    report.tables.append(Table(f"Perplexity per segment of {plan.segment} query positions (the prediction at "
                               "position p is of token p + 1)", ["positions", *(r.label for r in runs.values())],
                               seg_rows))
    report.notes += _notes(bench)
    _plots(bench, report, model_name, m)
    report.results = {"text": text_name, "kv_dtype": bench.kv_dtype, "runs": {k: r.to_dict() for k, r in runs.items()}}
    report.summary = {"model": model_name, **bench.summary()}
    return report


def _notes(bench: LongBench) -> list[str]:
    plan, notes = bench.plan, []
    full = bench.runs.get(FULL)
    if full is not None and full.stopped_at is not None:
        notes.append(f"The full cache stopped at token {full.stopped_at:,}, the model's context "
                     "(max_position_embeddings): past it a query would sit at a position the model was never "
                     "trained on, and the engine refuses a full cache there (ConfigError). Its last prediction is "
                     f"of token {full.stopped_at:,}, made at position {full.stopped_at - 1:,}.")
    if full is not None and len(full.blocks) > 1 and full.blocks[0] == max(full.blocks):
        notes.append("The full cache held its whole text's blocks from the first chunk on: the scorer reserved them "
                     "when it admitted the text (as the engine does for a prompt), so its KV-held line is flat; "
                     "the bytes its tokens fill grow with the text (the accounting column: at the end).")
    sentence = _after_eviction(bench)
    if sentence:
        notes.append(sentence)
    if plan.kv_window + plan.sink_tokens > bench.context:
        notes.append(f"The window ({plan.kv_window} + {plan.sink_tokens} sinks) is wider than the model's context "
                     f"({bench.context}): queries then see keys at distances the model never saw.")
    notes += [
        "KV held: the blocks the sequence holds after each chunk x bytes per block (block-rounded, the chunk being "
        "computed included); KV (accounting): kvengine.accounting's exact-token bytes for the text so far.",
        "Time per token: a chunk's forward seconds / its tokens (the NLL and bookkeeping left out); time growth = "
        "median over the last tenth of the chunks / over the first tenth (~1: flat). Modes run in lockstep, one "
        f"chunk each in turn; {WARMUP_CHUNKS} chunks scored once untimed before.",
        "Before position W (the window) no token has been evicted, so all modes score the same there (up to "
        "float summation order); the sinks mode rotates the query at its cache position S + W - 1 for its "
        "scores against the sinks (cache/retention.py).",
    ]
    return notes


def _plots(bench: LongBench, report: Report, model_name: str, footer: str) -> None:
    runs, plan = bench.runs, bench.plan
    stop = f"; the full cache stops at {bench.context:,}" if FULL in runs and runs[FULL].stopped_at else ""
    xlabel = "position in the text (tokens so far)"
    plots.lines(report.plot_path("kv_memory.png", "KV cache bytes held against position in the text"),
                {r.label: (r.positions, [b / 2**20 for b in r.kv_bytes]) for r in runs.values()},
                xlabel, "KV held (MiB)", f"{model_name}: KV memory over a long text{stop}", footer)
    plots.lines(report.plot_path("time_per_token.png", "Forward time per token of each chunk against position"),
                {r.label: (r.positions, [t * 1000 for t in r.per_token_s]) for r in runs.values()},
                xlabel, "time per token (ms)", f"{model_name}: time per token, chunks of {plan.chunk}{stop}", footer)
    series = {}
    for r in runs.values():
        scored = [s for s in r.segments if s.ppl is not None]
        series[r.label] = ([(s.start + s.end) / 2 for s in scored], [s.ppl for s in scored])
    plots.lines(report.plot_path("perplexity.png", f"Perplexity per segment of {plan.segment} positions"),
                series, "position in the text (segment middle)", "perplexity",
                f"{model_name}: perplexity per {plan.segment}-token segment{stop}", footer)
