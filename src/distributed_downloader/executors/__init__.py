"""Ways to run the fetch workers: local processes (here), MPI ranks, Slurm jobs.

Every executor runs the same worker code (fetch/worker.py) and the same scheduler
(schedule.py); only the transport of their messages differs.
"""
