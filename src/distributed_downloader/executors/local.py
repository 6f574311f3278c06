"""The local executor: worker processes on this machine, talking to the scheduler over pipes.

A stop signal is handled from before the first worker is spawned: the workers start with the
stop signals blocked (they inherit the mask) and take them over as their first instruction, and
the coordinator relays the stop over each pipe, so a worker still importing when it comes stops
as soon as it listens, and no batch is handed out after it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from distributed_downloader.config import Settings
from distributed_downloader.executors import STOP_SIGNALS, remember_stop_signals, stop_signalled
from distributed_downloader.protocol import WorkerStopped
from distributed_downloader.schedule import Scheduler

LOOP_SECONDS = 0.1


class PipeChannel:
    """The worker's end of its pipe, read from the worker's event loop."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def send(self, message: object) -> None:
        self.connection.send(message)

    def listen(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None],
               closed: Callable[[], None]) -> None:
        fd = self.connection.fileno()

        def readable() -> None:
            try:
                while self.connection.poll():
                    deliver(self.connection.recv())
            except (EOFError, OSError):
                loop.remove_reader(fd)
                closed()  # the scheduler is gone: stop cleanly

        loop.add_reader(fd, readable)


def _worker_entry(worker_id: int, settings: Settings, connection: Connection) -> None:
    remember_stop_signals()  # one sent while this process started is delivered here
    from distributed_downloader.fetch.worker import run_worker

    logging.basicConfig(level=settings.cluster.log_level, format="%(asctime)s %(message)s")

    run_worker(worker_id, settings, PipeChannel(connection))


class LocalExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = 0
        self.stop_requested = False

    def worker_ids(self, limit: int) -> list[int]:
        """One worker per core by default, never more than there are batches to fetch."""
        self.count = max(1, min(self.settings.cluster.workers or os.cpu_count() or 1, limit))
        return list(range(self.count))

    def close(self) -> None:
        pass  # run() already waited for its processes

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _spawn(self, processes: dict[int, multiprocessing.Process],
               pipes: dict[int, Connection]) -> None:
        """Start the workers with the stop signals blocked: each inherits the mask and takes the
        signals over as its first instruction (remember_stop_signals), so a signal sent to the
        process group while a worker starts is neither lost nor fatal to it."""
        context = multiprocessing.get_context("spawn")
        # Started before blocking: starting it unblocks the stop signals.
        multiprocessing.resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for worker in range(self.count):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_worker_entry, name=f"fetch-worker-{worker}",
                                          args=(worker, self.settings, child_end))
                process.start()
                child_end.close()
                processes[worker], pipes[worker] = process, parent_end
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came runs now

    def run(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None]) -> bool:
        """Run the workers until the scheduler is done; True when interrupted."""
        # Before any worker exists: from here on a stop signal is ours to relay.
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        self.stop_requested = self.stop_requested or stop_signalled()  # while fetch planned
        processes: dict[int, multiprocessing.Process] = {}
        pipes: dict[int, Connection] = {}
        try:
            self._spawn(processes, pipes)
            return self._serve(scheduler, on_tick, processes, pipes)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for process in processes.values():
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)

    def _serve(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None],
               processes: dict[int, multiprocessing.Process],
               pipes: dict[int, Connection]) -> bool:
        """Carry messages until every worker is gone; True when interrupted."""
        connections = {pipe: worker for worker, pipe in pipes.items()}
        stopped_cleanly: set[int] = set()
        stop_deadline = None

        def send(outgoing: list[tuple[int, object]]) -> None:
            for worker, message in outgoing:
                if worker in pipes and processes[worker].is_alive():
                    try:
                        pipes[worker].send(message)
                    except (OSError, BrokenPipeError):
                        pass

        while any(process.is_alive() for process in processes.values()) or \
                any(conn.poll() for conn in connections):
            if self.stop_requested and stop_deadline is None:
                stop_deadline = time.monotonic() + self.settings.cluster.stop_grace
                send(scheduler.stop())  # read even by a worker still starting
            sentinels = {p.sentinel: w for w, p in processes.items()}
            ready = multiprocessing.connection.wait(
                list(connections) + list(sentinels), timeout=LOOP_SECONDS)
            now = time.time()
            # Pipes first: a worker's last words (its final report, WorkerStopped) before its
            # exit is handled, so that the rows it committed stay counted.
            for item in sorted(ready, key=lambda item: item in sentinels):
                if item in connections:
                    worker = connections[item]
                    try:
                        while item.poll():
                            message = item.recv()
                            if isinstance(message, WorkerStopped):
                                stopped_cleanly.add(worker)
                            send(scheduler.handle(message, now))
                    except (EOFError, OSError):
                        del connections[item]
                elif item in sentinels:
                    worker = sentinels[item]
                    if worker in scheduler.active_workers:
                        if worker not in stopped_cleanly and not self.stop_requested:
                            logging.getLogger(__name__).warning(
                                "worker %s exited (code %s); its batches go to others",
                                worker, processes[worker].exitcode)
                        send(scheduler.worker_lost(worker, now))
            if not self.stop_requested:
                send(scheduler.tick(now))
            on_tick(scheduler)
            if stop_deadline and time.monotonic() > stop_deadline:
                for process in processes.values():
                    process.kill()
            if not scheduler.active_workers and not scheduler.finished and \
                    not self.stop_requested and scheduler.disk_full is None:
                raise RuntimeError("every worker died; see the log above")
        return self.stop_requested or not scheduler.finished
