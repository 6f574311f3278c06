"""What the commands run, top to bottom: each stage with its progress and summary, and
`download` (prep unless done, profile when asked, fetch) as one sequence. The CLI gathers the
settings and calls one function here; the stages themselves know nothing of terminals."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_downloader.config import Settings
from distributed_downloader.stop_signals import remember_stop_signals
from distributed_downloader.render import (
    err_console,
    fetch_notes,
    fetch_plan_notes,
    prep_progress,
    print_fetch_summary,
    print_prep_summary,
    print_profile_summary,
    print_tool_summary,
)

# Run with the exit code before exiting on an error (MPI: end all ranks).
ON_ERROR: list[Callable[[int], None]] = []


def start_mpi() -> None:
    from distributed_downloader.executors import mpi

    mpi.start(ON_ERROR)


def run_lock(output: Path, command: str, settings: Settings,
             mpi_ranks: bool = False) -> contextlib.AbstractContextManager[Any]:
    """OUT's lock (runlock.py) for a command that writes into OUT. Under MPI rank 0 holds it
    for every rank (`mpi_ranks`: they wait for its word); refused, it sends them home first, so
    that every rank ends cleanly and the message is printed once."""
    from distributed_downloader.runlock import hold_run_lock

    def send_ranks_home() -> None:
        from distributed_downloader.executors import mpi

        mpi.release_task_ranks()
        ON_ERROR.clear()  # every rank was told: nothing to abort

    return hold_run_lock(output, command, settings.cluster.run_lock_lease,
                         send_ranks_home if mpi_ranks else None)


def prep(settings: Settings, force: bool = False) -> None:
    from distributed_downloader.prep import run_prep

    output = settings.paths.run_folder("prep")
    report = prep_progress()
    try:
        summary = run_prep(settings, force=force, progress=report)
    finally:
        report.stop()  # type: ignore[attr-defined]
    print_prep_summary(summary, output)


def profile(settings: Settings) -> None:
    from distributed_downloader.profile import run_profile

    print_profile_summary(run_profile(settings), settings.paths.run_folder("profile"))


def fetch(settings: Settings, retry_errors: bool, started: float | None = None) -> None:
    """Fetch what is left, with a progress bar; exits 130 when interrupted. robots.txt files
    fetched since `started` (by this download's profile) are used as they are."""
    from distributed_downloader.fetch import Executor, FetchPlan, run_fetch
    from distributed_downloader.progress import FetchProgress

    output = settings.paths.run_folder("fetch")
    executor: Executor
    if settings.cluster.executor == "mpi":
        from distributed_downloader.executors import mpi

        start_mpi()
        executor = mpi.MpiExecutor(mpi.world(), settings)
    else:
        from distributed_downloader.executors.local import LocalExecutor

        executor = LocalExecutor(settings)
    remember_stop_signals()  # acted on when the executor starts, before any worker does
    progress: list[FetchProgress] = []

    def on_plan(plan: FetchPlan) -> None:
        fetch_plan_notes(plan)
        progress.append(FetchProgress(err_console, plan.rows_total, plan.rows_committed))

    try:
        summary = run_fetch(settings, executor, retry_errors, on_tick=lambda s: progress[0](s),
                            on_plan=on_plan, robots_fetched_since=started)
    finally:
        if progress:
            progress[0].stop()
    print_fetch_summary(summary, output)
    fetch_notes(summary)
    if summary["interrupted"]:
        sys.exit(130)


def download(settings: Settings, input: Path, retry_errors: bool, force: bool,
             run_profile: bool) -> None:
    """One shot: prep INPUT into OUT (unless done), profile when asked, then fetch."""
    from distributed_downloader.fetch import check_output_settings
    from distributed_downloader.formats import require_format
    from distributed_downloader.prep import check_same_input, prep_is_finished
    from distributed_downloader.storage import RunLayout

    started = time.time()
    output = settings.paths.run_folder("download")
    layout = RunLayout(output)
    if settings.cluster.executor == "mpi":
        start_mpi()  # the other ranks fetch; rank 0 alone preps and profiles
    require_format(settings.store.output_format)
    with run_lock(output, "download", settings, mpi_ranks=settings.cluster.executor == "mpi"):
        check_output_settings(layout, settings)
        if not settings.network.contact:
            err_console.print("[yellow]note:[/] no contact in the User-Agent; set --contact "
                              "EMAIL_OR_URL so that hosts can reach you before they block you")
        if prep_is_finished(layout) and force:
            prep(settings, force=True)  # refused once anything was downloaded
        elif prep_is_finished(layout):
            check_same_input(layout, input)
            err_console.print(f"prep: already done in {layout.prep}, resuming")
        else:
            prep(settings)
        if run_profile and not layout.profile_summary.exists():
            profile(settings)
        fetch(settings, retry_errors, started)


def tool(name: str, output: Path, settings: Settings, options: dict[str, Any], restart: bool,
         workers: int | None, executor: str) -> None:
    """A post-processing tool over the run, on local processes or MPI ranks."""
    from distributed_downloader.tools import run_tool

    if executor == "mpi":
        from distributed_downloader.executors import mpi
        from distributed_downloader.executors.batches import serve_batches

        comm = mpi.world()
        ON_ERROR.append(mpi.abort_world)
        if comm.Get_rank() != mpi.SCHEDULER_RANK:
            serve_batches(comm)
            return
        with run_lock(output, f"tools {name}", settings, mpi_ranks=True):
            try:
                summary = run_tool(name, output, options, restart, executor="mpi")
            finally:
                mpi.release_task_ranks()
    else:
        if workers is None and settings.tools.tools_num_workers > 1:
            workers = settings.tools.tools_num_workers
        with run_lock(output, f"tools {name}", settings):
            summary = run_tool(name, output, options, restart, workers)
    print_tool_summary(name, output, summary)
