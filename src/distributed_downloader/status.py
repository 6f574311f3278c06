"""Where a run stands: counts, speed, ETA and the servers that bound it, during a run and after.

Everything comes from small files, so status answers in a second or two at any scale: the
prep summary and servers table, each finished batch's `_completed` marker (its counts, errors
by code), the chunk footers of unfinished batches only, the live `fetch_state.json` a running
fetch rewrites every few seconds, and `fetch_progress.jsonl`, its history.

A fetch killed with -9 leaves a state that says "running": it is believed only while the
process that wrote it runs (when it ran on this machine) and, from any machine, while it is
fresh.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from distributed_downloader.chunks import chunk_row_counts, errors_by_code
from distributed_downloader.errors import UserError
from distributed_downloader.profiles import read_profiles
from distributed_downloader.storage import BatchFiles, RunLayout, upgrade_layout

SPEED_WINDOW_SECONDS = 300.0  # "images/s over the last minutes"
LIVE_SECONDS = 30.0  # a state older than this belongs to a fetch that is not running any more


def process_identity() -> dict[str, Any]:
    """Who writes fetch_state.json: enough for `status` to tell whether it still runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": _started(os.getpid())}


def _started(pid: int) -> int | None:
    """When the process started (clock ticks after boot), None when it is gone or a zombie; a
    pid reused by another process has another start."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def fetch_running(state: dict[str, Any], now: float) -> bool:
    """Whether the fetch that wrote `state` still runs."""
    if not state.get("running") or now - state.get("updated", 0) >= LIVE_SECONDS:
        return False
    if state.get("host") != socket.gethostname() or not Path("/proc/self/stat").exists():
        return True  # another machine's (or no /proc here): fresh is all we can tell
    started = _started(state["pid"])
    return started is not None and started == state.get("pid_started", started)


@dataclass
class ServerProgress:
    name: str
    rows: int
    batches: int
    done: int = 0
    successes: int = 0
    errors: int = 0
    batches_done: int = 0
    rate: float | None = None
    throttled: int = 0
    state: str = "waiting"  # waiting | fetching | paused | down | done
    reused: int = 0  # rows an earlier download holds: written without a request

    @property
    def remaining(self) -> int:
        return self.rows - self.done

    @property
    def remaining_seconds(self) -> float:
        """Time to fetch what is left; reused rows take none (counted pro rata)."""
        to_fetch = self.remaining * (1 - self.reused / self.rows) if self.rows else 0
        return to_fetch / self.rate if self.rate else 0.0


def _batch_counts(batch: BatchFiles) -> tuple[bool, int, int, dict[str, int]]:
    """(finished, successes, errors, errors by code) of one batch's output."""
    if batch.finished:
        data = json.loads(batch.marker.read_text())
        by_code = data.get("errors_by_code")
        if by_code is None:  # a marker from before codes were recorded
            by_code = errors_by_code(batch)
        return True, data["successes"], data["errors"], by_code
    successes, errors = chunk_row_counts(batch)
    return False, successes, errors, errors_by_code(batch) if errors else {}


def read_history(layout: RunLayout) -> list[dict[str, Any]]:
    if not layout.fetch_log.exists():
        return []
    lines = []
    for line in layout.fetch_log.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return lines


def recent_speed(history: list[dict[str, Any]], now: float, running: bool,
                 count: str = "successes") -> float:
    """`count` per second (images stored, by default; `rows_done`: rows finished, errors
    included) over the last few minutes of the latest fetch (its last minutes, when no fetch
    is running). Each fetch's lines end with one whose `running` is false."""
    fetches: list[list[dict[str, Any]]] = [[]]
    for line in history:
        fetches[-1].append(line)
        if not line.get("running", True):
            fetches.append([])
    latest = fetches[-1] or (fetches[-2] if len(fetches) > 1 else [])
    if not latest:
        return 0.0
    end = now if running else latest[-1]["time"]
    window = [line for line in latest if end - line["time"] <= SPEED_WINDOW_SECONDS]
    if len(window) < 2 or window[-1]["time"] <= window[0]["time"]:
        return 0.0
    return max(0, window[-1].get(count, 0) - window[0].get(count, 0)) / \
        (window[-1]["time"] - window[0]["time"])


def run_status(output: Path) -> dict[str, Any]:
    """Where the run stands, from small files only: the prep's summary, each batch's marker or
    chunk footers, the running fetch's state and history, the saved profiles."""
    layout = RunLayout(output)
    if not layout.prep_summary.exists():
        raise UserError(f"{output} has no finished prep: nothing to report yet")
    upgrade_layout(layout)
    prep = json.loads(layout.prep_summary.read_text())
    now = time.time()
    state = json.loads(layout.fetch_state.read_text()) if layout.fetch_state.exists() else {}
    running = fetch_running(state, now)
    servers, by_code = _servers_progress(layout, state, running)
    history = read_history(layout)
    speed = recent_speed(history, now, running)
    rows_speed = recent_speed(history, now, running, count="rows_done")
    done = sum(s.done for s in servers)
    total = prep["download_rows"]
    left = [s for s in servers if s.remaining > 0]
    bound = max(left, key=lambda s: s.remaining_seconds, default=None)
    eta = _eta(total - done, rows_speed, bound)
    phase = "finished" if done >= total and all(s.state == "done" for s in servers) else \
        "fetching" if running else "stopped" if history else "prepared"
    busiest = sorted(left, key=lambda s: -s.remaining_seconds)[:5]
    slowest = sorted((s for s in left if s.rate), key=lambda s: s.rate or 0)[:5]
    return {
        "output": str(output),
        "phase": phase,
        "updated": state.get("updated"),
        "rows": total,
        "done": done,
        "successes": sum(s.successes for s in servers),
        "errors": sum(s.errors for s in servers),
        "errors_by_code": dict(by_code.most_common()),
        "batches": prep["batches"],
        "batches_done": sum(s.batches_done for s in servers),
        "servers": len(servers),
        "servers_done": sum(1 for s in servers if s.state == "done"),
        "reused": {"rows": prep.get("reused_rows", 0), "previous": prep.get("previous", []),
                   "overlap": prep.get("overlap")},
        "images_per_second": round(speed, 2),
        "rows_per_second": round(rows_speed, 2),
        "throttled_last_fetch": sum(s.throttled for s in servers),
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "bound_by": bound.name if bound is not None and bound.remaining_seconds else None,
        # Why the run is slowed, as the running fetch saw it: paused, held, failing servers.
        "waiting": state.get("waiting", []) if running else [],
        "busiest": [_server_json(s) for s in busiest],
        "slowest": [_server_json(s) for s in slowest if s not in busiest],
        "all_servers": [_server_json(s) for s in servers],
        "history": history,
    }


def _servers_progress(layout: RunLayout, state: dict[str, Any],
                      running: bool) -> tuple[list[ServerProgress], Counter]:
    """Each server's counts (from its batches), rate and state; and the errors by code."""
    live = state.get("servers", {}) if running else {}
    last_fetch = state.get("servers", {})  # its throttle counts hold after it ended too
    profiles = read_profiles(layout.server_profiles)
    servers: list[ServerProgress] = []
    by_code: Counter = Counter()
    for row in pq.read_table(layout.servers).to_pylist():
        server = ServerProgress(row["server_name"], row["rows"], row["batches"],
                                reused=row.get("reused_rows") or 0)
        for partition in range(server.batches):
            finished, successes, errors, codes = _batch_counts(
                layout.batch_files(server.name, partition))
            server.batches_done += finished
            server.successes += successes
            server.errors += errors
            by_code.update(codes)
        server.done = server.successes + server.errors
        server.throttled = last_fetch.get(server.name, {}).get("throttled", 0)
        profile = profiles.get(server.name)
        _live_state(server, live.get(server.name), profile.rate_limit if profile else None)
        servers.append(server)
    return servers, by_code


def _live_state(server: ServerProgress, now_state: dict[str, Any] | None,
                profiled_rate: float | None) -> None:
    """The rate and state a running fetch reports for the server (else its profile's rate)."""
    server.rate = now_state["rate"] if now_state is not None else profiled_rate
    if server.batches_done == server.batches:
        server.state = "done"
    elif now_state is not None and now_state["dead"]:
        server.state = "down"
    elif now_state is not None and now_state["paused"]:
        server.state = "paused"
    elif now_state is not None and now_state["workers"]:
        server.state = "fetching"


def _eta(rows_left: int, rows_per_second: float, bound: ServerProgress | None) -> float | None:
    """Seconds left: the run's recent pace, but never less than its slowest server needs."""
    if rows_left <= 0:
        return None
    by_speed = rows_left / rows_per_second if rows_per_second else 0.0
    return max(by_speed, bound.remaining_seconds if bound else 0.0) or None


def _server_json(server: ServerProgress) -> dict[str, Any]:
    return {"server": server.name, "done": server.done, "rows": server.rows,
            "successes": server.successes, "errors": server.errors,
            "rate": server.rate, "throttled": server.throttled, "state": server.state,
            "remaining_seconds": round(server.remaining_seconds, 1)}
