"""A benchmark's results folder: `report.md`, `result.json` and the PNG plots, the tables printed to
stdout, and one JSON summary as the very last stdout line.

Layout: `<out>/report.md` (machine, settings, tables, notes, plots inline), `<out>/result.json`
(`bench`, `created`, `machine`, `params`, `results`, `summary`, `files`), `<out>/*.png`. The default
folder is `results/<bench>-<YYYYmmdd-HHMMSS>/` under the current directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table as RichTable

from kvengine.bench.machine import MachineInfo, machine_info

NOISE_NOTE = ("Timings depend on the machine and on what else runs on it; compare ratios taken in one run, "
              "not numbers across machines.")


def default_out_dir(bench: str, root: str | Path = "results") -> Path:
    return Path(root) / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_report(bench: str, title: str, out: Path | None, params: dict[str, Any]) -> Report:
    """A Report writing to `out`, or to results/<bench>-<timestamp>/ when `out` is None."""
    return Report(bench, title, out if out is not None else default_out_dir(bench), params)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def num(x: float | None, digits: int = 2) -> str:
    """A table cell for a float (``-`` for missing or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def gflop(flops: float) -> str:
    """FLOPs in GFLOP: whole numbers from 100 up, else three significant digits (tiny test models)."""
    value = flops / 1e9
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(slots=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "| " + " | ".join("---" for _ in self.headers) + " |"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_rich(self) -> RichTable:
        t = RichTable(title=self.title, title_justify="left")
        for h in self.headers:
            t.add_column(h)
        for row in self.rows:
            t.add_row(*(str(c) for c in row))
        return t


@dataclass(slots=True)
class Report:
    """What one bench run produced; `finish()` writes the folder and prints the tables and the last line."""

    bench: str
    title: str
    out_dir: Path
    params: dict[str, Any]
    machine: MachineInfo = field(default_factory=machine_info)
    intro: list[str] = field(default_factory=list)  # Markdown paragraphs before the tables
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # Markdown bullet lines after the tables
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name in out_dir, caption)
    results: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def plot_path(self, name: str, caption: str) -> Path:
        """Register a plot; returns where to save it."""
        self.plots.append((name, caption))
        return self.out_dir / name

    def to_markdown(self) -> str:
        parts = [f"# {self.title}", "", f"Run {self.created} with kvengine {self.machine.kvengine_version}.", ""]
        parts += ["## Machine", "", f"- {self.machine.describe()}"]
        if self.machine.cpu_flags:
            parts.append(f"- CPU flags: {', '.join(self.machine.cpu_flags)}")
        parts += ["", "## Settings", ""]
        parts += [f"- {k}: `{v}`" for k, v in self.params.items()]
        parts.append("")
        for para in self.intro:
            parts += [para, ""]
        parts += ["## Results", ""]
        for table in self.tables:
            parts += [table.to_markdown(), ""]
        if self.notes:
            parts += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [f"- {NOISE_NOTE}", ""]
        if self.plots:
            parts += ["## Plots", ""]
            for name, caption in self.plots:
                parts += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "created": self.created, "machine": self.machine.to_dict(),
                "params": self.params, "results": self.results, "summary": self.final_summary(),
                "files": self.files()}

    def files(self) -> list[str]:
        return ["report.md", "result.json", *(name for name, _ in self.plots)]

    def final_summary(self) -> dict[str, Any]:
        return {"bench": self.bench, **self.summary, "machine": self.machine.describe(),
                "out_dir": str(self.out_dir)}

    def write(self) -> None:
        (self.out_dir / "report.md").write_text(self.to_markdown())
        (self.out_dir / "result.json").write_text(json.dumps(self.to_json(), indent=1, default=_jsonable))

    def finish(self, stdout: TextIO | None = None) -> dict[str, Any]:
        """Write the folder, print the tables and notes, and end stdout with one JSON line."""
        self.write()
        out = stdout or sys.stdout
        console = Console(file=out, width=160)
        console.print(f"[bold]{self.title}[/bold]  ({self.machine.describe()})")
        for table in self.tables:
            console.print(table.to_rich())
        for note in self.notes:
            console.print(f"- {note}", markup=False)
        console.print(f"report: {self.out_dir / 'report.md'}", markup=False)
        out.flush()
        summary = self.final_summary()
        print(json.dumps(summary, default=_jsonable), file=out, flush=True)
        return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
