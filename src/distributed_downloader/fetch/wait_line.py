"""Coroutines waiting for room, woken one at a time in the order they came.

An asyncio.Event wakes every waiter: with 240 servers in flight, each freed place in a worker's
budgets woke up to ~1,500 coroutines, nearly all of which found no room and waited again (a
fifth of a busy event loop). A wait line wakes one waiter per freed place; whoever takes room
passes the turn on while room remains, and one that finds none steps back to the front.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class WaitLine:
    """Waiters in order; `wake_one` resolves the first. `len` counts a woken waiter until it
    runs: a user that checks it keeps newcomers behind (BodyBudget); `Gate` does not, and lets
    a newcomer that finds room through, as an Event would."""

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


class Gate:
    """Coroutines held while `has_room()` is false, let through one at a time: each freed place
    (`room_freed`) wakes the first; one that goes through passes the turn on while room
    remains, one that finds none waits again at the front and wakes nobody. The decode
    backlog's gate, where an Event woke every consumer at each decoded image only for nearly
    all to wait again (README, many servers). While there is room, as many go through as an
    Event would let through, one per turn of the loop."""

    def __init__(self, has_room: Callable[[], bool]) -> None:
        self.has_room = has_room
        self.line = WaitLine()

    async def enter(self) -> None:
        """Return once `has_room()`; cancelled, pass on a wake this waiter may hold."""
        front = False
        while not self.has_room():
            try:
                await self.line.wait(front)
            except asyncio.CancelledError:
                self.line.wake_one()  # a spare wake finds no room and goes back: harmless
                raise
            front = True
        self.line.wake_one()  # room was there as it went through: the next waiter tries

    def room_freed(self) -> None:
        self.line.wake_one()
