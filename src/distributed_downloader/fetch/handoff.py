"""Results of thread-pool work handed back to the event loop, many per wake-up.

`loop.run_in_executor` wakes the loop once per finished call (a write to its self-pipe, then a
loop iteration). A worker's decode threads finish hundreds of images a second, so here the
threads queue what they finished and only the first of a run of finishes wakes the loop, which
then delivers every result queued by then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")
Finished = tuple["asyncio.Future[Any]", Any, BaseException | None]


class ResultHandoff:
    """Runs calls in a pool and delivers their results to the loop that asked, in batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished: list[Finished] = []
        self._wake_pending = False  # a delivery is scheduled on the loop and has not run yet
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, pool: Executor, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in the pool; cancelling the wait withdraws it if it has not started."""
        self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = self._loop.create_future()
        work = pool.submit(self._call, waiter, call, args)
        waiter.add_done_callback(lambda done: _withdraw(done, work))
        return await waiter

    def _call(self, waiter: asyncio.Future, call: Callable[..., Any], args: tuple) -> None:
        """In a pool thread: run, queue the outcome, wake the loop unless a wake is pending."""
        try:
            outcome: Finished = (waiter, call(*args), None)
        except BaseException as exc:  # handed to the waiter, as run_in_executor does
            outcome = (waiter, None, exc)
        with self._lock:
            self._finished.append(outcome)
            if self._wake_pending:
                return
            self._wake_pending = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    def _deliver(self) -> None:
        """On the loop: hand every queued outcome to its waiter."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        for waiter, result, error in finished:
            if waiter.done():  # cancelled while it ran
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)


def _withdraw(waiter: asyncio.Future, work: Future) -> None:
    if waiter.cancelled():
        work.cancel()
