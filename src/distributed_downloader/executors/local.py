"""The local executor: worker processes on this machine, talking to the scheduler over pipes.

Workers are forked from a server process that imports what they need once, started with the
executor so that it imports while the coordinator plans and asks for robots.txt: the workers
are then ready within milliseconds of being started, instead of each spending ~0.5 s of CPU
importing (on a busy machine, >1 s after robots.txt, when their first requests were due), and
they end without the interpreter's teardown (~0.3 s).

A stop signal is handled from before the first worker starts: the workers start with the stop
signals blocked (the server keeps the mask it was started with, and each worker inherits it)
and take them over as their first instruction, and the coordinator relays the stop over each
pipe, so a worker still starting when it comes stops as soon as it listens, and no batch is
handed out after it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection

from distributed_downloader.config import Settings
from distributed_downloader.stop_signals import STOP_SIGNALS, remember_stop_signals
from distributed_downloader.executors.coordinator import (
    Coordinator,
    Departure,
    relayed_stop_signals,
)
from distributed_downloader.schedule import Scheduler

# Imported once by the server the workers are forked from: everything a worker runs.
WORKER_MODULES = ["distributed_downloader.fetch.worker"]


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


def start_worker_server() -> None:
    """Start the server the workers are forked from (it imports WORKER_MODULES in the
    background) with the stop signals blocked: it keeps them blocked and ignores SIGINT, so a
    stop signal to the process group is the coordinator's to relay, and every worker forked
    from it starts with them blocked. It ends when its last client (this process, a worker)
    does."""
    # Started before blocking: starting it unblocks the stop signals.
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.set_forkserver_preload(WORKER_MODULES)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stop_worker_server() -> None:
    """End the server once its workers have ended, and wait for it: its workers' CPU time
    reaches this process's accounts through it, and a long-lived caller (tests) gets a fresh
    one, with its environment, for the next run."""
    multiprocessing.forkserver._forkserver._stop()  # no public way to stop it but exiting


def _worker_entry(worker_id: int, settings: Settings, connection: Connection) -> None:
    remember_stop_signals()  # one sent while this process started is delivered here
    from distributed_downloader.fetch.worker import run_worker

    logging.basicConfig(level=settings.cluster.log_level, format="%(asctime)s %(message)s")

    run_worker(worker_id, settings, PipeChannel(connection))


class PipeTransport:
    """The coordinator's side: one pipe and one process per worker."""

    def __init__(self, processes: dict[int, multiprocessing.Process],
                 pipes: dict[int, Connection]) -> None:
        self.processes = processes
        self.pipes = pipes
        self.connections = {pipe: worker for worker, pipe in pipes.items()}
        self.departed: set[int] = set()  # processes whose end was reported

    def send(self, worker: int, message: object) -> None:
        if worker in self.pipes and self.processes[worker].is_alive():
            try:
                self.pipes[worker].send(message)
            except (OSError, BrokenPipeError):
                pass

    def running(self) -> bool:
        return any(process.is_alive() for process in self.processes.values()) or \
            any(connection.poll() for connection in self.connections)

    def poll(self, timeout: float) -> tuple[list[object], list[Departure]]:
        sentinels = {process.sentinel: worker for worker, process in self.processes.items()
                     if worker not in self.departed}
        ready = multiprocessing.connection.wait(list(self.connections) + list(sentinels),
                                                timeout=timeout)
        messages: list[object] = []
        for connection in ready:
            if connection in self.connections:
                messages += self._drain(connection)
        ended = [sentinels[item] for item in ready if item in sentinels]
        self.departed.update(ended)
        return messages, [Departure(worker, self.processes[worker].exitcode) for worker in ended]

    def _drain(self, connection: Connection) -> list[object]:
        messages = []
        try:
            while connection.poll():
                messages.append(connection.recv())
        except (EOFError, OSError):
            del self.connections[connection]
        return messages

    def abandon(self) -> None:
        for process in self.processes.values():
            process.kill()


class LocalExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = 0
        start_worker_server()  # its imports go on while the coordinator plans

    def worker_ids(self, limit: int) -> list[int]:
        """One worker per core by default, never more than there are batches to fetch."""
        self.count = max(1, min(self.settings.cluster.workers or os.cpu_count() or 1, limit))
        return list(range(self.count))

    def close(self) -> None:
        stop_worker_server()  # run() already waited for the workers

    def _spawn(self, processes: dict[int, multiprocessing.Process],
               pipes: dict[int, Connection]) -> None:
        """Start the workers with the stop signals blocked: each inherits the mask and takes the
        signals over as its first instruction (remember_stop_signals), so a signal sent to the
        process group while a worker starts is neither lost nor fatal to it."""
        context = multiprocessing.get_context("forkserver")
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
        processes: dict[int, multiprocessing.Process] = {}
        pipes: dict[int, Connection] = {}
        # Before any worker exists: from here on a stop signal is ours to relay.
        with relayed_stop_signals() as stop:
            try:
                self._spawn(processes, pipes)
                transport = PipeTransport(processes, pipes)
                return Coordinator(scheduler, transport, on_tick, stop,
                                   self.settings.cluster.stop_grace).run()
            finally:
                _join(processes)


def _join(processes: dict[int, multiprocessing.Process]) -> None:
    """Wait for every worker a while, and kill one that does not end."""
    for process in processes.values():
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
