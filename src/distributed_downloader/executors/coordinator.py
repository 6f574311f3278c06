"""The coordinator's loop, written once for every executor: messages in to the scheduler, its
messages out, a tick, a stop on signal with its grace period, a lost worker's batches handed
back. Only the transport differs: pipes to local processes (local.py) or MPI ranks (mpi.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from distributed_downloader.stop_signals import STOP_SIGNALS, stop_signalled
from distributed_downloader.schedule import Scheduler

TICK_SECONDS = 0.1  # how often the scheduler ticks and the progress is drawn
log = logging.getLogger(__name__)


@dataclass
class Departure:
    """A worker that will send nothing more: it stopped, or its process ended."""

    worker: int
    exit_code: int | None = None  # the process's, when it ended


class Transport(Protocol):
    """How the coordinator reaches its workers."""

    def send(self, worker: int, message: object) -> None:
        """Deliver, or drop silently when the worker is gone."""

    def poll(self, timeout: float) -> tuple[list[object], list[Departure]]:
        """What arrived (messages first: a worker's last words come before its departure),
        waiting at most `timeout` seconds when nothing has."""

    def running(self) -> bool:
        """Whether a worker may still send something."""

    def abandon(self) -> None:
        """The grace period is over: stop waiting for the workers that did not stop."""


class StopRequest:
    """Set by a stop signal, or by one remembered before the coordinator took them over."""

    def __init__(self) -> None:
        self.asked = False

    def __call__(self, signum: int, frame: object) -> None:
        self.asked = True


@contextmanager
def relayed_stop_signals() -> Iterator[StopRequest]:
    """From here on a stop signal is the coordinator's to relay to its workers (entered before
    the first worker exists); the handlers before are restored at the end."""
    request = StopRequest()
    previous = {signum: signal.signal(signum, request) for signum in STOP_SIGNALS}
    request.asked = request.asked or stop_signalled()  # one came while fetch planned
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Coordinator:
    """Runs the scheduler over a transport until every worker is gone."""

    def __init__(self, scheduler: Scheduler, transport: Transport,
                 on_tick: Callable[[Scheduler], None], stop: StopRequest,
                 grace: float) -> None:
        self.scheduler = scheduler
        self.transport = transport
        self.on_tick = on_tick
        self.stop = stop
        self.grace = grace
        self.stop_deadline: float | None = None
        self.next_tick = 0.0
        self.died = False  # a worker ended without saying it stopped

    def run(self) -> bool:
        """Carry messages until no worker may send any more; True when interrupted."""
        while self.transport.running():
            self._relay_stop()
            messages, departures = self.transport.poll(
                max(0.0, self.next_tick - time.monotonic()))
            now = time.time()
            for message in messages:
                self._send(self.scheduler.handle(message, now))
            for departure in departures:
                self._hand_back(departure, now)
            self._tick()
            self._end_grace()
            self._check_someone_works()
        return self.stop.asked or not self.scheduler.finished

    def _send(self, outgoing: list[tuple[int, object]]) -> None:
        for worker, message in outgoing:
            self.transport.send(worker, message)

    def _relay_stop(self) -> None:
        """Once, at the first stop signal: every worker is told (even one still starting
        reads it), no batch is handed out from now on, and the grace period starts."""
        if self.stop.asked and self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.grace
            self._send(self.scheduler.stop())

    def _hand_back(self, departure: Departure, now: float) -> None:
        """A worker gone: its batches go back to the queues, for the others."""
        worker = departure.worker
        if worker not in self.scheduler.active_workers:
            return
        if worker not in self.scheduler.stopped_cleanly:
            self.died = True
            if not self.stop.asked:
                log.warning("worker %s exited (code %s); its batches go to others",
                            worker, departure.exit_code)
        self._send(self.scheduler.worker_lost(worker, now))

    def _tick(self) -> None:
        if time.monotonic() < self.next_tick:
            return
        self.next_tick = time.monotonic() + TICK_SECONDS
        if not self.stop.asked:
            self._send(self.scheduler.tick(time.time()))
        self.on_tick(self.scheduler)

    def _end_grace(self) -> None:
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            log.warning("workers did not stop in %.0f s", self.grace)
            self.transport.abandon()
            self.stop_deadline = float("inf")  # abandoned once

    def _check_someone_works(self) -> None:
        """Work left, no stop asked, and the last worker died: nothing would ever finish it."""
        scheduler = self.scheduler
        if self.died and not scheduler.active_workers and not scheduler.finished and \
                not self.stop.asked and scheduler.disk_full is None:
            raise RuntimeError("every worker died; see the log above")
