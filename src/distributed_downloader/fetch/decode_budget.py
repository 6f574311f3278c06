"""A worker's budget of decoded pixels: the bytes its decode threads may hold at once.

Compressed bodies are small; decoded pixels are not (a 350 KB PNG scan can decode to 300 MB).
What an image will hold is known from its header before any pixel exists (images.open_image),
so it is reserved here first and released when the image is stored. Bookkeeping only: no I/O,
no clock; a waiting reservation's `granted` event is set when its turn comes.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Reservation:
    """One image's claim on the budget; it may be decoded once `granted` is set."""

    __slots__ = ("amount", "granted")

    def __init__(self, amount: int) -> None:
        self.amount = amount
        self.granted = asyncio.Event()


class DecodeBudget:
    """Bytes of decoded pixels a worker holds at once.

    First come, first served: a reservation waits while an earlier one waits, so a large image
    is never overtaken for ever by small ones. One larger than the whole budget is granted
    alone, once nothing else is held, so nothing deadlocks. Invariant: `used <= limit`, unless
    the one reservation held is larger than the limit by itself.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.held = 0  # granted reservations not yet released
        self._waiting: deque[Reservation] = deque()

    def reserve(self, amount: int) -> Reservation:
        """Ask for `amount` bytes: granted at once when it fits and nobody waits before it."""
        reservation = Reservation(amount)
        self._waiting.append(reservation)
        self._grant()
        return reservation

    def release(self, reservation: Reservation) -> None:
        """Give back a granted reservation, or withdraw one still waiting."""
        if reservation.granted.is_set():
            self.used -= reservation.amount
            self.held -= 1
        else:
            self._waiting.remove(reservation)
        self._grant()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _grant(self) -> None:
        while self._waiting and (
                not self.held or self.used + self._waiting[0].amount <= self.limit):
            reservation = self._waiting.popleft()
            self.used += reservation.amount
            self.held += 1
            reservation.granted.set()
