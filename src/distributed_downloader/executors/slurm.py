"""The Slurm executor: a chain of time-limited jobs that prepares, profiles and downloads a run.

`slurm submit` writes the job scripts into `OUT/slurm/` and submits prep → (profile, with
`--profile`) → the first download period, each depending on the one before. Every download period,
as it starts, queues its successor behind itself (`afterany`), so a period killed at its time limit
still has one; a period that finds nothing left to do, or that follows a period which made no
progress (no row committed and no request sent, though not stopped by the time-limit signal, or
`stall_periods` periods in a row without a committed row), or one whose fetch stopped on a full
disk, ends the chain instead of fetching.
Slurm signals each period `stop_margin` seconds before its limit; the ranks flush their chunks and
exit, and the next period resumes from them.

One command writes into a run folder at a time (runlock.py). `slurm submit` does not hold the
run's lock, since its jobs must take it: it only refuses while another command holds it. Each
job takes it as it runs (prep, profile, and rank 0 of a period's fetch). A period starting while
the lock is held waits, up to `run_lock_lease`, for a holder that is an earlier period of the
chain (still ending) or a holder on another host that stopped renewing it; held by anything
else (a fetch started by hand), the chain ends as `blocked`, naming the holder, and the job
exits 0 (`slurm submit` again resumes once it is done): a period refused by its fetch would fail
and be judged as one that made no progress.

Each period runs `fetch --executor mpi` under `srun` or `mpirun`: one scheduler rank plus
`workers_per_node` fetching ranks on each node. The chain's history is kept in
`OUT/slurm/chain.json`, since small clusters often run without Slurm's accounting.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distributed_downloader.config import (
    FETCH_SETTINGS,
    PROFILE_SETTINGS,
    Settings,
    one_off_flags,
    save_settings,
)
from distributed_downloader.errors import UserError
from distributed_downloader.runlock import FADING, LIVE, Holder, RunLocked, current_writer
from distributed_downloader.storage import (
    RunLayout,
    atomic_write_json,
    atomic_write_text,
    upgrade_layout,
)
from distributed_downloader.writers import committed_rows

CHAIN_FILE = "chain.json"
STOP_CHAIN = 3  # exit code of `slurm period` when the chain is over: the job does not fetch
# A period signalled this soon after it started was stopped before it could make progress
# (start-up: the ranks start and import, robots.txt, first contact), not broken. A period that
# hangs is signalled near its limit, long after: no row and no request then stall the chain.
STARTUP_SECONDS = 120.0
SIGNALLED_PREFIX = "signalled-"  # + the job id: the marker a period's script leaves (see above)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "RESIZING"})
# A period that sends requests but commits no row is normal when its servers are slow or paused
# (Retry-After, a breaker probing, rows waiting out a retry delay); one or two such periods in a
# row happen on healthy runs with short periods. Three in a row means something keeps failing
# without ever being given up: the chain stops rather than spend periods on it for ever.
WAITING_SHOWN = 3  # servers a period's record and a stall's reason name; the rest are counted
LOCK_POLL_SECONDS = 2.0  # a period waiting for the run's lock looks again this often


@dataclass
class ChainJob:
    id: str
    kind: str  # prep | profile | download
    period: int = 0  # download periods count from 1
    submitted: float = 0.0
    started: float | None = None
    rows_at_start: int | None = None
    submission: int = 1  # each `slurm submit` of the run starts a new one
    # What the period did, judged when the next one starts (None: not judged yet).
    rows_committed: int | None = None
    requests: int | None = None  # sent to servers by its fetch; 0 when no summary says so
    waiting: list[str] = field(default_factory=list)  # what its fetch waited on at its end
    out_of_space: str = ""  # its fetch stopped on a full disk: the line it printed
    # Slurm's time-limit signal reached it within STARTUP_SECONDS of its start: Slurm sends it
    # up to a minute early (it checks limits every 30 s), so a short period may be stopped
    # before its first request; that is not a broken setup.
    stopped_early: bool = False


@dataclass
class Chain:
    state: str = "running"  # running | finished | stalled | cancelled | period_limit |
    # blocked (another command held the run folder as a period started) | out_of_space
    reason: str = ""
    jobs: list[ChainJob] = field(default_factory=list)

    @property
    def downloads(self) -> list[ChainJob]:
        """The download periods of the latest submission."""
        latest = max((job.submission for job in self.jobs), default=1)
        return [job for job in self.jobs if job.kind == "download" and job.submission == latest]


def slurm_folder(layout: RunLayout) -> Path:
    return layout.root / "slurm"


def logs_folder(layout: RunLayout) -> Path:
    """The jobs' logs, and the markers their scripts leave (`signalled_marker`)."""
    return slurm_folder(layout) / "logs"


def read_chain(layout: RunLayout) -> Chain:
    path = slurm_folder(layout) / CHAIN_FILE
    if not path.exists():
        raise UserError(f"{layout.root} has no Slurm chain; start one with "
                        "`distributed-downloader slurm submit`")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(ChainJob)}  # a newer version's extra keys are skipped
    return Chain(data["state"], data.get("reason", ""),
                 [ChainJob(**{key: value for key, value in job.items() if key in known})
                  for job in data["jobs"]])


def write_chain(layout: RunLayout, chain: Chain) -> None:
    atomic_write_json(slurm_folder(layout) / CHAIN_FILE, asdict(chain))


def time_limit_seconds(limit: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not match:
        raise UserError(f"time_limit '{limit}' is not a Slurm time (e.g. 60, 02:00:00, 1-00:00)")
    days, first, second, third = match.groups()
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:
        return int(first) * 3600 + int(second) * 60 + int(third)
    return int(first) * 60 + int(second or 0)


# --- job scripts ------------------------------------------------------------------------------


def _command(*args: object) -> str:
    return " ".join(shlex.quote(str(arg)) for arg in
                    (sys.executable, "-m", "distributed_downloader", *args))


def _header(settings: Settings, layout: RunLayout, kind: str, lines: list[str]) -> list[str]:
    logs = logs_folder(layout)
    header = ["#!/bin/bash", f"#SBATCH --job-name=dd-{kind}",
              f"#SBATCH --output={logs}/%x-%j.out", "#SBATCH --open-mode=append"]
    if settings.cluster.account:
        header.append(f"#SBATCH --account={settings.cluster.account}")
    if settings.cluster.partition:
        header.append(f"#SBATCH --partition={settings.cluster.partition}")
    header += [f"#SBATCH {line}" for line in lines]
    return header + ["set -u", "# Written by `distributed-downloader slurm submit`; settings in "
                     f"{layout.config}", ""]


def _launcher(settings: Settings) -> str:
    # No binding to one core: a worker's decode threads use all of its cpus_per_worker.
    if settings.cluster.launcher == "mpirun":
        return "mpirun --oversubscribe --bind-to none -n $ranks"
    # --overcommit: the scheduling rank shares a core with a fetching rank.
    return f"srun --mpi={shlex.quote(settings.cluster.srun_mpi)} --overcommit --cpu-bind=none " \
           "--kill-on-bad-exit=1 -n $ranks"


def job_scripts(settings: Settings, layout: RunLayout) -> dict[str, str]:
    """The three job scripts of a chain, by kind."""
    out = layout.root
    cores = settings.cluster.workers_per_node * settings.cluster.cpu_per_worker
    fetch_flags = one_off_flags(settings, FETCH_SETTINGS)  # the submitting command's, for its chain
    prep = _header(settings, layout, "prep", [
        "--nodes=1", "--ntasks=1", f"--cpus-per-task={cores}",
        f"--time={settings.cluster.time_limit}"]) + [
        f"exec {_command('prep', settings.paths.input, '--output', out)}"]
    profile = _header(settings, layout, "profile", [
        "--nodes=1", "--ntasks=1", "--cpus-per-task=1",
        f"--time={settings.cluster.time_limit}"]) + [
        f"exec {_command('profile', out, *one_off_flags(settings, PROFILE_SETTINGS))}"]
    download = _header(settings, layout, "download", [
        f"--nodes={settings.cluster.max_nodes}",
        f"--ntasks-per-node={settings.cluster.workers_per_node}",
        f"--cpus-per-task={settings.cluster.cpu_per_worker}",
        f"--time={settings.cluster.time_limit}",
        f"--signal=B:USR1@{settings.cluster.stop_margin}"]) + [
        'if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 '
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi",
        "# Slurm's warning before the time limit (up to a minute early): note it for the next",
        "# period (this one was stopped, not broken) and pass it on: the ranks flush and exit.",
        "stopping=0",
        f"signalled={shlex.quote(str(logs_folder(layout)))}/{SIGNALLED_PREFIX}$SLURM_JOB_ID",
        "trap 'stopping=1; : > \"$signalled\"; "
        "[ -n \"${launched:-}\" ] && kill -USR1 $launched 2>/dev/null' USR1",
        "# Queue the next period behind this one, or end the chain when nothing is left.",
        f"{_command('slurm', 'period', out)}",
        f"decision=$?; if [ $decision = {STOP_CHAIN} ]; then exit 0; fi",
        "if [ $decision != 0 ]; then exit $decision; fi  # a real error: see above",
        "if [ $stopping = 1 ]; then exit 0; fi  # signalled already: the next period fetches",
        f"ranks=$(( SLURM_JOB_NUM_NODES * {settings.cluster.workers_per_node} + 1 ))",
        f"{_launcher(settings)} {_command('fetch', out, '--executor', 'mpi', *fetch_flags)} &",
        "launched=$!",
        "if [ $stopping = 1 ]; then kill -USR1 $launched 2>/dev/null; fi  # signalled meanwhile",
        "while true; do",
        "    wait $launched; status=$?",
        "    kill -0 $launched 2>/dev/null || break",
        "done",
        "# Stopped at the limit as asked: a success; the next period resumes.",
        'if [ $stopping = 1 ] && [ $status -ge 128 ]; then exit 0; fi',
        "exit $status",
    ]
    return {"prep": "\n".join(prep) + "\n", "profile": "\n".join(profile) + "\n",
            "download": "\n".join(download) + "\n"}


def sbatch(script: Path, after: str | None = None) -> str:
    command = ["sbatch", "--parsable"]
    if after:
        command.append(f"--dependency=afterany:{after}")
    try:
        completed = subprocess.run([*command, str(script)], capture_output=True, text=True,
                                   timeout=60)
    except FileNotFoundError:
        raise UserError("sbatch not found: is this a Slurm cluster? (on one machine, "
                        "`bash scripts/setup-cluster.sh` installs a single-node Slurm)") from None
    if completed.returncode != 0:
        raise UserError(f"sbatch {script.name} failed: {completed.stderr.strip()}")
    return completed.stdout.strip().split(";")[0]


# --- the chain --------------------------------------------------------------------------------


def submit_chain(settings: Settings, run_profile: bool = False) -> Chain:
    """Write the job scripts and submit prep (unless done) → profile (when asked, unless done)
    → download. Without a profile, each server's fetch starts carefully (first contact)."""
    from distributed_downloader.prep import prep_is_finished

    layout = RunLayout(settings.paths.run_folder(
        "slurm submit", "(--output or path_to_output_folder)").resolve())
    settings = settings.model_copy(update={"output": layout.root})
    if time_limit_seconds(settings.cluster.time_limit) <= settings.cluster.stop_margin:
        raise UserError(f"stop_margin ({settings.cluster.stop_margin} s) must be shorter than "
                        f"time_limit ({settings.cluster.time_limit})")
    if not prep_is_finished(layout) and settings.paths.input is None:
        raise UserError("slurm submit needs the input (INPUT or path_to_input) to prepare")
    with chain_lock(layout):
        return _submit(layout, settings, run_profile)


def _submit(layout: RunLayout, settings: Settings, run_profile: bool) -> Chain:
    from distributed_downloader.prep import prep_is_finished

    try:
        current = read_chain(layout)
    except UserError:
        current = None
    if current is not None and current.state == "running" and any(
            state in ACTIVE_STATES for state in job_states(current).values()):
        raise UserError(f"a chain is already running for {layout.root}; see `slurm status`, "
                        "or `slurm cancel` it first")
    _refuse_while_written(layout)
    folder = slurm_folder(layout)
    logs_folder(layout).mkdir(parents=True, exist_ok=True)
    save_settings(settings)
    scripts = {}
    for kind, text in job_scripts(settings, layout).items():
        scripts[kind] = folder / f"{kind}.sbatch"
        atomic_write_text(scripts[kind], text)
    chain = Chain(jobs=list(current.jobs) if current else [])
    submission = max((job.submission for job in chain.jobs), default=0) + 1
    previous = None
    steps = []
    if not prep_is_finished(layout):
        steps.append("prep")
    if run_profile and not layout.profile_summary.exists():
        steps.append("profile")
    for kind in steps:
        previous = sbatch(scripts[kind], previous)
        chain.jobs.append(ChainJob(previous, kind, submitted=time.time(),
                                   submission=submission))
    job = sbatch(scripts["download"], previous)
    chain.jobs.append(ChainJob(job, "download", 1, submitted=time.time(), submission=submission))
    chain.state, chain.reason = "running", ""
    write_chain(layout, chain)
    return chain


def _refuse_while_written(layout: RunLayout) -> None:
    """Submitting while another command writes into OUT would only queue jobs it refuses."""
    holder = current_writer(layout.run_lock)
    if holder is not None and holder.state() == LIVE:
        raise RunLocked(layout.root, holder)


def _batches_total(layout: RunLayout) -> int:
    return json.loads(layout.prep_summary.read_text())["batches"]


@contextmanager
def chain_lock(layout: RunLayout) -> Iterator[None]:
    """One reader-writer of chain.json at a time: a period starting, `submit`, `cancel`."""
    folder = slurm_folder(layout)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "chain.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_period(settings: Settings, job_id: str) -> tuple[bool, str]:
    """At a download period's start: fetch (and queue the next period), or end the chain."""
    layout = RunLayout(settings.paths.run_folder("slurm"))
    holder = _writer_at_start(layout, settings.cluster.run_lock_lease)
    with chain_lock(layout):
        return _start_period(layout, settings, job_id, holder)


def _writer_at_start(layout: RunLayout, lease: float) -> Holder | None:
    """Who writes into OUT as a period starts: an earlier period of the chain (ending as this
    one starts) or a holder gone quiet on another host is waited for, up to `lease` seconds;
    any other writer is returned at once. None: the period's fetch can take the lock."""
    deadline = time.monotonic() + lease
    ours = {job.id for job in read_chain(layout).jobs}
    while True:
        holder = current_writer(layout.run_lock)
        if holder is None:
            return None
        if (holder.slurm_job not in ours and holder.state() != FADING) or \
                time.monotonic() > deadline:
            return holder
        time.sleep(LOCK_POLL_SECONDS)


def _fetch_since(layout: RunLayout, since: float) -> dict[str, Any]:
    """The summary of a fetch that ended at or after `since`, or {} when there is none (none,
    an older one, an earlier one, unreadable)."""
    try:
        summary = json.loads((layout.root / "fetch_summary.json").read_text())
        ended_at = float(summary.get("ended_at", float("-inf")))
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    return summary if ended_at >= since else {}


def _waited_on(summary: dict[str, Any]) -> list[str]:
    """What a fetch was waiting on at its end (the first few), as `status` words it."""
    entries = summary.get("waiting") or []
    waiting = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        left = entry.get("seconds_left")
        detail = str(entry.get("reason", "?"))
        if isinstance(left, (int, float)):
            detail += f", {left:.0f} s left"
        waiting.append(f"{entry.get('server', '?')} ({detail})")
    if len(waiting) > WAITING_SHOWN:
        waiting[WAITING_SHOWN:] = [f"and {len(waiting) - WAITING_SHOWN:,} more"]
    return waiting


def _waiting_text(job: ChainJob) -> str:
    return f"; it was waiting on {', '.join(job.waiting)}" if job.waiting else ""


def _judge(layout: RunLayout, job: ChainJob, done: int) -> None:
    """Record what a finished period did: rows committed, requests sent, what it waited on."""
    assert job.started is not None
    job.rows_committed = max(0, done - (job.rows_at_start or 0))
    summary = _fetch_since(layout, job.started)
    try:
        job.requests = int(summary.get("requests_this_run", 0))
    except (TypeError, ValueError):
        job.requests = 0
    job.waiting = _waited_on(summary)
    job.out_of_space = str(summary.get("out_of_space") or "")
    job.stopped_early = _signalled_at(layout, job.id) - job.started < STARTUP_SECONDS


def _signalled_at(layout: RunLayout, job_id: str) -> float:
    """When Slurm's time-limit signal reached the job (its marker's time), or +inf."""
    try:
        return signalled_marker(layout, job_id).stat().st_mtime
    except FileNotFoundError:
        return math.inf


def signalled_marker(layout: RunLayout, job_id: str) -> Path:
    """Written by a period's job script when Slurm's time-limit signal reaches it."""
    return logs_folder(layout) / f"{SIGNALLED_PREFIX}{job_id}"


def _stall_reason(started: list[ChainJob], stall_periods: int) -> str:
    """Why the chain stalls after the judged periods `started`, or "" when it goes on."""
    last = started[-1]
    if last.rows_committed == 0 and not last.requests and not last.stopped_early:
        return (f"period {last.period} made no progress: it committed no row and sent no "
                f"request{_waiting_text(last)}; see its log")
    idle = list(itertools.takewhile(lambda job: job.rows_committed == 0, reversed(started)))
    if len(idle) < stall_periods:
        return ""
    requests = sum(job.requests or 0 for job in idle)
    if requests:
        why = f"though they sent {requests:,} requests{_waiting_text(last)}"
    else:  # each stopped by the time-limit signal before its first request
        why = ("and sent no request: each was stopped by Slurm's time-limit signal as it "
               "started (Slurm may send it up to a minute before time_limit - stop_margin: "
               f"give each period more time){_waiting_text(last)}")
    return (f"periods {idle[-1].period}-{last.period} committed no row in {len(idle)} "
            f"periods in a row {why}; see their logs")


def _start_period(layout: RunLayout, settings: Settings, job_id: str,
                  writer: Holder | None = None) -> tuple[bool, str]:
    chain = read_chain(layout)
    if chain.state != "running":
        return False, f"the chain is {chain.state}"
    if writer is not None:
        chain.state, chain.reason = "blocked", (
            f"{layout.root} is being written by {writer.describe()}; `slurm submit` again "
            "once it is done")
        write_chain(layout, chain)
        return False, chain.reason
    upgrade_layout(layout)
    done = committed_rows(layout)
    finished = len(layout.finished_markers())
    started = [job for job in chain.downloads if job.started is not None and job.id != job_id]
    if started:
        _judge(layout, started[-1], done)
    stall = _stall_reason(started, settings.cluster.stall_periods) if started else ""
    if finished >= _batches_total(layout):
        chain.state, chain.reason = "finished", f"all {finished:,} batches done"
    elif started and started[-1].out_of_space:
        # Another period would only fill the same disk: the user frees space, then submits.
        chain.state, chain.reason = "out_of_space", (
            f"period {started[-1].period} stopped: {started[-1].out_of_space}; free space, "
            "then `slurm submit` again")
    elif stall:
        chain.state, chain.reason = "stalled", stall
    elif len(chain.downloads) > settings.cluster.num_downloads:
        chain.state, chain.reason = "period_limit", \
            f"num_downloads ({settings.cluster.num_downloads})"
    if chain.state != "running":
        write_chain(layout, chain)
        return False, chain.reason
    job = next((job for job in chain.downloads if job.id == job_id), None)
    if job is None:  # started by hand with sbatch: adopt it
        submission = max((j.submission for j in chain.jobs), default=1)
        job = ChainJob(job_id, "download", len(chain.downloads) + 1, submitted=time.time(),
                       submission=submission)
        chain.jobs.append(job)
    job.started, job.rows_at_start = time.time(), done
    if len(chain.downloads) <= settings.cluster.num_downloads:
        script = slurm_folder(layout) / "download.sbatch"
        successor = sbatch(script, after=job_id)
        chain.jobs.append(ChainJob(successor, "download", job.period + 1, submitted=time.time(),
                                   submission=job.submission))
    write_chain(layout, chain)
    before = f" (period {started[-1].period}: {started[-1].rows_committed:,} rows, " \
        f"{started[-1].requests:,} requests)" if started else ""
    return True, f"period {job.period}: {done:,} rows committed so far{before}"


def job_states(chain: Chain) -> dict[str, str]:
    """Slurm's state of each job it still knows (finished jobs are forgotten after a while)."""
    ids = [job.id for job in chain.jobs]
    states: dict[str, str] = {}
    if not ids or shutil.which("squeue") is None:
        return states
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T"],
                            capture_output=True, text=True, timeout=60)
    for line in listed.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip()
    return states


def chain_status(settings: Settings) -> dict[str, Any]:
    layout = RunLayout(settings.paths.run_folder("slurm"))
    chain = read_chain(layout)
    states = job_states(chain)
    total_rows = json.loads(layout.prep_summary.read_text())["download_rows"] \
        if layout.prep_summary.exists() else None
    batches = _batches_total(layout) if layout.prep_summary.exists() else None
    return {
        "state": chain.state,
        "reason": chain.reason,
        "rows_done": committed_rows(layout),
        "rows": total_rows,
        "batches_done": len(layout.finished_markers()),
        "batches": batches,
        "jobs": [{**asdict(job), "slurm_state": states.get(job.id, "ENDED")}
                 for job in chain.jobs],
    }


def cancel_chain(settings: Settings) -> list[str]:
    """Stop the chain: no period starts any more, queued and running jobs are cancelled."""
    layout = RunLayout(settings.paths.run_folder("slurm"))
    with chain_lock(layout):  # no period can queue a successor behind our back
        chain = read_chain(layout)
        if chain.state == "running":
            chain.state, chain.reason = "cancelled", "by `slurm cancel`"
            write_chain(layout, chain)  # a period starting after this does not fetch
    active = [job_id for job_id, state in job_states(chain).items() if state in ACTIVE_STATES]
    if active:
        subprocess.run(["scancel", *active], capture_output=True, text=True, timeout=60)
    return active


def submit_tool(settings: Settings, name: str, options: list[str]) -> str:
    """One job running a post-processing tool on `tools_max_nodes` nodes under MPI; the tool
    resumes where it stopped, so submitting it again after a time limit goes on."""
    layout = RunLayout(settings.paths.run_folder("slurm tool").resolve())
    _refuse_while_written(layout)
    ranks = f"$(( SLURM_JOB_NUM_NODES * {settings.tools.tools_workers_per_node} + 1 ))"
    lines = _header(settings, layout, f"tool-{name}", [
        f"--nodes={settings.tools.tools_max_nodes}",
        f"--ntasks-per-node={settings.tools.tools_workers_per_node}",
        f"--cpus-per-task={settings.tools.tools_cpu_per_worker}",
        f"--time={settings.cluster.time_limit}"]) + [
        'if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 '
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi",
        f"ranks={ranks}",
        f"exec {_launcher(settings)} "
        f"{_command('tools', name, layout.root, '--executor', 'mpi', *options)}"]
    script = slurm_folder(layout) / f"tool-{name}.sbatch"
    logs_folder(layout).mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, "\n".join(lines) + "\n")
    return sbatch(script)
