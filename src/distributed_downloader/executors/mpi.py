"""The MPI executor: under `mpirun` or `srun`, rank 0 schedules and every other rank fetches.

The worker code and the messages are those of the local executor; only the carrier changes.
Rank 0 sends its effective settings to every rank first, so all ranks work on the same run
whatever each one's environment. Both sides poll with `iprobe` and sleep between polls: a
blocking MPI receive spins a core, and here the cores belong to the decoders (and, while rank 0
prepares the input, to prep). Rank 0 alone holds the run folder's lock (runlock.py) for every
rank; refused it, it sends None instead of the settings, and every rank ends cleanly.

When a rank dies, `mpirun` ends the whole job; what the ranks committed stays, and the next run
resumes from it (each batch's chunks are written by the rank that fetched it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from distributed_downloader.config import Settings
from distributed_downloader.executors import STOP_SIGNALS, remember_stop_signals, stop_signalled
from distributed_downloader.protocol import Stop, WorkerStopped
from distributed_downloader.schedule import Scheduler

SCHEDULER_RANK = 0
POLL_SECONDS = 0.005  # rank 0, idle: how long to sleep between two polls
WORKER_POLL_SECONDS = 0.02
log = logging.getLogger(__name__)


def world() -> Any:
    """MPI's world communicator; a clear error when mpi4py or an MPI library is missing."""
    from distributed_downloader.errors import UserError

    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise UserError(f"--executor mpi needs mpi4py and an MPI library ({exc}); "
                        "install them with `bash scripts/setup-cluster.sh`") from None
    return MPI.COMM_WORLD


def abort_world(code: int) -> None:
    """End every rank (a rank-0 error would otherwise leave the others waiting forever)."""
    comm = world()
    if comm.Get_size() > 1:
        comm.Abort(code)


class MpiChannel:
    """A worker rank's line to rank 0, polled from the worker's event loop."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def send(self, message: object) -> None:
        self.comm.send(message, dest=SCHEDULER_RANK)

    def listen(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None],
               closed: Callable[[], None]) -> None:
        def poll() -> None:
            while self.comm.iprobe(source=SCHEDULER_RANK):
                deliver(self.comm.recv(source=SCHEDULER_RANK))
            loop.call_later(WORKER_POLL_SECONDS, poll)

        loop.call_soon(poll)


def start(on_error: list[Callable[[int], None]]) -> None:
    """First thing under --executor mpi: every rank but 0 becomes a worker here (and the
    process exits when rank 0 says so); on rank 0, any error from now on ends every rank
    (`abort_world` joins `on_error`). Done once per process."""
    import sys

    from distributed_downloader.executors import stop_on_signals

    if abort_world in on_error:
        return  # already started (download, then its fetch)
    comm = world()
    on_error.append(abort_world)
    if comm.Get_rank() != SCHEDULER_RANK:
        interrupted = run_worker_rank(comm)
        sys.exit(130 if interrupted else 0)
    stop_on_signals()


def run_worker_rank(comm: Any) -> bool:
    """A fetching rank: take the run's settings from rank 0, then work until told to stop."""
    from distributed_downloader.fetch.worker import run_worker

    remember_stop_signals()  # until the worker's loop has its own handlers: a stop is not a crash
    while not comm.iprobe(source=SCHEDULER_RANK):  # rank 0 may still be preparing
        if stop_signalled():
            return True
        time.sleep(WORKER_POLL_SECONDS)
    settings: Settings | None = comm.recv(source=SCHEDULER_RANK)
    if settings is None:  # rank 0 will not fetch (another command holds the run folder)
        return False
    logging.basicConfig(level=settings.cluster.log_level,
                        format=f"%(asctime)s rank {comm.Get_rank()}: %(message)s")
    return run_worker(comm.Get_rank(), settings, MpiChannel(comm))


class MpiExecutor:
    """Rank 0's side: carries messages between the scheduler and the worker ranks."""

    def __init__(self, comm: Any, settings: Settings) -> None:
        self.comm = comm
        self.settings = settings
        self.worker_ranks = list(range(1, comm.Get_size()))
        if not self.worker_ranks:
            from distributed_downloader.errors import UserError

            raise UserError("--executor mpi needs at least 2 ranks (rank 0 schedules), "
                            "e.g. `mpirun -n 3 distributed-downloader fetch OUT --executor mpi`")
        self.stop_requested = False
        self.stopped: set[int] = set()
        # Under Slurm the whole stop must fit in the warning before the time limit.
        self.grace = min(settings.cluster.stop_grace, max(5.0, settings.cluster.stop_margin - 10.0))
        for rank in self.worker_ranks:
            comm.send(settings, dest=rank)

    def worker_ids(self, limit: int) -> list[int]:
        return self.worker_ranks

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _send(self, outgoing: list[tuple[int, object]]) -> None:
        for rank, message in outgoing:
            if rank not in self.stopped:
                self.comm.send(message, dest=rank)

    def run(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None]) -> bool:
        """Run until every worker rank stopped; True when interrupted before the end."""
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        self.stop_requested = self.stop_requested or stop_signalled()  # while fetch planned
        stop_sent = False
        deadline = None
        last_tick = 0.0
        try:
            while len(self.stopped) < len(self.worker_ranks):
                if self.stop_requested and not stop_sent:
                    stop_sent = True
                    deadline = time.monotonic() + self.grace
                    self._send(scheduler.stop())  # and no batch is handed out from now on
                busy = False
                while self.comm.iprobe():
                    busy = True
                    message = self.comm.recv()
                    self._send(scheduler.handle(message, time.time()))
                    if isinstance(message, WorkerStopped):
                        self.stopped.add(message.worker)
                        self._send(scheduler.worker_lost(message.worker, time.time()))
                now = time.monotonic()
                if now - last_tick >= 0.1:
                    last_tick = now
                    if not self.stop_requested:
                        self._send(scheduler.tick(time.time()))
                    on_tick(scheduler)
                if deadline and now > deadline:
                    log.warning("worker ranks did not stop in %.0f s", self.grace)
                    break
                if not busy:
                    time.sleep(POLL_SECONDS)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.stop_requested or not scheduler.finished

    def close(self) -> None:
        """Tell every rank still running to stop, and wait for them a while; a rank that does
        not answer in time ends the job (its committed chunks stay)."""
        self._send([(rank, Stop()) for rank in self.worker_ranks])
        deadline = time.monotonic() + self.grace
        while len(self.stopped) < len(self.worker_ranks):
            if time.monotonic() > deadline:
                log.warning("ranks %s did not stop; ending the job",
                            sorted(set(self.worker_ranks) - self.stopped))
                self.comm.Abort(1)
            if self.comm.iprobe():
                message = self.comm.recv()
                if isinstance(message, WorkerStopped):
                    self.stopped.add(message.worker)
            else:
                time.sleep(POLL_SECONDS)


# --- a task farm, for the post-processing tools ------------------------------------------------


def run_tasks(function: Callable[..., Any], arguments: list[tuple]) -> list[Any]:
    """Rank 0: run `function(*args)` for each args on the other ranks, as each becomes free;
    the results in the order of `arguments`. The ranks serve until `release_task_ranks`."""
    comm = world()
    if comm.Get_size() == 1:
        return [function(*args) for args in arguments]
    results: list[Any] = [None] * len(arguments)
    pending = list(enumerate(arguments))[::-1]
    busy: set[int] = set()
    failure = None
    while pending or busy:
        if not comm.iprobe():
            time.sleep(POLL_SECONDS)
            continue
        rank, reply = comm.recv()
        busy.discard(rank)
        if reply is not None:
            index, ok, value = reply
            if ok:
                results[index] = value
            else:
                failure = failure or value
        if pending and failure is None:
            index, args = pending.pop()
            comm.send((index, function, args), dest=rank)
            busy.add(rank)
    if failure is not None:
        raise RuntimeError(f"a task failed on a worker rank: {failure}")
    return results


def serve_tasks(comm: Any) -> None:
    """A worker rank: run what rank 0 sends until it sends None."""
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


def release_task_ranks() -> None:
    """Send every other rank home: task ranks, and fetching ranks still waiting for their
    settings."""
    comm = world()
    for rank in range(1, comm.Get_size()):
        comm.send(None, dest=rank)
