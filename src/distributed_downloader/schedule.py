"""Who fetches which batch, and how fast each server may be asked: one scheduler for the run.

A server's budget (requests/s and open connections) holds for the whole run: it is split among
the workers fetching that server at the moment, so their rates add up to the budget, never K
times it. Batches are handed out as workers ask, the longest remaining servers first, so one
slow server does not idle the others. Throttling (429/503, Retry-After) lowers a server's budget
at once (multiplicative decrease, additive increase, as TCP does); a server that keeps failing is
paused with growing back-off (circuit breaker) and, after `server_down_after`, given up.

Pure logic: messages in, messages out. The executors carry them (processes, MPI ranks).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from distributed_downloader.config import Settings
from distributed_downloader.errors import ErrorCode
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    BatchRef,
    Budget,
    GiveUp,
    NoWorkYet,
    Report,
    ServerNews,
    Stop,
    WantWork,
    WorkerStopped,
)

DECREASE_FACTOR = 0.5
DECREASE_COOLDOWN = 1.0  # seconds: one burst of 429s seen by several workers halves once
INCREASE_INTERVAL = 5.0  # seconds without throttling before each additive increase
INCREASE_STEP_SHARE = 0.1  # of max_rate
SLOW_START_FACTOR = 1.5  # growth per step while below a known-safe ceiling
MIN_RATE = 0.05  # requests/s: even a very touchy server keeps being asked, slowly
# A server's ceiling is the rate believed safe: 90% of a rate that drew a 429/503, or a rate a
# profile vouches for. Growth stops there, and only probes past it after a long quiet spell,
# since each probe costs a 429 and a server's limit rarely moves.
CEILING_SHARE = 0.9
CEILING_PROBE_INTERVAL = 300.0
BREAKER_THRESHOLD = 5  # server failures in a row that open the breaker
BREAKER_MAX_PAUSE = 60.0

Outgoing = list[tuple[int, object]]
SERVER_KEPT_FAILING = GiveUp(ErrorCode.SERVER_UNAVAILABLE,
                             "server kept failing; gave up on it for this run")
SERVER_OPTED_OUT = GiveUp(ErrorCode.OPTED_OUT_SERVER,
                          "every answer of the server opted out (X-Robots-Tag); not asked again")


@dataclass
class ServerState:
    """The scheduler's view of one server."""

    name: str
    rate: float
    max_rate: float
    connections: int
    pending: deque[BatchRef] = field(default_factory=deque)
    total_batches: int = 0
    remaining_rows: int = 0
    workers: set[int] = field(default_factory=set)
    paused_until: float = 0.0
    dead: bool = False
    give_up: GiveUp = SERVER_KEPT_FAILING  # what the rows of a dead server become
    last_decrease: float = -math.inf
    last_throttle: float = -math.inf
    last_increase: float = 0.0
    ceiling: float | None = None  # the highest rate believed safe (see CEILING_SHARE)
    # The ceiling is a limit the server advertised (or a person set), not one a 429 taught:
    # the rate may climb to it fast. Off at the first throttle.
    ceiling_advertised: bool = False
    successes: int = 0
    errors: int = 0
    throttled: int = 0
    failures: dict[int, int] = field(default_factory=dict)  # worker -> failures in a row
    failing_since: float | None = None
    breaker_opens: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    opted_out: int = 0
    opt_in: int = 0
    held: str | None = None  # why no batch of it may start yet (its robots.txt is unknown)
    # When the next worker to join may send its first request: joiners start one interval
    # (1/rate) apart, so K workers at rate/K each interleave instead of sending together.
    next_start: float = 0.0

    @property
    def remaining_seconds(self) -> float:
        return self.remaining_rows / self.rate

    @property
    def probing(self) -> bool:
        """After the breaker opened: one request at a time until one succeeds."""
        return self.breaker_opens > 0

    def share(self) -> tuple[float, int]:
        count = max(1, len(self.workers))
        connections = 1 if self.probing else max(1, self.connections // count)
        return self.rate / count, connections


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
        self.successes = 0
        self.errors = 0
        self.throttled = 0
        self.opt_outs_ignored = 0
        self.bytes = 0
        self.stopped = False
        self.worker_peak_rss_mib = 0.0
        for server in self.servers.values():
            server.last_increase = now

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
        if isinstance(message, WorkerStopped):
            self.worker_peak_rss_mib = max(self.worker_peak_rss_mib, message.peak_rss_mib)
        return []

    def worker_lost(self, worker: int, now: float) -> Outgoing:
        """A worker died: its batches go back to the front of their queues."""
        self.active_workers.discard(worker)
        self.hungry.discard(worker)
        out: Outgoing = []
        for batch in self.leases.pop(worker, {}).values():
            server = self.servers[batch.server_name]
            server.pending.appendleft(batch)
            server.workers.discard(worker)
            out += self._budgets(server)
        return out + self._feed_hungry(now)

    def tick(self, now: float) -> Outgoing:
        out: Outgoing = []
        for server in self.servers.values():
            if server.dead:
                continue
            if server.failing_since is not None and \
                    now - server.failing_since >= self.settings.server_down_after:
                out += self._give_up(server)
                continue
            quiet = min(now - server.last_throttle, now - server.last_increase)
            if server.workers and quiet >= INCREASE_INTERVAL and not server.probing:
                limit = server.max_rate
                if server.ceiling is not None and \
                        now - server.last_throttle < CEILING_PROBE_INTERVAL:
                    limit = min(limit, server.ceiling)
                if server.rate < limit:
                    step = server.max_rate * INCREASE_STEP_SHARE
                    if server.ceiling_advertised and server.rate < (server.ceiling or 0):
                        # Below a limit known to be safe: climb fast (TCP's slow start).
                        step = max(step, server.rate * (SLOW_START_FACTOR - 1))
                    server.rate = min(limit, server.rate + step)
                    server.last_increase = now
                    out += self._budgets(server)
        out += self._feed_hungry(now)
        if self.finished and not self.stopped:
            self.stopped = True
            out += [(worker, Stop()) for worker in sorted(self.active_workers)]
        return out

    # --- holds (robots.txt) ------------------------------------------------------------------

    def hold(self, name: str, reason: str) -> None:
        """No batch of this server starts until it is released (or left)."""
        self.servers[name].held = reason

    def release(self, name: str, rate_cap: float | None, last_request: float) -> None:
        """Let a held server go, at most at `rate_cap` requests/s; its first batch request
        keeps a full interval after `last_request` (robots.txt's)."""
        server = self.servers[name]
        server.held = None
        if rate_cap is not None:
            server.max_rate = min(server.max_rate, rate_cap)
            server.rate = min(server.rate, server.max_rate)
            if server.ceiling is not None:
                server.ceiling = min(server.ceiling, server.max_rate)
        server.next_start = max(server.next_start, last_request + 1.0 / server.rate)

    def give_up_held(self, name: str, reason: GiveUp) -> None:
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
        allowed = workers_allowed(self.settings.schedule_rules, server.total_batches)
        if allowed is not None and count >= allowed:
            return False
        return server.rate / (count + 1) >= self.settings.min_worker_rate

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

    def _assign(self, worker: int, now: float) -> Outgoing:
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
            out.append((worker, Budget(server.name, rate, connections, start, False, None)))
        return out + [(worker, Assign(batch, give_up=server.give_up if give_up else None))]

    def _want_work(self, worker: int, now: float) -> Outgoing:
        if worker not in self.active_workers:
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
        server = self.servers[batch.server_name]
        server.remaining_rows -= batch.rows
        out: Outgoing = []
        if worker in server.workers:
            if server.pending and not server.dead:
                # Keep the worker on this server: its share stays, its connections stay warm.
                next_batch = server.pending.popleft()
                self.leases[worker][next_batch.key] = next_batch
                return [(worker, Assign(next_batch))]
            server.workers.discard(worker)
            out += self._budgets(server)
        return out + self._feed_hungry(now)

    # --- politeness ---------------------------------------------------------------------------

    def _budgets(self, server: ServerState) -> Outgoing:
        rate, connections = server.share()
        return [
            (worker, Budget(server.name, rate, connections, server.paused_until, server.dead,
                            server.give_up if server.dead else None))
            for worker in sorted(server.workers)
        ]

    def _give_up(self, server: ServerState) -> Outgoing:
        server.dead = True
        out = self._budgets(server)
        return out

    def _report(self, report: Report, now: float) -> Outgoing:
        self.bytes += report.bytes
        out: Outgoing = []
        for name, news in report.servers.items():
            server = self.servers.get(name)
            if server is None:
                continue
            self.successes += news.successes
            self.errors += news.errors
            self.throttled += news.throttled
            if self._apply_news(server, report.worker, news, now):
                out += self._budgets(server)
        return out

    def _apply_news(self, server: ServerState, worker: int, news: ServerNews, now: float) -> bool:
        """Update a server from one worker's news; True when its budget changed."""
        server.successes += news.successes
        server.errors += news.errors
        server.throttled += news.throttled
        server.latency_sum += news.latency_sum
        server.latency_count += news.latency_count
        server.opted_out += news.opted_out
        server.opt_in += news.opt_in
        self.opt_outs_ignored += news.opt_outs_ignored
        if server.dead:
            return False
        if not server.opt_in and server.opted_out >= self.settings.opt_out_server_after:
            server.dead, server.give_up = True, SERVER_OPTED_OUT
            return True
        changed = False
        if news.throttled:
            server.last_throttle = now
            server.ceiling_advertised = False
            if now - server.last_decrease >= DECREASE_COOLDOWN:
                lowered = server.rate * CEILING_SHARE
                server.ceiling = lowered if server.ceiling is None else min(server.ceiling,
                                                                           lowered)
                server.rate = max(MIN_RATE, server.rate * DECREASE_FACTOR)
                server.last_decrease = now
                changed = True
        if news.retry_after_until > server.paused_until:
            server.paused_until = news.retry_after_until
            changed = True
        server.failures[worker] = news.failures
        if news.failures == 0 and news.answered:
            if server.probing or server.failing_since is not None:
                server.failing_since = None
                server.breaker_opens = 0
                server.failures.clear()
                changed = True
        elif sum(server.failures.values()) >= BREAKER_THRESHOLD and now >= server.paused_until:
            if server.failing_since is None:
                server.failing_since = now
            server.breaker_opens += 1
            pause = min(BREAKER_MAX_PAUSE, 2.0 ** (server.breaker_opens - 1))
            server.paused_until = max(server.paused_until, now + pause)
            changed = True
            if now - server.failing_since >= self.settings.server_down_after:
                server.dead = True
        return changed

    # --- views ---------------------------------------------------------------------------------

    def busiest(self, count: int = 3) -> list[ServerState]:
        active = [s for s in self.servers.values() if s.workers or s.pending]
        return sorted(active, key=lambda s: -s.remaining_seconds)[:count]
