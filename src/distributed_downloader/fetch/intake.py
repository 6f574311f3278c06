"""When a worker takes on another batch: before its cores would run short, not after.

A server nothing is known of is asked slowly at first (policy.py: `first_contact_rate`, stepping
up once per report), so a batch taken on now yields images at full speed only seconds later. A
worker that took on batches only once a decode thread ran idle started each wave of small
servers on idle cores, seconds of warm-up apiece (240 servers of ~21 images took 1.2× the time of
4 large ones). So it also takes one on while the rows it holds would keep it busy for less than
that warm-up: the newcomers' careful start overlaps the others' full speed. Their pace is the
scheduler's as before; only the moment they are taken on moves. Pure bookkeeping, clock passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class RowsPerSecond:
    """Rows a worker finished per second over the last `window` seconds (fewer seconds at the
    start count as the whole window: an estimate that starts low asks for less, not more)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._finished: deque[tuple[float, int]] = deque()  # (when, rows)
        self._total = 0

    def add(self, now: float, rows: int = 1) -> None:
        self._finished.append((now, rows))
        self._total += rows

    def rate(self, now: float) -> float:
        while self._finished and now - self._finished[0][0] > self.window:
            self._total -= self._finished.popleft()[1]
        return self._total / self.window


@dataclass(frozen=True)
class Intake:
    """A worker's rule for asking the scheduler for another batch."""

    decode_threads: int
    max_batches: int  # batches_per_worker
    max_rows: int  # rows of the batches in flight (a first batch goes whatever its size)
    lead_seconds: float  # how long a first-contacted server takes to reach its full rate

    def wants_more(self, batches: int, rows_in_flight: int, rows_left: int, decoding: int,
                   rows_per_second: float) -> bool:
        """Another batch, under the caps, while a decode thread is idle (the cores have room
        now) or while the rows not yet finished would last less than `lead_seconds` at the
        rate the worker finishes rows (they would run short before a newcomer is warm)."""
        if not batches:
            return True
        if batches >= self.max_batches or rows_in_flight >= self.max_rows:
            return False
        return decoding < self.decode_threads or \
            rows_left < self.lead_seconds * rows_per_second
