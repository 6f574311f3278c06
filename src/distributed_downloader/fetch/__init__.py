"""The fetch stage: download every prepared batch, resumably, under each server's budget.

`run_fetch` finds what is left to do (batches without a `_completed` marker; with
`retry_errors`, also finished batches holding retryable errors), sets each server's starting
budget (defaults, or what a previous run learned), runs the workers on an executor, and saves
what it learned about the servers for the next run. A full disk, anywhere, stops every worker
and ends the run with one line (`OutOfSpace`); the same command resumes once space is freed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import duckdb
import pyarrow.parquet as pq

from distributed_downloader.config import Settings, save_settings
from distributed_downloader.errors import ErrorCode, Failure, OutOfSpace, UserError
from distributed_downloader.fetch.robots import RobotsGate
from distributed_downloader.formats import require_format
from distributed_downloader.policy import (
    SERVER_KEPT_FAILING,
    SERVER_OPTED_OUT,
    RatePolicy,
    ServerPolicy,
)
from distributed_downloader.profiles import (
    ProfileStatus,
    RateOverride,
    ServerProfile,
    apply_overrides,
    load_rate_overrides,
    read_profiles,
    write_profiles,
)
from distributed_downloader.protocol import BatchRef, DiskFull
from distributed_downloader.schedule import Scheduler, ServerState
from distributed_downloader.status import process_identity
from distributed_downloader.storage import (
    ERROR_PREFIX,
    SUCCESS_PREFIX,
    RunLayout,
    atomic_write_json,
    sample_urls,
    space_errors,
    upgrade_layout,
)
from distributed_downloader.writers import (
    bytes_per_row,
    committed_rows,
    reopen_for_retry,
    set_aside_unreadable,
)

# Learned rates are written to servers.csv this often: a killed run loses a minute of learning
# at most, and the file is not rewritten on every report.
PROFILE_SAVE_SECONDS = 60.0
STATE_SECONDS = 5.0  # how often a running fetch records its state for `status`
# Profile statuses whose max_rate_limit is a hard ceiling (advertised, Crawl-delay, by hand).
CEILING_STATUSES = (ProfileStatus.PROBED, ProfileStatus.MANUAL)
EXCLUDED = Failure(ErrorCode.SERVER_EXCLUDED, "server excluded by the rates file")
DOWN_AT_PROFILE = Failure(ErrorCode.SERVER_UNAVAILABLE,
                         "server did not answer the profile probe; run `profile` again to retry")


class Executor(Protocol):
    """Runs the workers and carries their messages to and from the scheduler."""

    def worker_ids(self, limit: int) -> list[int]: ...

    def run(self, scheduler: Scheduler, on_tick: Callable[[Scheduler], None]) -> bool: ...

    def close(self) -> None: ...


@dataclass
class FetchPlan:
    servers: list[ServerState]
    batches_total: int
    batches_done: int
    rows_total: int
    rows_done: int  # in finished batches
    reopened_rows: int = 0
    rows_committed: int = 0  # every row already written (unfinished batches' chunks too)
    pending_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.pending_rows = sum(server.remaining_rows for server in self.servers)


# Settings that shape what is stored: fixed by a run's first fetch, so that one dataset never
# mixes two image sizes or encodings.
OUTPUT_SETTINGS = ("image_size", "output_image_format", "image_quality", "output_format")


def check_output_settings(layout: RunLayout, settings: Settings) -> None:
    """Refuse settings that would change what the run stores; record them at its first fetch."""
    asked = _output_settings(settings)
    if not layout.output_settings.exists():
        return
    fixed = json.loads(layout.output_settings.read_text())
    different = [f"{name} {fixed[name]} (asked: {asked[name]})" for name in OUTPUT_SETTINGS
                 if name in fixed and fixed[name] != asked[name]]
    if different:
        raise UserError(
            f"{layout.root} stores its images with {', '.join(different)}: a run keeps the "
            "output settings it started with. Download into another --output, or change the "
            "stored images afterwards with `distributed-downloader tools resize`")


def fix_output_settings(layout: RunLayout, settings: Settings) -> None:
    if not layout.output_settings.exists():
        atomic_write_json(layout.output_settings, _output_settings(settings))


def _output_settings(settings: Settings) -> dict[str, Any]:
    return {name: settings.value(name) for name in OUTPUT_SETTINGS}


def _prep_summary(layout: RunLayout) -> dict[str, Any]:
    try:
        return json.loads(layout.prep_summary.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{layout.root} has no finished prep; run `distributed-downloader prep` "
            "(or `download`) first"
        ) from None


def starting_servers(layout: RunLayout, settings: Settings, retry_errors: bool = False,
                     keep_rates: bool = True) -> list[tuple[ServerState, int]]:
    """Every prepared server with its starting budget, and its number of rows."""
    _prep_summary(layout)
    learned = read_profiles(layout.server_profiles)
    overrides = load_rate_overrides(layout, settings.politeness, keep=keep_rates)
    rate_policy = RatePolicy.from_settings(settings.politeness)
    max_rate = settings.politeness.effective_max_rate * settings.politeness.rate_multiplier
    default_rate = settings.politeness.default_rate_limit * settings.politeness.rate_multiplier
    now = time.time()
    servers = []
    for row in pq.read_table(layout.servers).to_pylist():
        name = row["server_name"]
        policy = ServerPolicy.start(rate_policy, min(default_rate, max_rate), max_rate, now)
        server = ServerState(name=name, policy=policy,
                             connections=settings.politeness.max_connections_per_server,
                             total_batches=row["batches"])
        _starting_budget(server, learned.get(name), overrides.get(name), now, retry_errors,
                         settings.politeness.ignore_opt_out)
        servers.append((server, row["rows"]))
    return servers


def build_plan(layout: RunLayout, settings: Settings, retry_errors: bool) -> FetchPlan:
    """Which batches are left, by server, with each server's starting budget."""
    batch_size = _prep_summary(layout)["batch_size"]
    servers = []
    totals = {"batches": 0, "done": 0, "rows": 0, "rows_done": 0, "reopened": 0}
    for server, rows in starting_servers(layout, settings, retry_errors):
        name, batches = server.name, server.total_batches
        for partition in range(batches):
            size = min(batch_size, rows - partition * batch_size)
            files = layout.batch_files(name, partition)
            finished = files.finished
            if finished and retry_errors:
                reopened = reopen_for_retry(files)
                totals["reopened"] += reopened
                finished = reopened == 0
            totals["batches"] += 1
            totals["rows"] += size
            if finished:
                totals["done"] += 1
                totals["rows_done"] += size
            else:
                server.pending.append(BatchRef(name, partition, size))
                server.remaining_rows += size
        if server.pending:
            servers.append(server)
    return FetchPlan(servers, totals["batches"], totals["done"], totals["rows"],
                     totals["rows_done"], totals["reopened"])


def _starting_budget(server: ServerState, profile: ServerProfile | None,
                     override: RateOverride | None, now: float, retry_errors: bool,
                     ignore_opt_out: bool = False) -> None:
    """Hand-set rates first, then what a probe or an earlier run learned, else the defaults.

    A server the probe found down is skipped, except when retrying errors: then it gets
    another chance, with the circuit breaker to stop it costing more than a few requests.
    A server that opted out of everything in an earlier run is not asked again. A server an
    earlier run (Slurm period) left failing goes on being probed, one request at a time.
    """
    policy = server.policy
    if override is not None and override.exclude:
        server.dead, server.give_up = True, EXCLUDED
        return
    if override is not None and (override.rate_limit or override.max_connections):
        if override.rate_limit:  # the person's rate, instead of the run's ceiling
            policy.control.run_max = policy.control.rate = override.rate_limit
        if override.max_connections:
            server.connections = override.max_connections
        return
    if profile is None:
        policy.control.first_contact()
        return
    if profile.status == ProfileStatus.DOWN:
        if not retry_errors:
            server.dead, server.give_up = True, DOWN_AT_PROFILE
        return
    if profile.status == ProfileStatus.OPTED_OUT and not ignore_opt_out:
        server.dead, server.give_up = True, SERVER_OPTED_OUT
        return
    server.connections = min(server.connections, profile.max_connections)
    if profile.status in CEILING_STATUSES:  # a limit it advertised, or one set by hand
        policy.control.set_cap("advertised", profile.max_rate_limit or profile.rate_limit)
    policy.control.remember(profile.learned, profile.rate_limit)
    if profile.failing_since is not None and \
            now - profile.failing_since < policy.control.policy.server_down_after:
        policy.breaker.resume_failing(profile.failing_since)
    if profile.paused_until is not None and profile.paused_until > now:  # asked by the server
        policy.paused_until = profile.paused_until
        policy.pause_reason = "Retry-After (asked in an earlier run)"
    if profile.last_request is not None:  # a restart sends no burst: one interval first
        server.next_start = profile.last_request + 1.0 / server.rate


def record_state(layout: RunLayout, scheduler: Scheduler, plan: FetchPlan,
                 running: bool) -> None:
    """For `status`: each server's live budget (rewritten), and a line of the run's history."""
    now = time.time()
    done = min(plan.rows_total, plan.rows_committed + scheduler.successes + scheduler.errors)
    atomic_write_json(layout.fetch_state, {
        "updated": now,
        "running": running,
        **process_identity(),
        "servers": {
            server.name: {"rate": server.rate, "workers": len(server.workers),
                          "paused": server.paused_until > now, "dead": server.dead,
                          "held": server.held,
                          "throttled": server.throttled, "remaining_rows": server.remaining_rows}
            for server in scheduler.servers.values()
        },
        "waiting": waits_as_json(scheduler, now),
    })
    line = {"time": round(now, 1), "rows_done": done, "successes": scheduler.successes,
            "errors": scheduler.errors, "throttled": scheduler.throttled, "running": running}
    text = json.dumps(line) + "\n"
    with space_errors(layout.root, len(text)), open(layout.fetch_log, "a",
                                                     encoding="utf-8") as log:
        log.write(text)


def waits_as_json(scheduler: Scheduler, now: float, count: int = 20) -> list[dict[str, Any]]:
    """What the run waits on (the largest servers first), for `status` and the Slurm chain."""
    return [{"server": wait.server, "reason": wait.reason,
             "seconds_left": None if wait.seconds_left is None else round(wait.seconds_left, 1)}
            for wait in scheduler.waits(now)[:count]]


def learned_profiles(layout: RunLayout, settings: Settings,
                     scheduler: Scheduler) -> list[ServerProfile]:
    """Previous profiles, updated with what this run saw of its servers: the rates they
    tolerated, never a rate driven down by failures; hand-set rates say so."""
    profiles = read_profiles(layout.server_profiles)
    for server in scheduler.servers.values():
        previous = profiles.get(server.name)
        if server.dead and server.give_up is SERVER_OPTED_OUT:
            rate = previous.rate_limit if previous is not None else server.rate
            profiles[server.name] = ServerProfile(
                server.name, rate, server.connections, None, ProfileStatus.OPTED_OUT,
                "every answer opted out (X-Robots-Tag); not asked again")
            continue
        if server.give_up is not SERVER_KEPT_FAILING and server.dead:
            continue  # excluded, or down at profile time: nothing learned
        if previous is not None and previous.status == ProfileStatus.MANUAL:
            continue
        profiles[server.name] = _learned_profile(server, previous)
    apply_overrides(profiles, load_rate_overrides(layout, settings.politeness, keep=False),
                    settings.politeness)
    return list(profiles.values())


def _learned_profile(server: ServerState, previous: ServerProfile | None) -> ServerProfile:
    control, breaker = server.policy.control, server.policy.breaker
    learned = control.learned()
    cap = min(control.caps.values(), default=None)
    # "gave_up", unlike the profile's "down", does not keep the next run from trying.
    status = ProfileStatus.GAVE_UP if server.dead else \
        ProfileStatus.THROTTLED if learned.throttled is not None else \
        ProfileStatus.PROBED if cap is not None else ProfileStatus.OK
    latency = (server.latency_sum / server.latency_count * 1000
               if server.latency_count else None)
    notes = f"{server.throttled} throttled answers this run" if server.throttled else \
        (previous.notes if previous is not None else "")
    start = control.start_rate(control.rate)  # where this run would rest
    last_request = server.policy.last_asked or (previous.last_request if previous else None)
    paused_until = server.policy.paused_until if server.policy.paused_until > time.time() \
        else None
    return ServerProfile(server.name, start, server.connections, latency, status, notes, cap,
                         learned.held, learned.throttled, learned.throttled_at, learned.wait,
                         paused_until, breaker.failing_since, last_request)


def output_counts(layout: RunLayout) -> dict[str, Any]:
    """Successes and errors (by code) over every committed chunk of the run. A chunk that
    cannot be read is set aside (its rows are fetched again) rather than stopping the run."""
    try:
        return _count_chunks(layout)
    except duckdb.Error:
        if not set_aside_unreadable(layout):
            raise
        return _count_chunks(layout)


def _count_chunks(layout: RunLayout) -> dict[str, Any]:
    counts: dict[str, Any] = {"successes": 0, "errors": 0, "errors_by_code": {}}
    con = duckdb.connect()
    if layout.has_chunks(SUCCESS_PREFIX):
        counts["successes"] = con.sql("SELECT count(*) FROM read_parquet("
                                      f"{layout.chunk_pattern(SUCCESS_PREFIX)})").fetchall()[0][0]
    if layout.has_chunks(ERROR_PREFIX):
        by_code = con.sql(
            f"SELECT error_code, count(*) FROM read_parquet({layout.chunk_pattern(ERROR_PREFIX)}) "
            "GROUP BY 1 ORDER BY 2 DESC").fetchall()
        counts["errors_by_code"] = dict(by_code)
        counts["errors"] = sum(count for _, count in by_code)
    return counts


def _run_plan(layout: RunLayout, settings: Settings, plan: FetchPlan, executor: Executor,
              on_tick: Callable[[Scheduler], None] | None,
              robots_fetched_since: float | None = None) -> tuple[Scheduler, bool]:
    """Run the workers over the plan; the scheduler, and whether the run was interrupted."""
    workers = executor.worker_ids(plan.batches_total - plan.batches_done)
    scheduler = Scheduler(plan.servers, settings, workers, time.time())
    # Any of the server's URLs gives robots.txt's address (its first batch's first row is
    # the cheapest to read), even when every row is in an earlier download: a reused row
    # whose image went missing since prep is fetched after all.
    robots = RobotsGate(layout, settings, lambda name: next(
        iter(sample_urls(layout, name, 1, to_fetch_only=False)), None)) \
        if settings.politeness.respect_robots else None
    if robots is not None:
        robots.start(scheduler, time.time(), robots_fetched_since)
    last_save = [time.monotonic()]
    last_state = [0.0]

    def tick(current: Scheduler) -> None:
        if robots is not None:
            robots.apply(current, time.time())
        if on_tick:
            on_tick(current)
        try:
            if time.monotonic() - last_state[0] > STATE_SECONDS:
                last_state[0] = time.monotonic()
                record_state(layout, current, plan, running=True)
            if time.monotonic() - last_save[0] > PROFILE_SAVE_SECONDS:
                last_save[0] = time.monotonic()
                write_profiles(layout.server_profiles,
                               learned_profiles(layout, settings, current))
        except OutOfSpace as exc:  # the workers would find it too: stop them all now
            current.out_of_space(disk_full(exc))

    try:
        interrupted = executor.run(scheduler, tick)
    finally:
        if robots is not None:
            robots.close()
    try:
        record_state(layout, scheduler, plan, running=False)
        write_profiles(layout.server_profiles, learned_profiles(layout, settings, scheduler))
    except OutOfSpace as exc:
        scheduler.out_of_space(disk_full(exc))
    return scheduler, interrupted


def disk_full(exc: OutOfSpace) -> DiskFull:
    """The coordinator's own failed write, as the news a worker would send."""
    return DiskFull(None, str(exc.folder), exc.needed, exc.free, exc.rows_in_write)


def _add_estimate(exc: OutOfSpace, layout: RunLayout) -> None:
    """Say what the rest of the run needs: the rows left at this run's bytes per row."""
    if exc.bytes_per_row is not None:
        return
    try:
        per_row = bytes_per_row(layout)
        if per_row is None and exc.rows_in_write:  # nothing stored yet: the write that failed
            per_row = exc.needed / exc.rows_in_write
        if per_row is not None:
            rows = json.loads(layout.prep_summary.read_text())["download_rows"]
            exc.rows_left, exc.bytes_per_row = rows - committed_rows(layout), per_row
    except (OSError, ValueError, KeyError):
        pass  # without the estimate: the line still names the folder and the failed write


def run_fetch(
    settings: Settings,
    executor: Executor,
    retry_errors: bool = False,
    on_tick: Callable[[Scheduler], None] | None = None,
    on_plan: Callable[[FetchPlan], None] | None = None,
    robots_fetched_since: float | None = None,
) -> dict[str, Any]:
    """Download what is left of the run in `settings.paths.output` on `executor` (local processes or
    MPI ranks: executors/, which sit above this stage); returns the run's summary. robots.txt
    files fetched after `robots_fetched_since` (by this `download`'s profile) are used whatever
    their cache time."""
    layout = RunLayout(settings.paths.run_folder("fetch"))
    try:
        return _fetch(layout, settings, retry_errors, on_tick, on_plan,
                      executor, robots_fetched_since)
    except OutOfSpace as exc:
        _add_estimate(exc, layout)
        raise


def _fetch(layout: RunLayout, settings: Settings, retry_errors: bool,
           on_tick: Callable[[Scheduler], None] | None,
           on_plan: Callable[[FetchPlan], None] | None, executor: Executor,
           robots_fetched_since: float | None) -> dict[str, Any]:
    """Plan, run the workers, sum up: the run's summary (a full disk raises `OutOfSpace`)."""
    started = time.monotonic()
    before, plan = _prepare(layout, settings, retry_errors)
    if on_plan:
        on_plan(plan)
    interrupted = False
    scheduler = None
    try:
        if plan.servers:
            scheduler, interrupted = _run_plan(layout, settings, plan, executor, on_tick,
                                               robots_fetched_since)
    finally:
        executor.close()  # MPI: the ranks wait for word even when nothing was left to do
    summary = _summary(layout, plan, before, scheduler, interrupted,
                       time.monotonic() - started)
    return _save_summary(layout, summary, scheduler)


def _prepare(layout: RunLayout, settings: Settings,
             retry_errors: bool) -> tuple[dict[str, Any], FetchPlan]:
    """Check the run folder and its output settings, then plan: what was stored before this
    run, and what is left."""
    layout.check_writable()
    require_format(settings.store.output_format)
    upgrade_layout(layout)
    check_output_settings(layout, settings)
    # Counted before the plan: an unreadable chunk is set aside first, and its batch is
    # planned as unfinished (rows reopened for retry are added back below).
    before = output_counts(layout)
    plan = build_plan(layout, settings, retry_errors)
    save_settings(settings)
    fix_output_settings(layout, settings)
    plan.rows_committed = before["successes"] + before["errors"] - plan.reopened_rows
    return before, plan


def _summary(layout: RunLayout, plan: FetchPlan, before: dict[str, Any],
             scheduler: Scheduler | None, interrupted: bool, seconds: float) -> dict[str, Any]:
    """What the run did (fetch_summary.json)."""
    after = output_counts(layout)
    fetched_now = after["successes"] + after["errors"] - before["successes"] - \
        before["errors"] + plan.reopened_rows
    batches_done = len(layout.finished_markers())
    return {
        "finished": batches_done == plan.batches_total,
        "interrupted": interrupted,
        "batches": plan.batches_total,
        "batches_done": batches_done,
        "rows": plan.rows_total,
        **after,
        "fetched_this_run": fetched_now,
        "throttled_this_run": scheduler.throttled if scheduler else 0,
        "requests_this_run": scheduler.requests if scheduler else 0,
        "waiting": waits_as_json(scheduler, time.time()) if scheduler else [],
        "opt_outs_ignored": scheduler.opt_outs_ignored if scheduler else 0,
        "retried_rows": plan.reopened_rows,
        "seconds": round(seconds, 3),
        "images_per_second": round(fetched_now / seconds, 2) if seconds else 0.0,
        "worker_peak_rss_mib": scheduler.worker_peak_rss_mib if scheduler else None,
        "ended_at": round(time.time(), 3),
    }


def _save_summary(layout: RunLayout, summary: dict[str, Any],
                  scheduler: Scheduler | None) -> dict[str, Any]:
    """Write the summary; after a full disk, raise it as one line instead."""
    full = scheduler.disk_full if scheduler is not None else None
    if full is None:
        atomic_write_json(layout.root / "fetch_summary.json", summary)
        return summary
    error = OutOfSpace(full.folder, full.needed, full.free)
    error.rows_in_write = full.rows
    _add_estimate(error, layout)
    try:  # for `status` and the Slurm chain, when there is room for it
        atomic_write_json(layout.root / "fetch_summary.json",
                          {**summary, "out_of_space": str(error)})
    except OutOfSpace:
        pass
    raise error
