"""One worker's share of one server: pacing, open requests, pauses (Scrapy's "slot").

The scheduler decides the share (`rate`, `connections`, pauses, a dead server); the slot keeps
to it. Pacing spaces requests evenly (a token bucket holding one token: no bursts), so the requests
of K workers, each at rate/K, add up to at most the server's rate.
"""

from __future__ import annotations

import asyncio
import time

from distributed_downloader.errors import Failure

# Requests leave a little slower than the share allows: network jitter can bunch evenly paced
# requests together, and a server counting strictly per second would see one too many.
PACING_MARGIN = 1.05


class ServerDead(Exception):
    """The run gave up on this server; its remaining URLs become retryable errors."""


class ServerSlot:
    def __init__(self, name: str, rate: float, connections: int) -> None:
        self.name = name
        self.rate = rate
        self.connections = connections
        self.paused_until = 0.0  # wall-clock time (shared with other processes and nodes)
        self.dead = False
        self.give_up: Failure | None = None  # why, when dead (default: it kept failing)
        self.probing = False  # failing: new URLs first, one request at a time
        self.first_contact = False  # its rate still steps up: its requests go first for room
        self.open = 0
        self._next_send = 0.0  # monotonic
        self._last_send = -1e9  # monotonic
        self._changed = asyncio.Event()  # set (and replaced) whenever the share changes

    def update(self, rate: float, connections: int, paused_until: float, dead: bool,
               give_up: Failure | None = None, probing: bool = False,
               first_contact: bool = False) -> None:
        self.give_up = give_up
        if rate < self.rate:  # slower from the last request on, not from the next one
            self._next_send = max(self._next_send, self._last_send + PACING_MARGIN / rate)
        self.rate = rate
        self.connections = connections
        self.paused_until = max(self.paused_until, paused_until)
        self.dead = dead
        self.probing = probing
        self.first_contact = first_contact
        self._notify()

    def pause(self, seconds: float) -> float:
        """Pause at once (a pause the server asked for); returns when it ends."""
        self.paused_until = max(self.paused_until, time.time() + seconds)
        return self.paused_until

    def _notify(self) -> None:
        """Wake every waiter; later waiters wait on a fresh event."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def pace(self) -> None:
        """Wait for this share's next send time (and for any pause to end).

        Waiters sleep on the slot's condition, so a pause, a new rate or a dead server reaches
        them at once rather than after a sleep they committed to.
        """
        while not self.take_send_time():
            if self.dead:
                raise ServerDead(self.name)
            pause = self.paused_until - time.time()
            await self._wait_for_change(pause if pause > 0 else
                                        self._next_send - time.monotonic())

    def take_send_time(self) -> bool:
        """`pace` when it would not wait: False when the next send time has not come (or a
        pause runs, or the server is dead)."""
        now = time.monotonic()
        if self.dead or self.paused_until > time.time() or self._next_send > now:
            return False
        interval = PACING_MARGIN / self.rate
        # Keep to the schedule when a little late (so workers sharing a server keep the phases
        # the scheduler gave them); start afresh after an idle spell.
        base = self._next_send if now - self._next_send < interval else now
        self._last_send = now
        self._next_send = max(base + interval, now + 1.0 / self.rate)
        return True

    async def acquire(self) -> None:
        """Wait for a free connection of this share, then for the next send time."""
        while self.open >= self.connections:
            if self.dead:
                raise ServerDead(self.name)
            await self._wait_for_change(1.0)
        self.open += 1
        try:
            await self.pace()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.open -= 1
        self._notify()
