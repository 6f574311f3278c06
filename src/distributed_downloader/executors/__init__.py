"""Ways to run the fetch workers: local processes, MPI ranks, Slurm jobs.

Every executor runs the same worker code (fetch/worker.py), the same scheduler (schedule.py) and
the same coordinator loop (coordinator.py); only the transport of their messages differs. The
per-batch jobs (tools, verify) have one runner too (batches.py).

Stopping: SIGINT (Ctrl-C), SIGTERM (kill, scancel) or SIGUSR1 (Slurm's warning before the time
limit), to the coordinator alone or to the whole process group, at any moment. The coordinator
tells every worker to stop by message and hands out no more batches; the workers commit what
they finished and exit, or are killed when the grace period is over.
"""
