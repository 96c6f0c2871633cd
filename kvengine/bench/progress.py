"""Progress bars for benchmark runs, on stderr so stdout stays the tables and the final JSON line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

OnToken = Callable[[int], None]  # on_token(tokens done so far)
StartBar = Callable[[str, int], OnToken]  # start_bar(label, total tokens) -> on_token


@contextmanager
def progress_bars() -> Iterator[StartBar]:
    """`with progress_bars() as bar:` then `on_token = bar(label, total)`: one bar per run."""
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("tokens"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)

    def start(label: str, total: int) -> OnToken:
        task = progress.add_task(label, total=total)
        return lambda done: progress.update(task, completed=done)

    with progress:
        yield start
