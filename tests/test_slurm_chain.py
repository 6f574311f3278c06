"""The Slurm chain's decisions and job scripts, without a cluster (sbatch replaced by a counter).

The real chain runs in test_cluster.py; this covers what a real run takes minutes to reach.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import copy_run, run_cli, write_lines
from distributed_downloader.config import Settings
from distributed_downloader.executors import slurm
from distributed_downloader.runlock import RunLock, RunLocked, hold_run_lock


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared run folder (a prep by the CLI takes seconds), copied afresh for each test."""
    root = tmp_path_factory.mktemp("chain")
    out = root / "out"
    run_cli("prep", write_lines(root / "u.txt", [f"http://a.example/{i}" for i in range(30)]),
            "--output", out, "--batch-size", 10)
    (out / "profiles").mkdir()
    (out / "profiles" / "summary.json").write_text("{}")
    return out


@pytest.fixture
def prepared(prepared_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    out = copy_run(prepared_once, tmp_path / "out")
    ids = itertools.count(100)
    monkeypatch.setattr(slurm, "sbatch", lambda script, after=None: str(next(ids)))
    return Settings(output=out, num_downloads=3, time_limit="10", stop_margin=60)


def test_a_stalled_chain_ends_and_a_new_submission_starts_afresh(prepared: Settings) -> None:
    chain = slurm.submit_chain(prepared)
    first = chain.downloads[0].id
    assert slurm.start_period(prepared, first)[0]  # period 1 fetches, queues period 2
    second = slurm.read_chain(slurm.RunLayout(prepared.paths.output)).downloads[-1].id
    fetch, reason = slurm.start_period(prepared, second)  # nothing was committed meanwhile
    assert not fetch and "made no progress" in reason  # and no fetch summary: no request
    assert slurm.read_chain(slurm.RunLayout(prepared.paths.output)).state == "stalled"

    # Submitted again: its first period fetches, whatever the old submission's history.
    chain = slurm.submit_chain(prepared)
    assert chain.state == "running" and len(chain.downloads) == 1
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]


def fetch_ended(settings: Settings, requests: int | None, waiting: list | None = None,
                ended_at: float | None = None, **more: object) -> None:
    """What rank 0 writes at a fetch's end; None leaves a key out, as older versions did."""
    summary: dict = {"finished": False, "fetched_this_run": 0, **more}
    if requests is not None:
        summary["requests_this_run"] = requests
    if waiting is not None:
        summary["waiting"] = waiting
    summary["ended_at"] = time.time() if ended_at is None else ended_at
    (settings.paths.output / "fetch_summary.json").write_text(json.dumps(summary))


def next_period(settings: Settings) -> str:
    return slurm.read_chain(slurm.RunLayout(settings.paths.output)).downloads[-1].id


def test_a_period_that_sent_requests_but_committed_nothing_does_not_stall(
        prepared: Settings) -> None:
    # Slow servers, all paused at the period's end: no row committed, but work went on.
    chain = slurm.submit_chain(prepared)
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]
    fetch_ended(prepared, requests=12, waiting=[
        {"server": "a.example", "reason": "retry_after", "seconds_left": 41.6}])
    fetch, reason = slurm.start_period(prepared, next_period(prepared))
    assert fetch, reason
    chain = slurm.read_chain(slurm.RunLayout(prepared.paths.output))
    assert chain.state == "running"
    judged = chain.downloads[0]
    assert (judged.rows_committed, judged.requests) == (0, 12)
    assert judged.waiting == ["a.example (retry_after, 42 s left)"]
    assert "period 1: 0 rows, 12 requests" in reason


def test_a_period_stopped_by_a_full_disk_ends_the_chain_saying_so(prepared: Settings) -> None:
    chain = slurm.submit_chain(prepared)
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]
    full = "out of space in /scratch/out: 1.2 MB free, the rest needs about 3.4 GB"
    fetch_ended(prepared, requests=40, out_of_space=full)
    fetch, reason = slurm.start_period(prepared, next_period(prepared))
    assert not fetch
    chain = slurm.read_chain(slurm.RunLayout(prepared.paths.output))
    assert chain.state == "out_of_space" and chain.downloads[0].out_of_space == full
    assert reason == f"period 1 stopped: {full}; free space, then `slurm submit` again"
    assert len(chain.downloads) == 2  # the period that found it queued nothing behind itself


def test_a_profile_job_is_submitted_only_when_asked(prepared: Settings) -> None:
    (prepared.paths.output / "profiles" / "summary.json").unlink()
    assert [job.kind for job in slurm.submit_chain(prepared).jobs] == ["download"]
    slurm.cancel_chain(prepared)
    kinds = [job.kind for job in slurm.submit_chain(prepared, run_profile=True).jobs]
    assert kinds[-2:] == ["profile", "download"]


def test_a_period_that_sent_no_request_stalls_and_says_what_it_waited_on(
        prepared: Settings) -> None:
    chain = slurm.submit_chain(prepared)
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]
    fetch_ended(prepared, requests=0, waiting=[
        {"server": f"s{i}.example", "reason": "breaker_open", "seconds_left": None}
        for i in range(5)])
    fetch, reason = slurm.start_period(prepared, next_period(prepared))
    assert not fetch
    assert "period 1 made no progress" in reason and "sent no request" in reason
    assert "waiting on s0.example (breaker_open), s1.example (breaker_open), " \
        "s2.example (breaker_open), and 2 more" in reason
    chain = slurm.read_chain(slurm.RunLayout(prepared.paths.output))
    assert chain.state == "stalled" and chain.reason == reason
    assert chain.downloads[0].requests == 0 and len(chain.downloads[0].waiting) == 4


def periods_until_stopped(settings: Settings,
                          end: Callable[[str], None]) -> tuple[list[bool], str]:
    """Start periods of a new chain, each ended by `end(job id)`, until one does not fetch
    (two more than stall_periods at most): whether each fetched, and the last reason."""
    job = slurm.submit_chain(settings).downloads[0].id
    decisions, reason = [], ""
    for _ in range(settings.cluster.stall_periods + 2):
        fetch, reason = slurm.start_period(settings, job)
        decisions.append(fetch)
        if not fetch:
            break
        end(job)
        job = next_period(settings)
    return decisions, reason


def test_periods_that_send_requests_but_never_commit_a_row_stall_after_three(
        prepared: Settings) -> None:
    settings = prepared.model_copy(update={"num_downloads": 10})
    decisions, reason = periods_until_stopped(settings, lambda job: fetch_ended(
        settings, requests=5,
        waiting=[{"server": "a.example", "reason": "retry_delay", "seconds_left": 30}]))
    # Periods 1-3 fetch; period 4 finds three periods in a row without a committed row.
    assert decisions == [True] * settings.cluster.stall_periods + [False]
    stall = settings.cluster.stall_periods
    assert f"periods 1-3 committed no row in {stall} periods in a row" in reason
    assert "15 requests" in reason and "a.example (retry_delay, 30 s left)" in reason
    assert slurm.read_chain(slurm.RunLayout(settings.paths.output)).state == "stalled"


def test_periods_stopped_by_the_limit_before_a_request_go_on_then_stall_saying_why(
        prepared: Settings) -> None:
    """Slurm sends the time-limit signal up to a minute early: a short period may be stopped
    before its first request. That is not a broken setup, so the chain goes on, until
    stall_periods such periods in a row say the periods are too short."""
    settings = prepared.model_copy(update={"num_downloads": 10})
    layout = slurm.RunLayout(settings.paths.output)

    def stopped_at_once(job: str) -> None:
        slurm.signalled_marker(layout, job).touch()  # as the job's trap does
        fetch_ended(settings, requests=0)

    decisions, reason = periods_until_stopped(settings, stopped_at_once)
    assert decisions == [True] * settings.cluster.stall_periods + [False]
    assert "periods 1-3 committed no row in 3 periods in a row and sent no request" in reason
    assert "stopped by Slurm's time-limit signal as it started" in reason
    assert all(job.stopped_early for job in slurm.read_chain(layout).downloads[:3])


def test_a_period_signalled_near_its_limit_without_a_request_stalls_at_once(
        prepared: Settings) -> None:
    """A period that hangs (no request in hours) is signalled at its limit: that is no early
    signal, and the chain stops after that one period, as before."""
    layout = slurm.RunLayout(prepared.paths.output)
    first = slurm.submit_chain(prepared).downloads[0].id
    assert slurm.start_period(prepared, first)[0]
    started = slurm.read_chain(layout).downloads[0].started
    marker = slurm.signalled_marker(layout, first)
    marker.touch()
    os.utime(marker, (started + 3600, started + 3600))
    fetch_ended(prepared, requests=0)
    fetch, reason = slurm.start_period(prepared, next_period(prepared))
    assert not fetch and "period 1 made no progress" in reason
    # Guard: the same marker a few seconds after the start is an early signal.
    os.utime(marker, (started + 5, started + 5))
    assert slurm._signalled_at(layout, first) - started < slurm.STARTUP_SECONDS


def test_a_committed_row_resets_the_count_of_idle_periods(
        prepared: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = prepared.model_copy(update={"num_downloads": 10})
    job = slurm.submit_chain(settings).downloads[0].id
    for period, rows in enumerate([0, 0, 7, 7, 7], start=1):  # period 2 commits 7 rows
        monkeypatch.setattr(slurm, "committed_rows", lambda root, n=rows: n)
        assert slurm.start_period(settings, job)[0], f"period {period}"
        fetch_ended(settings, requests=5)
        job = next_period(settings)
    fetch, reason = slurm.start_period(settings, job)  # periods 3-5 committed nothing
    assert not fetch and "periods 3-5 committed no row" in reason


@pytest.mark.parametrize("summary", ["missing", "before the period", "without requests"])
def test_a_missing_or_older_fetch_summary_counts_as_no_request(prepared: Settings,
                                                               summary: str) -> None:
    chain = slurm.submit_chain(prepared)
    if summary == "before the period":  # the last period's fetch, not this one's
        fetch_ended(prepared, requests=50, ended_at=time.time() - 3600)
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]
    if summary == "without requests":  # written by a version without the key
        fetch_ended(prepared, requests=None)
    fetch, reason = slurm.start_period(prepared, next_period(prepared))
    assert not fetch and "made no progress" in reason
    assert slurm.read_chain(slurm.RunLayout(prepared.paths.output)).downloads[0].requests == 0


def test_an_old_chain_file_without_the_new_fields_still_loads(prepared: Settings) -> None:
    layout = slurm.RunLayout(prepared.paths.output)
    (prepared.paths.output / "slurm").mkdir()
    started = time.time() - 600
    old = {"state": "running", "reason": "", "jobs": [
        {"id": "7", "kind": "download", "period": 1, "submitted": started - 10,
         "started": started, "rows_at_start": 0, "submission": 1},
        {"id": "8", "kind": "download", "period": 2, "submitted": started, "started": None,
         "rows_at_start": None, "submission": 1}]}
    (prepared.paths.output / "slurm" / "chain.json").write_text(json.dumps(old))
    chain = slurm.read_chain(layout)
    assert [(job.id, job.requests, job.rows_committed, job.waiting) for job in chain.jobs] \
        == [("7", None, None, []), ("8", None, None, [])]
    fetch_ended(prepared, requests=3)
    assert slurm.start_period(prepared, "8")[0]  # the old period is judged by the new rule
    assert slurm.read_chain(layout).jobs[0].requests == 3
    # A newer version's extra keys do not stop this one from reading the file.
    newer = json.loads((prepared.paths.output / "slurm" / "chain.json").read_text())
    newer["jobs"][0]["some_future_field"] = 1
    (prepared.paths.output / "slurm" / "chain.json").write_text(json.dumps(newer))
    assert slurm.read_chain(layout).jobs[0].id == "7"


def test_the_chain_stops_after_num_downloads_periods(prepared: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    layout = slurm.RunLayout(prepared.paths.output)
    chain = slurm.submit_chain(prepared)
    job = chain.downloads[0].id
    decisions = []
    for rows in range(5):
        # Every period commits some rows: the chain never stalls, it runs out of periods.
        monkeypatch.setattr(slurm, "committed_rows", lambda root, n=rows: n)
        fetch, _ = slurm.start_period(prepared, job)
        decisions.append(fetch)
        if not fetch:
            break
        job = slurm.read_chain(layout).downloads[-1].id
    assert decisions == [True, True, True, False]  # num_downloads = 3
    assert slurm.read_chain(layout).state == "period_limit"


def test_job_scripts_stop_before_the_limit_and_keep_the_cores(prepared: Settings) -> None:
    settings = prepared.model_copy(update={"workers_per_node": 3, "cpu_per_worker": 4,
                                           "max_nodes": 2, "account": "lab",
                                           "partition": "cpu"})
    scripts = slurm.job_scripts(settings, slurm.RunLayout(settings.paths.output))
    download = scripts["download"]
    for line in ("#SBATCH --account=lab", "#SBATCH --partition=cpu", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=3", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --time=10", "#SBATCH --signal=B:USR1@60",
                 "ranks=$(( SLURM_JOB_NUM_NODES * 3 + 1 ))", "--cpu-bind=none"):
        assert line in download
    assert f"if [ $decision = {slurm.STOP_CHAIN} ]; then exit 0; fi" in download
    # The signal is caught from the first line on: it may come before the fetch starts.
    assert download.index("trap 'stopping=1") < download.index("slurm period")
    mpirun = slurm.job_scripts(settings.model_copy(update={"launcher": "mpirun"}),
                               slurm.RunLayout(settings.paths.output))["download"]
    assert "mpirun --oversubscribe --bind-to none -n $ranks" in mpirun


@pytest.mark.parametrize(("limit", "seconds"), [
    ("10", 600), ("10:30", 630), ("02:00:00", 7200), ("1-00", 86400), ("1-02:30", 95400),
    ("1-00:00:05", 86405)])
def test_time_limits_in_slurm_formats(limit: str, seconds: int) -> None:
    assert slurm.time_limit_seconds(limit) == seconds


def test_a_period_does_not_fetch_while_another_command_writes(prepared: Settings) -> None:
    chain = slurm.submit_chain(prepared)
    with hold_run_lock(prepared.paths.output, "fetch", 60):  # a fetch started by hand
        fetch, reason = slurm.start_period(prepared, chain.downloads[0].id)
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
            slurm.submit_chain(prepared)  # and no new chain is queued behind its back
    assert not fetch
    assert f"`fetch` on host {socket.gethostname()} (PID {os.getpid()})" in reason
    assert "`slurm submit` again once it is done" in reason
    chain = slurm.read_chain(slurm.RunLayout(prepared.paths.output))
    assert (chain.state, chain.reason) == ("blocked", reason)
    # Once it is done, a new submission fetches.
    chain = slurm.submit_chain(prepared)
    assert slurm.start_period(prepared, chain.downloads[-1].id)[0]


@pytest.mark.parametrize("holder", ["the period before, ending", "another host, gone quiet"])
def test_a_period_waits_for_a_holder_about_to_let_go(prepared: Settings, holder: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = prepared.model_copy(update={"run_lock_lease": 30})
    layout = slurm.RunLayout(settings.paths.output)
    first = slurm.submit_chain(settings).downloads[0].id
    assert slurm.start_period(settings, first)[0]
    fetch_ended(settings, requests=5)
    if holder == "the period before, ending":  # its rank 0 lets go 3 s after this one starts
        monkeypatch.setenv("SLURM_JOB_ID", first)
        lock = RunLock(layout.run_lock, "fetch", 60)
        lock.acquire()
        threading.Timer(3, lock.release).start()
    else:  # lease 8 s, no heartbeat for 5 s: another host's fetch killed hard, most likely
        content = {"command": "fetch", "host": "node-17.cluster", "pid": 4242,
                   "started_at": time.time() - 60, "lease_seconds": 8, "token": "0" * 16}
        layout.run_lock.write_text(json.dumps(content))
        os.utime(layout.run_lock, (time.time() - 5, time.time() - 5))
    started = time.monotonic()
    fetch, reason = slurm.start_period(settings, next_period(settings))
    assert fetch, reason
    assert time.monotonic() - started >= 2.5  # it did wait
    assert slurm.read_chain(layout).state == "running"
