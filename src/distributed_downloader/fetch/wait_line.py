"""Coroutines waiting for room, woken one at a time in the order they came.

An asyncio.Event wakes every waiter: with 240 servers in flight, each freed place in a worker's
budgets woke up to ~1,500 coroutines, nearly all of which found no room and waited again (a
fifth of a busy event loop). A wait line wakes one waiter per freed place; whoever takes room
passes the turn on while room remains, and one that finds none steps back to the front.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WaitLine:
    """Waiters in order; `wake_one` resolves the first. A woken waiter counts as waiting until it
    runs (`len`), so that nobody takes its place in between."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._woken = 0  # woken, not yet running

    def __len__(self) -> int:
        return len(self._waiters) + self._woken

    @property
    def asleep(self) -> int:
        """Waiters not yet woken."""
        return len(self._waiters)

    async def wait(self, front: bool = False) -> None:
        """Until woken; `front`: ahead of the others (a woken waiter that found no room).

        Cancelled, it raises: the caller passes on a wake it may have been given."""
        waiter = asyncio.get_running_loop().create_future()
        if front:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() and waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        finally:
            if waiter.done() and not waiter.cancelled():
                self._woken -= 1

    def wake_one(self) -> bool:
        """Wake the first waiter; False when none sleeps."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)
                self._woken += 1
                return True
        return False
