"""Ways to run the fetch workers: local processes, MPI ranks, Slurm jobs.

Every executor runs the same worker code (fetch/worker.py), the same scheduler (schedule.py) and
the same coordinator loop (coordinator.py); only the transport of their messages differs. The
per-batch jobs (tools, verify) have one runner too (batches.py).

Stopping: SIGINT (Ctrl-C), SIGTERM (kill, scancel) or SIGUSR1 (Slurm's warning before the time
limit), to the coordinator alone or to the whole process group, at any moment. The coordinator
tells every worker to stop by message and hands out no more batches; the workers commit what
they finished and exit, or are killed when the grace period is over.
"""

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
