"""The local executor: worker processes on this machine, talking to the scheduler over pipes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from distributed_downloader.config import Settings
from distributed_downloader.protocol import WorkerStopped
from distributed_downloader.schedule import Scheduler

LOOP_SECONDS = 0.1
STOP_GRACE_SECONDS = 60.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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
    for signum in STOP_SIGNALS:  # until the worker's loop installs its own handlers
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(message)s")
    from distributed_downloader.fetch.worker import run_worker

    run_worker(worker_id, settings, PipeChannel(connection))


class LocalExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = 0
        self.stop_requested = False

    def worker_ids(self, limit: int) -> list[int]:
        """One worker per core by default, never more than there are batches to fetch."""
        self.count = max(1, min(self.settings.workers or os.cpu_count() or 1, limit))
        return list(range(self.count))

    def close(self) -> None:
        pass  # run() already waited for its processes

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def run(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None]) -> bool:
        """Run the workers until the scheduler is done; True when interrupted."""
        context = multiprocessing.get_context("spawn")
        connections: dict[Connection, int] = {}
        processes: dict[int, multiprocessing.Process] = {}
        for worker in range(self.count):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_entry, name=f"fetch-worker-{worker}",
                                      args=(worker, self.settings, child_end))
            process.start()
            child_end.close()
            connections[parent_end] = worker
            processes[worker] = process
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        pipes = {worker: conn for conn, worker in connections.items()}
        stopped_cleanly: set[int] = set()
        forwarded = False
        stop_deadline = None

        def send(outgoing: list[tuple[int, object]]) -> None:
            for worker, message in outgoing:
                if worker in pipes and processes[worker].is_alive():
                    try:
                        pipes[worker].send(message)
                    except (OSError, BrokenPipeError):
                        pass

        try:
            while any(process.is_alive() for process in processes.values()) or \
                    any(conn.poll() for conn in connections):
                if self.stop_requested and not forwarded:
                    forwarded = True
                    stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
                    for process in processes.values():
                        if process.is_alive() and process.pid:
                            os.kill(process.pid, signal.SIGTERM)
                sentinels = {p.sentinel: w for w, p in processes.items()}
                ready = multiprocessing.connection.wait(
                    list(connections) + list(sentinels), timeout=LOOP_SECONDS)
                now = time.time()
                for item in ready:
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
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for process in processes.values():
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
        return self.stop_requested or not scheduler.finished
