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
import sys
import time
from collections.abc import Callable
from typing import Any

from distributed_downloader.config import Settings
from distributed_downloader.errors import UserError
from distributed_downloader.stop_signals import (
    remember_stop_signals,
    stop_on_signals,
    stop_signalled,
)
from distributed_downloader.executors.coordinator import (
    Coordinator,
    Departure,
    relayed_stop_signals,
)
from distributed_downloader.protocol import Stop, WorkerStopped
from distributed_downloader.schedule import Scheduler

SCHEDULER_RANK = 0
POLL_SECONDS = 0.005  # rank 0, idle: how long to sleep between two polls
WORKER_POLL_SECONDS = 0.02
log = logging.getLogger(__name__)


def world() -> Any:
    """MPI's world communicator; a clear error when mpi4py or an MPI library is missing."""
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


class RankTransport:
    """Rank 0's side: one MPI rank per worker. A rank is gone once it said it stopped (it lives
    on, to be sent home); a rank that dies ends the whole job (`mpirun` does so)."""

    def __init__(self, comm: Any, worker_ranks: list[int]) -> None:
        self.comm = comm
        self.worker_ranks = worker_ranks
        self.stopped: set[int] = set()
        self.abandoned = False

    def send(self, worker: int, message: object) -> None:
        if worker not in self.stopped:
            self.comm.send(message, dest=worker)

    def running(self) -> bool:
        return not self.abandoned and len(self.stopped) < len(self.worker_ranks)

    def poll(self, timeout: float) -> tuple[list[object], list[Departure]]:
        """What arrived; when nothing has, a short sleep (a blocking receive spins a core)."""
        messages: list[object] = []
        while self.comm.iprobe():
            messages.append(self.comm.recv())
        if not messages:
            time.sleep(min(POLL_SECONDS, timeout))
        stopped = [message.worker for message in messages if isinstance(message, WorkerStopped)]
        self.stopped.update(stopped)
        return messages, [Departure(rank) for rank in stopped]

    def abandon(self) -> None:
        self.abandoned = True  # close() ends the job if they still do not stop


class MpiExecutor:
    """Rank 0's side: carries messages between the scheduler and the worker ranks."""

    def __init__(self, comm: Any, settings: Settings) -> None:
        self.comm = comm
        self.settings = settings
        self.worker_ranks = list(range(1, comm.Get_size()))
        if not self.worker_ranks:
            raise UserError("--executor mpi needs at least 2 ranks (rank 0 schedules), "
                            "e.g. `mpirun -n 3 distributed-downloader fetch OUT --executor mpi`")
        self.transport = RankTransport(comm, self.worker_ranks)
        # Under Slurm the whole stop must fit in the warning before the time limit.
        self.grace = min(settings.cluster.stop_grace,
                         max(5.0, settings.cluster.stop_margin - 10.0))
        for rank in self.worker_ranks:
            comm.send(settings, dest=rank)

    def worker_ids(self, limit: int) -> list[int]:
        return self.worker_ranks

    def run(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None]) -> bool:
        """Run until every worker rank stopped; True when interrupted before the end."""
        with relayed_stop_signals() as stop:
            return Coordinator(scheduler, self.transport, on_tick, stop, self.grace).run()

    def close(self) -> None:
        """Tell every rank still running to stop, and wait for them a while; a rank that does
        not answer in time ends the job (its committed chunks stay)."""
        transport = self.transport
        for rank in self.worker_ranks:
            transport.send(rank, Stop())
        deadline = time.monotonic() + self.grace
        while len(transport.stopped) < len(self.worker_ranks):
            if time.monotonic() > deadline:
                log.warning("ranks %s did not stop; ending the job",
                            sorted(set(self.worker_ranks) - transport.stopped))
                self.comm.Abort(1)
            transport.poll(POLL_SECONDS)


# --- sending ranks home ------------------------------------------------------------------


def release_task_ranks() -> None:
    """Send every other rank home: task ranks, and fetching ranks still waiting for their
    settings."""
    comm = world()
    for rank in range(1, comm.Get_size()):
        comm.send(None, dest=rank)
