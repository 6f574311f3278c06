"""One batch runner for every per-batch job (the tools, verify): a function over a list of
batches, on local processes or on MPI ranks, the results in the order of the batches.

Each worker is handed a batch as it becomes free; after a failure no batch is handed out any
more, and the first failure is raised once the running batches are back.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from distributed_downloader.executors.mpi import (
    POLL_SECONDS,
    SCHEDULER_RANK,
    WORKER_POLL_SECONDS,
    world,
)

# A batch back from a worker: (its index, its result, its failure); index None: a worker that
# only says it is free.
Returned = tuple[int | None, Any, BaseException | None]


class Workers(Protocol):
    """Where the batches run."""

    def free(self) -> bool:
        """Whether a worker can take a batch now."""

    def busy(self) -> bool:
        """Whether a batch is running."""

    def start(self, index: int, function: Callable[..., Any], args: tuple) -> None: ...

    def wait(self) -> Returned:
        """The next batch back (or a worker free), waiting for it."""


def run_batches(function: Callable[..., Any], arguments: list[tuple],
                workers: int | None = None, executor: str = "local") -> list[Any]:
    """`function(*args)` for each args, on `workers` local processes (default: one per core) or
    on the MPI ranks other than 0 (`executor` "mpi"); the results in the order of `arguments`."""
    if not arguments:
        return []
    if executor == "mpi":
        comm = world()
        if comm.Get_size() == 1:
            return [function(*args) for args in arguments]
        return farm_out(function, arguments, RankWorkers(comm))
    size = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=size) as pool:
        return farm_out(function, arguments, ProcessWorkers(pool, size))


def farm_out(function: Callable[..., Any], arguments: list[tuple],
             workers: Workers) -> list[Any]:
    results: list[Any] = [None] * len(arguments)
    pending = deque(enumerate(arguments))
    failure: BaseException | None = None
    while workers.busy() or (pending and failure is None):
        while pending and failure is None and workers.free():
            index, args = pending.popleft()
            workers.start(index, function, args)
        index, value, error = workers.wait()
        if error is not None:
            failure = failure or error
        elif index is not None:
            results[index] = value
    if failure is not None:
        raise failure
    return results


class ProcessWorkers:
    """A pool of local processes."""

    def __init__(self, pool: ProcessPoolExecutor, size: int) -> None:
        self.pool = pool
        self.size = size
        self.running: dict[Future, int] = {}

    def free(self) -> bool:
        return len(self.running) < self.size

    def busy(self) -> bool:
        return bool(self.running)

    def start(self, index: int, function: Callable[..., Any], args: tuple) -> None:
        self.running[self.pool.submit(function, *args)] = index

    def wait(self) -> Returned:
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        future = done.pop()
        index = self.running.pop(future)
        error = future.exception()
        return index, None if error else future.result(), error


class RankWorkers:
    """The MPI ranks other than 0, each serving batches (`serve_batches`) until sent home
    (mpi.release_task_ranks). A rank says it is free when it starts and with each result."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.idle: list[int] = []
        self.running: set[int] = set()

    def free(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.running)

    def start(self, index: int, function: Callable[..., Any], args: tuple) -> None:
        rank = self.idle.pop()
        self.comm.send((index, function, args), dest=rank)
        self.running.add(rank)

    def wait(self) -> Returned:
        while not self.comm.iprobe():
            time.sleep(POLL_SECONDS)
        rank, reply = self.comm.recv()
        self.running.discard(rank)
        self.idle.append(rank)
        if reply is None:
            return None, None, None
        index, ok, value = reply
        if ok:
            return index, value, None
        return index, None, RuntimeError(f"a task failed on a worker rank: {value}")


def serve_batches(comm: Any) -> None:
    """A rank other than 0: run what rank 0 sends until it sends None."""
    comm.send((comm.Get_rank(), None), dest=SCHEDULER_RANK)
    while True:
        while not comm.iprobe(source=SCHEDULER_RANK):
            time.sleep(WORKER_POLL_SECONDS)
        task = comm.recv(source=SCHEDULER_RANK)
        if task is None:
            return
        index, function, args = task
        try:
            reply = (index, True, function(*args))
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which stops the run
            reply = (index, False, f"{type(exc).__name__}: {exc}")
        comm.send((comm.Get_rank(), reply), dest=SCHEDULER_RANK)
