"""Stop signals of a run's processes: SIGINT (Ctrl-C), SIGTERM (kill, scancel) and SIGUSR1
(Slurm's warning before the time limit). Here, below fetch and the executors, since both the
coordinator and each worker remember a stop from their first instruction on (see
executors/__init__.py for how a run stops)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_stops: list[int] = []  # stop signals remembered by remember_stop_signals


def stop_on_signals() -> None:
    """MPI rank 0 before prep and profile: a stop signal interrupts them as Ctrl-C does, instead
    of killing the rank and leaving the job to the launcher."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler)


def remember_stop_signals() -> None:
    """From the start of a fetch until its loop handles them, in the coordinator and in each
    worker: a stop signal is remembered (`stop_signalled`), not raised, and acted on when the
    executor or the worker's loop starts. Raised, it would surface from inside a DuckDB query or
    a Parquet read as that library's error, or kill a worker half-started. Also unblocks them:
    local workers are spawned with them blocked, so one sent meanwhile waits for this call."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, frame: _stops.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_signalled() -> bool:
    return bool(_stops)
