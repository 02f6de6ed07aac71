"""Progress the CLI shows: rich's live bar on a terminal, a plain line every few seconds anywhere else.

A live bar redraws one line in place, which a pipe, a log file or `nohup` cannot show: there it printed nothing
until the summary. `LineProgress` takes the calls the CLI makes on a `rich.progress.Progress` (`add_task`,
`update`, `advance`) and prints ``label: done/total unit (fields), rate/s, time left`` every ``INTERVAL_S``
seconds at most; the command's summary line ends it.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

INTERVAL_S = 5.0


def duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``: a time left, to the precision that matters for it."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class LineProgress:
    """`rich.progress.Progress`'s calls, shown as plain lines on ``console`` (one task at a time)."""

    def __init__(self, label: str, console: Console, unit: str = "", interval: float | None = None):
        self.label, self.console, self.unit = label, console, f" {unit}" if unit else ""
        self.interval = INTERVAL_S if interval is None else interval
        self.total, self.completed, self.fields = 0.0, 0.0, {}
        self.start = self.last = time.monotonic()

    def __enter__(self) -> "LineProgress":
        self.start = self.last = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        pass  # the command's own summary line follows

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self.total, self.fields = float(total or 0), dict(fields)
        return 0

    def update(self, task: int, completed: float | None = None, advance: float | None = None, **fields) -> None:
        if completed is not None:
            self.completed = float(completed)
        if advance is not None:
            self.completed += advance
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.line()

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def line(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.completed / elapsed
        total = int(self.total) if self.total else "?"
        text = f"{self.label}: {int(self.completed)}/{total}{self.unit}"
        if extra := ", ".join(str(v) for v in self.fields.values()):
            text += f" ({extra})"
        text += f", {rate:.3g}{self.unit}/s" if rate else ""
        if rate and self.total > self.completed:
            text += f", {duration((self.total - self.completed) / rate)} left"
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


def progress(label: str, console: Console, unit: str = "", fields: bool = False) -> Progress | LineProgress:
    """A live bar when ``console`` is a terminal, else `LineProgress`. ``fields``: the bar shows the task's
    ``files`` field (as `decode` and `encode` count files beside image-steps)."""
    if not console.is_terminal:
        return LineProgress(label, console, unit)
    counts = (TextColumn("{task.fields[files]}"),) if fields else (MofNCompleteColumn(),)
    return Progress(TextColumn(label), BarColumn(), *counts, TimeElapsedColumn(), TextColumn("left"),
                    TimeRemainingColumn(), console=console, transient=True)
