"""Planning on paper: how long a prepared run should take on a given cluster, and why.

The whole prepared run (finished or not), in a fluid simulation of the scheduler's policy.
Each server is fetched at most at the rate it may climb to (an advertised or hand-set limit,
else `max_rate_limit`, else `default_rate_limit`: the climb that `max_rate_factor` allows is
earned by fast answers, so not planned on), by at most as many workers as the scheduler would
give it (`min_worker_rate`, `schedule_rules`, its number of batches); each worker decodes at most
`worker_speed` images/s. The cluster's decode capacity is shared max-min fairly among the
servers with work left, as workers taking batches from every server do. The run ends when the
last server does, so the answer is usually "the largest servers, at their polite rates", which
no number of nodes changes: that is what the plan makes visible before any job is submitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from distributed_downloader.config import Settings
from distributed_downloader.fetch import starting_servers
from distributed_downloader.schedule import workers_allowed
from distributed_downloader.storage import RunLayout

# Images/s one worker with one core decodes, resizes and encodes (benchmarks/throughput.py:
# ~70 images/s on 2 cores for camera photos resized to 720 px).
DEFAULT_WORKER_SPEED = 35.0
ORIGINAL_RANKS, ORIGINAL_RATE = 42, 10.0  # the original downloader's nominal set-up


@dataclass
class ServerPlan:
    name: str
    rows: int
    rate: float  # the server's rate budget, requests/s
    workers: int  # how many workers the scheduler lets fetch it at once
    cap: float = 0.0  # images/s it can go at: min(rate, workers x worker speed)
    alone_seconds: float = 0.0  # rows / cap: its own lower bound
    finish_seconds: float = 0.0  # when it finishes in the simulation
    skipped: bool = False  # excluded or down: its rows are written as errors, not fetched


def fair_shares(capacity: float, caps: list[float]) -> list[float]:
    """Max-min fair split of `capacity` among claimants each capped at caps[i]."""
    shares = [0.0] * len(caps)
    left, order = capacity, sorted(range(len(caps)), key=lambda i: caps[i])
    for position, index in enumerate(order):
        level = left / (len(order) - position)
        shares[index] = min(caps[index], level)
        left -= shares[index]
    return shares


def simulate(servers: list[ServerPlan], capacity: float) -> float:
    """Advance from one server's finish to the next; returns the makespan in seconds."""
    remaining = {index: float(server.rows) for index, server in enumerate(servers)
                 if server.rows and not server.skipped}
    now = 0.0
    while remaining:
        indexes = list(remaining)
        shares = fair_shares(capacity, [servers[i].cap for i in indexes])
        step = min(remaining[i] / share for i, share in zip(indexes, shares))
        now += step
        for i, share in zip(indexes, shares):
            remaining[i] -= share * step
            if remaining[i] <= 1e-6 * max(1.0, servers[i].rows):
                servers[i].finish_seconds = now
                del remaining[i]
    return now


def make_plan(settings: Settings, nodes: int, workers_per_node: int,
              worker_speed: float = DEFAULT_WORKER_SPEED) -> dict[str, Any]:
    layout = RunLayout(settings.paths.run_folder("plan"))
    workers = nodes * workers_per_node
    speed = worker_speed * settings.cluster.cpu_per_worker
    servers = []
    for state, rows in starting_servers(layout, settings, keep_rates=False):  # read-only
        # The rate the run climbs to: just below a rate that drew a 429, else the ceiling
        # (max_rate_limit, or an advertised, hand-set or robots.txt limit). Without
        # max_rate_limit, not the climb max_rate_factor allows: only a fast server earns it.
        control = state.policy.control
        rate = control.ceiling if control.ceiling is not None else control.max_rate
        if settings.politeness.max_rate_limit is None:
            rate = min(rate, max(control.climb_from, control.rate))
        allowed = workers_allowed(settings.cluster.schedule_rules, state.total_batches) or workers
        by_rate = max(1, math.floor(rate / settings.cluster.min_worker_rate))
        count = max(1, min(allowed, by_rate, workers, state.total_batches))
        server = ServerPlan(state.name, rows, rate, count, skipped=state.dead)
        server.cap = min(server.rate, count * speed)
        server.alone_seconds = server.rows / server.cap if not server.skipped else 0.0
        servers.append(server)
    capacity = workers * speed
    seconds = simulate(servers, capacity)
    fetched = sum(s.rows for s in servers if not s.skipped)
    servers.sort(key=lambda s: -s.alone_seconds)
    return {
        "nodes": nodes,
        "workers_per_node": workers_per_node,
        "workers": workers,
        "worker_speed": speed,
        "capacity": capacity,
        "servers": len(servers),
        "rows": fetched,
        "skipped_rows": sum(s.rows for s in servers if s.skipped),
        "seconds": seconds,
        "average_rate": fetched / seconds if seconds else 0.0,
        "capacity_bound_seconds": fetched / capacity if capacity else 0.0,
        "original_nominal_seconds": fetched / (ORIGINAL_RANKS * ORIGINAL_RATE),
        "largest": [
            {"server": s.name, "rows": s.rows, "rate": s.rate, "workers": s.workers,
             "alone_seconds": s.alone_seconds, "finish_seconds": s.finish_seconds,
             "share_of_run": s.alone_seconds / seconds if seconds else 0.0}
            for s in servers[:10]
        ],
    }


def duration(seconds: float) -> str:
    """Seconds as the two largest units: 3 d 4 h, 5 h 12 min, 42 s."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if hours < 1:
        return f"{minutes:.0f} min"
    if days < 1:
        return f"{int(hours)} h {int(minutes % 60)} min"
    return f"{int(days)} d {int(hours % 24)} h"
