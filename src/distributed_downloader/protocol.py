"""What the scheduler and the workers tell each other (the same messages locally and over MPI).

Workers ask for work and report what they saw per server; the scheduler hands out batches and
each server's share of the rate budget. Messages are small picklable values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distributed_downloader.errors import Failure


@dataclass(frozen=True)
class BatchRef:
    server_name: str
    partition_id: int
    rows: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.server_name, self.partition_id)


# --- worker -> scheduler --------------------------------------------------------------------


@dataclass
class WantWork:
    worker: int


@dataclass
class BatchFinished:
    worker: int
    batch: BatchRef
    successes: int
    errors: int


@dataclass
class ServerNews:
    """What one worker saw of one server since its last report (policy.py judges it)."""

    successes: int = 0  # rows stored
    errors: int = 0  # rows given up on
    answered: int = 0  # answers that show the server works (any but throttles and failures)
    throttled: int = 0  # "slow down": 429, or 503 with Retry-After
    failed: int = 0  # URL failures: 5xx without Retry-After, timeouts, resets
    failed_urls: int = 0  # of which at a URL's first attempt (what overload is judged on)
    retry_after_until: float = 0.0  # the latest pause the server asked for (wall clock)
    failures: int = 0  # different URLs failed in a row (no good answer between), at report
    advertised: float | None = None  # requests/s in the latest RateLimit-Policy seen
    latency_sum: float = 0.0
    latency_count: int = 0
    # The quickest answer: a floor that sporadic slow URLs do not move, but a server queueing
    # our requests does (policy.py climbs above the default rate only while it stays low).
    latency_min: float = math.inf
    opted_out: int = 0  # images whose X-Robots-Tag opted out
    opt_in: int = 0  # images without such a header
    opt_outs_ignored: int = 0  # opted out, stored anyway (--ignore-opt-out)


@dataclass
class Report:
    worker: int
    servers: dict[str, ServerNews] = field(default_factory=dict)
    bytes: int = 0
    urgent: bool = False  # sent at once: a throttle, failures in a row, an opt-out
    # Batch key -> (successes, errors) this worker has for it so far, written or not: the
    # run's progress counts rows by batch, so rows a lost worker had are not counted twice.
    batches: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)


@dataclass
class DiskFull:
    """A write failed for want of space: the scheduler stops every worker, and the run ends
    with one line naming the folder. `worker` is None when the coordinator's own write failed."""

    worker: int | None
    folder: str
    needed: int  # bytes of the write that failed
    free: int | None = None
    rows: int = 0  # rows of results in that write (0: not a chunk)


@dataclass
class WorkerStopped:
    worker: int
    interrupted: bool  # stopped by a signal before its work was done
    peak_rss_mib: float = 0.0


# --- scheduler -> worker --------------------------------------------------------------------


@dataclass
class Assign:
    batch: BatchRef
    give_up: Failure | None = None  # set: write every remaining row as this error, no request


@dataclass
class Budget:
    """A worker's share of a server's budget."""

    server_name: str
    rate: float
    connections: int
    paused_until: float = 0.0
    dead: bool = False
    give_up: Failure | None = None  # with dead: what the server's remaining rows become
    probing: bool = False  # the server keeps failing: one request at a time, new URLs first
    # The server's rate still steps up from its first contact: its few requests go ahead of
    # the others' for room (fetch/worker.py), since its answers are what raise its pace.
    first_contact: bool = False


@dataclass
class NoWorkYet:
    pass


@dataclass
class Stop:
    pass
