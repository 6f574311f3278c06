"""Fetch progress: a Rich bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distributed_downloader.schedule import Scheduler

LOG_EVERY_SECONDS = 10.0
RATE_WINDOW_SECONDS = 30.0


class FetchProgress:
    def __init__(self, console: Console, total_rows: int) -> None:
        self.console = console
        self.total = total_rows
        self.started = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque()
        self.last_log = 0.0
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]fetch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}"), console=console, transient=False,
            )
            self.task = self.bar.add_task("fetch", total=total_rows, speed="", detail="")
            self.bar.start()

    def images_per_second(self, done: int) -> float:
        now = time.monotonic()
        self.samples.append((now, done))
        while self.samples and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()
        first_time, first_done = self.samples[0]
        return (done - first_done) / (now - first_time) if now > first_time else 0.0

    def __call__(self, scheduler: Scheduler) -> None:
        done = scheduler.successes + scheduler.errors
        speed = self.images_per_second(done)
        waits = scheduler.waits(time.time())
        if waits:  # say why the run is slowed: the largest server waited on, and how many
            more = f" (+{len(waits) - 1} more)" if len(waits) > 1 else ""
            detail = f"waiting: {waits[0]}{more}"
        else:
            detail = ", ".join(f"{s.name} {s.rate:.3g}/s" for s in scheduler.busiest(3))
        detail = f"errors {scheduler.errors:,} · 429s {scheduler.throttled:,} · {detail}"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, speed=f"{speed:.1f} img/s", detail=detail)
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = time.monotonic()
            share = done / self.total * 100 if self.total else 100.0
            self.console.print(f"fetch: {done:,}/{self.total:,} ({share:.1f}%) {speed:.1f} img/s, "
                               f"{detail}", soft_wrap=True, highlight=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
