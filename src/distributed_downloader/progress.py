"""Fetch progress: a Rich bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

from distributed_downloader.schedule import Scheduler

LOG_EVERY_SECONDS = 10.0  # a progress line in a log (no terminal): often enough to watch
RATE_WINDOW_SECONDS = 30.0  # the rate shown: steady through bursts, current within a minute
BAR_WIDTH = 16  # narrow: count, rate and ETA must fit an 80-column terminal beside it


class FetchProgress:
    """Rows done over the whole run (what earlier runs wrote included), images/s, ETA, and
    why the run is slowed; the last column is cut short before the numbers are."""

    def __init__(self, console: Console, total_rows: int, done_before: int = 0) -> None:
        self.console = console
        self.total = total_rows
        self.done_before = done_before
        self.started = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque()
        self.last_log = 0.0
        self.last_line = ""
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]fetch"), BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}",
                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=console, transient=False, expand=True,
            )
            self.task = self.bar.add_task("fetch", total=total_rows, completed=done_before,
                                          speed="", detail="")
            self.bar.start()

    def images_per_second(self, stored: int) -> float:
        now = time.monotonic()
        self.samples.append((now, stored))
        while self.samples and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()
        first_time, first_stored = self.samples[0]
        return (stored - first_stored) / (now - first_time) if now > first_time else 0.0

    def __call__(self, scheduler: Scheduler) -> None:
        done = min(self.total, self.done_before + scheduler.successes + scheduler.errors)
        speed = self.images_per_second(scheduler.successes)
        waits = scheduler.waits(time.time())
        if waits:  # say why the run is slowed: the largest server waited on, and how many
            more = f" (+{len(waits) - 1} more)" if len(waits) > 1 else ""
            detail = f"waiting: {waits[0]}{more}"
        else:
            detail = ", ".join(f"{s.name} {s.rate:.3g}/s" for s in scheduler.busiest(3))
        detail = f"errors {scheduler.errors:,} · 429s {scheduler.throttled:,} · {detail}"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, speed=f"{speed:.1f} img/s", detail=detail)
        else:
            share = done / self.total * 100 if self.total else 100.0
            self.last_line = f"fetch: {done:,}/{self.total:,} ({share:.1f}%) {speed:.1f} img/s, " \
                f"{detail}"
            if time.monotonic() - self.last_log >= LOG_EVERY_SECONDS:
                self.last_log = time.monotonic()
                self.console.print(self.last_line, soft_wrap=True, highlight=False)
                self.last_line = ""

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.last_line:  # where the run ended, even between two log lines
            self.console.print(self.last_line, soft_wrap=True, highlight=False)
