"""A batch's rows still to request: new ones in order, failed ones again once their retry is due.

A failed URL waits for its retry here, not in a request slot, so a server's bad minute costs
its other URLs nothing: they go on at the server's pace while the failed one waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

# Waiters look again at least this often: a server given up (or probed) changes what they
# may take even when no row comes back.
RECHECK_SECONDS = 1.0


class ServerView(Protocol):
    dead: bool
    probing: bool


@dataclass
class Pending:
    """A row and what happened to it so far."""

    row: dict[str, Any]
    attempts: int = 0  # requests made (the `retry_count` column)
    failures: int = 0  # of which failed (5xx, timeout, reset): what `max_retries` counts
    throttles: int = 0  # of which were told to slow down (429)


@dataclass
class Frontier:
    fresh: list[Pending]
    later: list[tuple[float, int, Pending]] = field(default_factory=list)  # (due, order, row)
    taken: int = 0  # handed out, not yet done or put back
    _order: itertools.count = field(default_factory=itertools.count)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def of(cls, rows: list[dict[str, Any]]) -> Frontier:
        return cls([Pending(row) for row in reversed(rows)])  # popped from the end

    def __len__(self) -> int:
        return len(self.fresh) + len(self.later) + self.taken

    async def take(self, server: ServerView) -> Pending | None:
        """The next row to request: a due retry first, else a new row; None when none is left.

        While the server is probed after failures, new rows go first, so that each probe tries
        another URL; once the server is given up, every waiting row is handed out at once (to
        be written as given up).
        """
        while True:
            now = time.monotonic()
            due = bool(self.later) and (server.dead or self.later[0][0] <= now)
            if self.fresh and not (due and not server.probing):
                return self._hand_out(self.fresh.pop())
            if due:
                return self._hand_out(heapq.heappop(self.later)[2])
            if not self.later and not self.taken:
                return None
            wait = RECHECK_SECONDS if not self.later else \
                min(RECHECK_SECONDS, self.later[0][0] - now)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                pass

    def retry_later(self, item: Pending, delay: float) -> None:
        heapq.heappush(self.later, (time.monotonic() + delay, next(self._order), item))
        self.taken -= 1
        self._changed.set()

    def done(self) -> None:
        self.taken -= 1
        self._changed.set()

    def _hand_out(self, item: Pending) -> Pending:
        self.taken += 1
        return item
