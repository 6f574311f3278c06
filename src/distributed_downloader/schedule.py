"""Who fetches which batch, and how fast each server may be asked: one scheduler for the run.

A server's budget (requests/s and open connections) holds for the whole run: it is split among
the workers fetching that server at the moment, so their rates add up to the budget, never K
times it. Batches are handed out as workers ask, the longest remaining servers first, so one
slow server does not idle the others; a worker with room may hold many at once (many small
servers), up to an even share of the unfinished batches. What each server's budget is
(throttling, overload, the circuit breaker, advertised limits) and when it is given up is decided
in one place, policy.py; the scheduler applies it.

Pure logic: messages in, messages out. The executors carry them (processes, MPI ranks).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from distributed_downloader.config import Settings
from distributed_downloader.errors import Failure
from distributed_downloader.policy import SERVER_KEPT_FAILING, SERVER_OPTED_OUT, ServerPolicy
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    BatchRef,
    Budget,
    DiskFull,
    NoWorkYet,
    Report,
    ServerNews,
    Stop,
    WantWork,
    WorkerStopped,
)

Outgoing = list[tuple[int, object]]
__all__ = ["SERVER_KEPT_FAILING", "SERVER_OPTED_OUT", "Scheduler", "ServerState"]


@dataclass
class Wait:
    """Why a server with work left is not being asked (for the progress line and `status`)."""

    server: str
    reason: str
    seconds_left: float | None = None

    def __str__(self) -> str:
        left = "" if self.seconds_left is None else f" {self.seconds_left:.0f} s"
        return f"{self.server}: {self.reason}{left}"


@dataclass
class ServerState:
    """The scheduler's view of one server."""

    name: str
    policy: ServerPolicy
    connections: int
    pending: deque[BatchRef] = field(default_factory=deque)
    total_batches: int = 0
    remaining_rows: int = 0
    workers: set[int] = field(default_factory=set)
    dead: bool = False
    give_up: Failure = SERVER_KEPT_FAILING  # what the rows of a dead server become
    successes: int = 0
    errors: int = 0
    throttled: int = 0
    requests: int = 0  # answered, throttled or failed: what the server saw of this run
    latency_sum: float = 0.0
    latency_count: int = 0
    held: str | None = None  # why no batch of it may start yet (its robots.txt is unknown)
    held_until: float | None = None  # when it is asked for again, if known
    # When the next worker to join may send its first request: joiners start one interval
    # (1/rate) apart, so K workers at rate/K each interleave instead of sending together.
    next_start: float = 0.0

    @property
    def rate(self) -> float:
        return self.policy.rate

    @property
    def paused_until(self) -> float:
        return self.policy.pause_end()

    @property
    def remaining_seconds(self) -> float:
        return self.remaining_rows / self.rate

    @property
    def probing(self) -> bool:
        """After the breaker opened: one request at a time until one succeeds."""
        return self.policy.breaker.open

    def share(self) -> tuple[float, int]:
        count = max(1, len(self.workers))
        connections = 1 if self.probing else max(1, self.connections // count)
        return self.rate / count, connections

    def waiting(self, now: float) -> Wait | None:
        if self.dead or not (self.pending or self.workers):
            return None
        if self.held:
            left = None if self.held_until is None else self.held_until - now
            if left is None or left <= 0:
                return Wait(self.name, self.held)
            return Wait(self.name, f"{self.held}; asked again in", left)
        why = self.policy.waiting(now)
        return Wait(self.name, *why) if why else None


def workers_allowed(rules: dict[int, int], total_batches: int) -> int | None:
    """The original's schedule_rules: a server with more than KEY batches may get VALUE workers.

    No rules: no cap (the `min_worker_rate` floor still keeps slow servers to one worker).
    """
    if not rules:
        return None
    fitting = [rules[threshold] for threshold in sorted(rules) if total_batches > threshold]
    return max(1, fitting[-1]) if fitting else 1


class Scheduler:
    def __init__(self, servers: Iterable[ServerState], settings: Settings,
                 workers: Iterable[int], now: float) -> None:
        self.servers = {server.name: server for server in servers}
        self.settings = settings
        self.active_workers = set(workers)
        self.leases: dict[int, dict[tuple[str, int], BatchRef]] = {
            worker: {} for worker in self.active_workers
        }
        self.hungry: set[int] = set()
        self.unfinished = sum(len(s.pending) for s in self.servers.values())
        self.total_rows = sum(s.remaining_rows for s in self.servers.values())
        self.rows_done = 0
        # The run's progress, counted by batch: a finished batch by its committed rows; an
        # unfinished one by what its worker has (reported); rows a lost worker had are dropped,
        # since the batch is fetched again (a worker that stopped cleanly committed its rows).
        self.successes = 0
        self.errors = 0
        self.batch_counts: dict[tuple[str, int], tuple[int, int]] = {}  # running batches
        self.kept_counts: dict[tuple[str, int], tuple[int, int]] = {}  # of clean stops
        self.stopped_cleanly: set[int] = set()
        self.throttled = 0
        self.opt_outs_ignored = 0
        self.bytes = 0
        self.stopped = False  # every worker was told to stop: no batch is handed out any more
        self.disk_full: DiskFull | None = None  # the first write that found no room: run over
        self.worker_peak_rss_mib = 0.0

    @property
    def finished(self) -> bool:
        return self.unfinished == 0

    # --- messages ---------------------------------------------------------------------------

    def handle(self, message: object, now: float) -> Outgoing:
        if isinstance(message, WantWork):
            return self._want_work(message.worker, now)
        if isinstance(message, BatchFinished):
            return self._batch_finished(message, now)
        if isinstance(message, Report):
            return self._report(message, now)
        if isinstance(message, DiskFull):
            self.out_of_space(message)
            return self.stop()
        if isinstance(message, WorkerStopped):
            self.stopped_cleanly.add(message.worker)
            self.worker_peak_rss_mib = max(self.worker_peak_rss_mib, message.peak_rss_mib)
        return []

    def out_of_space(self, message: DiskFull) -> None:
        """No room for results: every worker is stopped (now, or by the next tick when the
        coordinator's own write failed) and no batch is handed out any more; rows not yet
        written are fetched by the next run."""
        if self.disk_full is None:
            self.disk_full = message

    def worker_lost(self, worker: int, now: float) -> Outgoing:
        """A worker died (or stopped): its batches go back to the front of their queues."""
        self.active_workers.discard(worker)
        self.hungry.discard(worker)
        out: Outgoing = []
        for batch in self.leases.pop(worker, {}).values():
            counts = self.batch_counts.pop(batch.key, (0, 0))
            if worker in self.stopped_cleanly:  # its rows are committed: not fetched again
                kept = self.kept_counts.get(batch.key, (0, 0))
                self.kept_counts[batch.key] = (kept[0] + counts[0], kept[1] + counts[1])
            else:
                self._count(-counts[0], -counts[1])
            server = self.servers[batch.server_name]
            server.pending.appendleft(batch)
            self._leave(server, worker)
            out += self._budgets(server)
        return out + self._feed_hungry(now)

    def stop(self) -> Outgoing:
        """A stop was asked for (a signal): tell every worker at once, and from now on hand out
        no batch, whatever asks for one (the unfinished ones are fetched on resume)."""
        if self.stopped:
            return []
        self.stopped = True
        self.hungry.clear()
        return [(worker, Stop()) for worker in sorted(self.active_workers)]

    def tick(self, now: float) -> Outgoing:
        if self.stopped:
            return []
        out: Outgoing = []
        for server in self.servers.values():
            if server.dead:
                continue
            if (reason := server.policy.give_up(now)) is not None:
                out += self._give_up(server, reason)
            elif server.policy.tick(now):
                out += self._budgets(server)
        out += self._feed_hungry(now)
        if self.finished or self.disk_full is not None:
            out += self.stop()
        return out

    # --- holds (robots.txt) ------------------------------------------------------------------

    def hold(self, name: str, reason: str, until: float | None = None) -> None:
        """No batch of this server starts until it is released (or left)."""
        server = self.servers[name]
        server.held, server.held_until = reason, until

    def release(self, name: str, rate_cap: float | None, last_request: float) -> None:
        """Let a held server go, at most at `rate_cap` requests/s; its first batch request
        keeps a full interval after `last_request` (robots.txt's)."""
        server = self.servers[name]
        server.held, server.held_until = None, None
        server.policy.control.set_cap("robots", rate_cap)
        server.next_start = max(server.next_start, last_request + 1.0 / server.rate)

    def give_up_held(self, name: str, reason: Failure) -> None:
        """A held server that will not be released this run: its rows become `reason` errors."""
        server = self.servers[name]
        server.held = None
        server.dead, server.give_up = True, reason

    # --- work -------------------------------------------------------------------------------

    def _can_join(self, server: ServerState, worker: int) -> bool:
        if server.dead or server.held or not server.pending or worker in server.workers:
            return False
        count = len(server.workers)
        if count == 0:
            return True
        allowed = workers_allowed(self.settings.cluster.schedule_rules, server.total_batches)
        if allowed is not None and count >= allowed:
            return False
        return server.rate / (count + 1) >= self.settings.cluster.min_worker_rate

    def _next_for(self, worker: int) -> tuple[ServerState, bool] | None:
        """The server whose batch this worker should take next, and whether to give it up."""
        for server in self.servers.values():
            if server.dead and server.pending:
                return server, True
        candidates = [s for s in self.servers.values() if self._can_join(s, worker)]
        if not candidates:
            return None
        # Servers nobody fetches come first, the longest remaining first (it bounds the run).
        best = max(candidates, key=lambda s: (not s.workers, s.remaining_seconds))
        return best, False

    def _fair_share(self) -> int:
        """Batches one worker may hold: the unfinished ones spread evenly over the workers.
        A worker with room takes on many small servers at once, but not the others' share."""
        return max(1, math.ceil(self.unfinished / max(1, len(self.active_workers))))

    def _assign(self, worker: int, now: float) -> Outgoing:
        if self.stopped or self.disk_full is not None:
            return []
        if len(self.leases[worker]) >= self._fair_share():
            return []
        choice = self._next_for(worker)
        if choice is None:
            return []
        server, give_up = choice
        batch = server.pending.popleft()
        self.leases[worker][batch.key] = batch
        out: Outgoing = []
        if not give_up:
            server.workers.add(worker)
            out += self._budgets(server)  # smaller shares for the others first
            start = max(now, server.paused_until, server.next_start)
            server.next_start = start + 1.0 / server.rate
            rate, connections = server.share()
            out.append((worker, Budget(server.name, rate, connections, start, False, None,
                                       first_contact=server.policy.first_contact)))
        return out + [(worker, Assign(batch, give_up=server.give_up if give_up else None))]

    def _want_work(self, worker: int, now: float) -> Outgoing:
        if worker not in self.active_workers or self.stopped:
            return []
        out = self._assign(worker, now)
        if out:
            self.hungry.discard(worker)
            return out
        self.hungry.add(worker)
        return [(worker, NoWorkYet())]

    def _feed_hungry(self, now: float) -> Outgoing:
        out: Outgoing = []
        for worker in sorted(self.hungry):
            assigned = self._assign(worker, now)
            if assigned:
                self.hungry.discard(worker)
                out += assigned
        return out

    def _batch_finished(self, message: BatchFinished, now: float) -> Outgoing:
        worker, batch = message.worker, message.batch
        if self.leases.get(worker, {}).pop(batch.key, None) is None:
            return []  # not (or no longer) this worker's: e.g. reassigned after it was lost
        self.unfinished -= 1
        self.rows_done += batch.rows
        counted = [self.batch_counts.pop(batch.key, (0, 0)),
                   self.kept_counts.pop(batch.key, (0, 0))]
        self._count(message.successes - sum(c[0] for c in counted),
                    message.errors - sum(c[1] for c in counted))
        server = self.servers[batch.server_name]
        server.remaining_rows -= batch.rows
        out: Outgoing = []
        if worker in server.workers:
            if server.pending and not server.dead and not self.stopped and \
                    self.disk_full is None:
                # Keep the worker on this server: its share stays, its connections stay warm.
                next_batch = server.pending.popleft()
                self.leases[worker][next_batch.key] = next_batch
                return [(worker, Assign(next_batch))]
            self._leave(server, worker)
            out += self._budgets(server)
        return out + self._feed_hungry(now)

    @staticmethod
    def _leave(server: ServerState, worker: int) -> None:
        server.workers.discard(worker)
        server.policy.breaker.streaks.pop(worker, None)  # its streak left with it

    # --- politeness ---------------------------------------------------------------------------

    def _budgets(self, server: ServerState) -> Outgoing:
        rate, connections = server.share()
        pause = server.paused_until
        return [
            # After a pause the workers resume one interval (1/rate) apart, as joiners start:
            # K workers at rate/K each then interleave instead of sending together.
            (worker, Budget(server.name, rate, connections,
                            pause + order / server.rate if pause else 0.0, server.dead,
                            server.give_up if server.dead else None, server.probing,
                            server.policy.first_contact))
            for order, worker in enumerate(sorted(server.workers))
        ]

    def _give_up(self, server: ServerState, reason: Failure) -> Outgoing:
        """The policy gave the server up: every worker on it writes its rows as `reason`."""
        server.dead, server.give_up = True, reason
        return self._budgets(server)

    def _count(self, successes: int, errors: int) -> None:
        self.successes += successes
        self.errors += errors

    def _report(self, report: Report, now: float) -> Outgoing:
        self.bytes += report.bytes
        leased = self.leases.get(report.worker, {})
        for key, (successes, errors) in report.batches.items():
            if key in leased:  # else finished, or no longer this worker's
                before = self.batch_counts.get(key, (0, 0))
                self.batch_counts[key] = (successes, errors)
                self._count(successes - before[0], errors - before[1])
        out: Outgoing = []
        for name, news in report.servers.items():
            server = self.servers.get(name)
            if server is None:
                continue
            self.throttled += news.throttled
            if self._apply_news(server, report.worker, news, now):
                out += self._budgets(server)
        return out

    def _apply_news(self, server: ServerState, worker: int, news: ServerNews, now: float) -> bool:
        """Update a server from one worker's news; True when its budget changed."""
        server.successes += news.successes
        server.errors += news.errors
        server.throttled += news.throttled
        server.requests += news.answered + news.throttled + news.failed
        server.latency_sum += news.latency_sum
        server.latency_count += news.latency_count
        self.opt_outs_ignored += news.opt_outs_ignored
        if server.dead:
            return False
        changed = server.policy.observe(worker, news, now)
        if (reason := server.policy.give_up(now)) is not None:
            server.dead, server.give_up = True, reason
            return True
        return changed

    # --- views ---------------------------------------------------------------------------------

    def busiest(self, count: int = 3) -> list[ServerState]:
        active = [s for s in self.servers.values() if s.workers or s.pending]
        return sorted(active, key=lambda s: -s.remaining_seconds)[:count]

    def waits(self, now: float) -> list[Wait]:
        """The servers with work left that are not being asked now, the largest first."""
        by_size = sorted(self.servers.values(), key=lambda s: -s.remaining_rows)
        return [wait for wait in (server.waiting(now) for server in by_size) if wait]

    @property
    def requests(self) -> int:
        return sum(server.requests for server in self.servers.values())
