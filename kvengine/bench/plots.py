"""The benchmarks' PNG plots (matplotlib, Agg backend: no display needed). Every plot has a title, axis
labels with units and a legend; the machine is named in a footer so a plot read alone still says where
it was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kvengine.bench.sampler import SampleSeries  # noqa: E402

COLORS = {"with KV cache": "tab:blue", "without cache": "tab:red"}
DPI = 110
Series = tuple[Sequence[float], Sequence[float]]  # (x values, y values)


def _finish(fig: Figure, path: Path, footer: str, bottom: float = 0.03) -> Path:
    fig.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _color(label: str, i: int) -> str:
    return COLORS.get(label, f"C{i}")


def token_latency(path: Path, latency: dict[str, Series], step_flops: dict[str, Series], title: str,
                  footer: str) -> Path:
    """Top: time of each generated token (ms) against its position in the text; bottom: the analytic
    matmul FLOPs of the step that produced it. Flat with the cache, growing without."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2))
    for i, (label, (x, y)) in enumerate(latency.items()):
        ys = [v * 1000 for v in y]
        window = max(5, len(ys) // 25)
        if len(ys) < 3 * window:  # too few tokens for a trend line: the raw times only
            top.plot(x, ys, label=label, color=_color(label, i), linewidth=1)
            continue
        top.plot(x, ys, color=_color(label, i), linewidth=0.6, alpha=0.35)
        top.plot(*_rolling_median(x, ys, window), label=f"{label} (median of {window} tokens; raw faint)",
                 color=_color(label, i), linewidth=2)
    top.set_ylabel("time per token (ms)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    top.set_ylim(bottom=0)
    for i, (label, (x, y)) in enumerate(step_flops.items()):
        bottom.plot(x, [v / 1e9 for v in y], label=f"{label} (analytic)", color=_color(label, i), linewidth=1.5)
    bottom.set_ylabel("matmul GFLOP per step")
    bottom.set_xlabel("position of the generated token in the sequence (prompt + tokens so far)")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left")
    bottom.set_ylim(bottom=0)
    return _finish(fig, path, footer)


def _rolling_median(x: Sequence[float], y: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """Centred running median of `window` points (the ends, where the window does not fit, left out)."""
    values = np.median(np.lib.stride_tricks.sliding_window_view(np.asarray(y, dtype=float), window), axis=1)
    half = window // 2
    return list(x[half:half + len(values)]), values.tolist()


def cumulative(path: Path, runs: dict[str, Series], title: str, footer: str) -> Path:
    """Seconds elapsed since the request was sent, against tokens generated so far."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (label, (x, y)) in enumerate(runs.items()):
        ax.plot(x, y, label=label, color=_color(label, i), linewidth=1.5)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("time since the request was sent (s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    return _finish(fig, path, footer)


def resources(path: Path, runs: dict[str, SampleSeries], title: str, footer: str) -> Path:
    """One panel per run, like seed 000's two charts: utilisation (%) on the left axis, memory (MiB) on the
    right, over the run's time; the panels share the time axis so their lengths compare."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.6 * len(runs)), sharex=True, squeeze=False)
    for ax, (label, series) in zip(axes[:, 0], runs.items(), strict=True):
        s = series.samples
        t = [x.t_s for x in s]
        lines = ax.plot(t, [x.cpu_percent for x in s], color="tab:green", linewidth=1.2,
                        label="process CPU (% of all cores)")
        lines += ax.plot(t, [x.machine_cpu_percent for x in s], color="tab:gray", linewidth=0.8, linestyle=":",
                         label="whole machine CPU (%)")
        if any(x.gpu_percent is not None for x in s):
            lines += ax.plot(t, [x.gpu_percent or 0 for x in s], color="tab:orange", linewidth=1.2,
                             label="GPU utilisation (%)")
        ax.set_ylim(0, 105)
        ax.set_ylabel("utilisation (%)")
        ax.set_title(f"{label}: {t[-1] if t else 0:.1f} s")
        ax.grid(alpha=0.3)
        mem = ax.twinx()
        rss = [x.rss_bytes / 2**20 for x in s]
        lines += mem.plot(t, rss, color="tab:purple", linewidth=1.2, label="process memory, RSS (MiB)")
        gpu = [(x.gpu_allocated_bytes or 0) / 2**20 for x in s]
        if any(x.gpu_allocated_bytes is not None for x in s):
            lines += mem.plot(t, gpu, color="tab:brown", linewidth=1.2, label="GPU memory allocated (MiB)")
        mem.set_ylabel("memory (MiB)")
        mem.set_ylim(0, 1.15 * max(rss + gpu + [1.0]))
    axes[-1, 0].set_xlabel("time since the run started (s)")
    fig.suptitle(title)
    fig.legend(lines, [ln.get_label() for ln in lines], loc="lower center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, 0.02))
    return _finish(fig, path, footer, bottom=0.08)


def throughput(path: Path, runs: dict[str, list[dict]], title: str, footer: str) -> Path:
    """Left: aggregate output tok/s against concurrent requests, one line per mode. Right: TTFT (solid) and
    inter-token latency (dashed) percentiles, p50 (circles) and p99 (triangles), ms on a log scale. `runs`
    maps a mode to its levels' dicts (`concurrency`, `tokens_per_s`, `ttft_p50_s`, ... as in
    ConcurrentRun.to_dict)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    levels = sorted({d["concurrency"] for ds in runs.values() for d in ds})
    for i, (mode, ds) in enumerate(runs.items()):
        xs = [d["concurrency"] for d in ds]
        left.plot(xs, [d["tokens_per_s"] for d in ds], marker="o", label=mode, color=f"C{i}")
        for key, name, style, marker in (("ttft_p50_s", "TTFT p50", "-", "o"), ("ttft_p99_s", "TTFT p99", "-", "^"),
                                         ("itl_p50_s", "ITL p50", "--", "o"), ("itl_p99_s", "ITL p99", "--", "^")):
            pts = [(d["concurrency"], d[key] * 1000) for d in ds if d[key]]
            if pts:
                right.plot(*zip(*pts, strict=True), linestyle=style, marker=marker, color=f"C{i}",
                           label=f"{mode}: {name}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
    left.set_ylabel("aggregate output tokens/s")
    left.set_title("throughput")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend()
    right.set_ylabel("latency (ms, log scale)")
    right.set_title("time to first token (TTFT) and inter-token latency (ITL)")
    right.set_yscale("log")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7, handlelength=3.5)
    fig.suptitle(title)
    return _finish(fig, path, footer)


def bars(path: Path, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str, title: str,
         footer: str, value_format: str = "{:,.1f}", log: bool = False) -> Path:
    """Grouped bars: one group per entry of `groups` (e.g. a length), one bar per series (e.g. a system) in
    each, its value written on it; a missing value (None) leaves a gap."""
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * n * len(groups) + 3), 5.5))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        vs = [v for v in values if v is not None]
        drawn = ax.bar(xs, vs, width, label=label, color=f"C{i}")
        ax.bar_label(drawn, labels=[value_format.format(v) for v in vs], fontsize=7, padding=2, rotation=90 if n > 4
                     else 0)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.margins(y=0.2)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _finish(fig, path, footer)


def lines(path: Path, series: dict[str, Series], xlabel: str, ylabel: str, title: str, footer: str,
          hline: tuple[float, str] | None = None) -> Path:
    """Plain lines against a shared x axis; `hline` draws a labelled reference level (value, label)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (label, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, label=label, color=f"C{i}", linewidth=1.2, marker="." if len(x) < 200 else None)
    if hline is not None:
        ax.axhline(hline[0], color="black", linestyle="--", linewidth=1, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path, footer)
