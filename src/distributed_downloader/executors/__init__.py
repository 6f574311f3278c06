"""Ways to run the fetch workers: local processes (here), MPI ranks, Slurm jobs.

Every executor runs the same worker code (fetch/worker.py) and the same scheduler
(schedule.py); only the transport of their messages differs.

Stopping: SIGINT (Ctrl-C), SIGTERM (kill, scancel) or SIGUSR1 (Slurm's warning before the time
limit), to the coordinator alone or to the whole process group, at any moment. The coordinator
tells every worker to stop by message and hands out no more batches; the workers commit what
they finished and exit, or are killed when the grace period is over.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def stop_on_signals() -> None:
    """The coordinator, first thing in fetch or download: a stop signal interrupts what it is
    doing (prep, profile, planning) as Ctrl-C does, until its executor takes the signals over
    to stop the workers cleanly."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.default_int_handler)
