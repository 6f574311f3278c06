"""What the commands print: settings, progress, summaries, status. Tables and progress go to
the terminal (Rich); piped or logged output keeps each line whole."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distributed_downloader.config import LoadedSettings

# Piped or logged output is not cut at 80 columns: a line stays a line (and a number whole).
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

PROGRESS_LOG_SECONDS = 5.0  # prep's progress in a log: a line per few seconds, not per chunk


RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")  # set by MPI launchers


def announce_settings(loaded: LoadedSettings) -> None:
    """One line per setting that is not at its default, with where it came from."""
    rows = loaded.not_default()
    if not rows or any(int(os.environ.get(name, 0)) > 0 for name in RANK_VARIABLES):
        return  # said once, by rank 0 of an MPI run
    one_off = loaded.settings.one_off
    lines = ["settings not at their default:"]
    for name, value, source in rows:
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        note = ", this command only (--save-overrides keeps it)" if name in one_off else ""
        lines.append(f"  {name} = {shown}  ({source}{note})")
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


def prep_progress() -> Callable:
    """Live row counts on a terminal; a log line every few seconds otherwise."""
    from distributed_downloader.prep import PrepProgress

    last = [0.0]
    status = err_console.status("prep: starting") if err_console.is_terminal else None
    if status:
        status.start()

    def report(progress: PrepProgress) -> None:
        text = (
            f"prep: {progress.phase} — {progress.rows_read:,} rows read, "
            f"{progress.rows_kept:,} kept"
        )
        if status:
            status.update(text)
        elif time.monotonic() - last[0] >= PROGRESS_LOG_SECONDS:
            last[0] = time.monotonic()
            err_console.print(text)

    report.stop = status.stop if status else (lambda: None)  # type: ignore[attr-defined]
    return report


def facts_table(title: str) -> Table:
    """A two-column table of named counts (the numbers right-aligned, never wrapped)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right", no_wrap=True)
    return table


def print_prep_summary(summary: dict[str, Any], output: Path) -> None:
    table = facts_table("prep summary")
    table.add_row("rows read", f"{summary['rows_read']:,}")
    table.add_row("rows kept", f"{summary['rows_kept']:,}")
    for reason, count in summary["dropped"].items():
        table.add_row(f"  dropped: {reason}", f"{count:,}")
    if summary.get("kept_without_image_format"):
        table.add_row("  kept without an image/* format",
                      f"{summary['kept_without_image_format']:,}")
    table.add_row("duplicate URLs", f"{summary['duplicates']:,}")
    table.add_row("rows to download", f"{summary['download_rows']:,}")
    overlap = summary.get("overlap")
    if overlap is not None:
        table.add_row("  of which in an earlier download", f"{summary['reused_rows']:,}")
        table.add_row("URLs new", f"{overlap['new']:,}")
        table.add_row("URLs reused (stored earlier)", f"{overlap['reused']:,}")
        table.add_row("URLs carried as errors", f"{overlap['carried_errors']:,}")
        table.add_row("URLs fetched again", f"{overlap['fetched_again']:,}")
        table.add_row("URLs gone since", f"{overlap['gone']:,}")
    table.add_row("servers", f"{summary['servers']:,}")
    table.add_row("batches", f"{summary['batches']:,}")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    table.add_row("peak memory (MiB)", f"{summary['peak_memory_mib']:.0f}")
    console.print(table)
    for warning in summary.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}")
    if summary["rows_kept"] == 0 and summary["dropped"]:
        reason, count = max(summary["dropped"].items(), key=lambda item: item[1])
        err_console.print(f"[yellow]warning:[/] no row kept: {count:,} of "
                          f"{summary['rows_read']:,} were dropped as {reason} (see the counts "
                          "above; prep/dropped.parquet lists the rows each filter left out, "
                          "prep/rejected.parquet those that could not be used)",
                          highlight=False)
    console.print(f"batches in [bold]{output / 'prep' / 'batches'}[/]")
    if overlap is not None:
        console.print(f"overlap by server in [bold]{output / 'prep' / 'overlap.parquet'}[/]")


def print_profile_summary(summary: dict[str, Any], output: Path) -> None:
    parts = [f"{status} {count:,}" for status, count in sorted(summary["by_status"].items())]
    if summary["excluded"]:
        parts.append(f"excluded by hand {summary['excluded']:,}")
    if summary["overridden"]:
        parts.append(f"rates set by hand {summary['overridden']:,}")
    console.print(f"profile: {summary['servers']:,} servers probed with "
                  f"{summary['requests']:,} requests in {summary['seconds']:.1f} s "
                  f"({', '.join(parts)})")
    console.print(f"rates in [bold]{output / 'profiles' / 'servers.csv'}[/]")


def print_fetch_summary(summary: dict[str, Any], output: Path) -> None:
    table = facts_table("fetch summary")
    table.add_row("batches done", f"{summary['batches_done']:,} / {summary['batches']:,}")
    table.add_row("images stored", f"{summary['successes']:,}")
    table.add_row("errors", f"{summary['errors']:,}")
    for code, count in summary["errors_by_code"].items():
        table.add_row(f"  {code}", f"{count:,}")
    table.add_row("fetched this run", f"{summary['fetched_this_run']:,}")
    table.add_row("images/s this run", f"{summary['images_per_second']:.1f}")
    table.add_row("throttled answers (429/503)", f"{summary['throttled_this_run']:,}")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    console.print(table)
    console.print(f"images in [bold]{output / 'downloaded_images'}[/]")
    if not summary["finished"]:
        err_console.print("[yellow]not finished:[/] run the same command again to resume")


def print_tool_summary(name: str, output: Path, summary: dict[str, Any]) -> None:
    details = ", ".join(f"{key.replace('_', ' ')} {value:,}" for key, value in summary.items()
                        if isinstance(value, int) and key != "finished_at")
    console.print(f"tools {name}: {details} in {summary['seconds']:.1f} s")
    console.print(f"results in [bold]{output / 'tools' / name}[/]")


def fetch_notes(summary: dict[str, Any]) -> None:
    """What a user should know after a fetch: opt-outs ignored, addresses refused."""
    if summary["opt_outs_ignored"]:
        err_console.print(f"[yellow]warning:[/] ignored the opt-out (X-Robots-Tag) of "
                          f"{summary['opt_outs_ignored']:,} images (--ignore-opt-out)")
    blocked = summary["errors_by_code"].get("blocked_address", 0)
    if blocked:
        err_console.print(f"[yellow]note:[/] {blocked:,} URLs were refused as blocked_address "
                          "(private, loopback or other non-public addresses); if you trust "
                          "them, `--allow-network CIDR` admits them and `fetch --retry-errors` "
                          "fetches them", highlight=False)


def fetch_plan_notes(plan: Any) -> None:
    """Before the bar: rows retried, and how much an earlier run did."""
    if plan.reopened_rows:
        err_console.print(f"retrying {plan.reopened_rows:,} rows with retryable errors")
    if plan.rows_committed:
        err_console.print(f"resuming: {plan.rows_committed:,} of {plan.rows_total:,} rows "
                          "were done before", highlight=False)


def print_status(result: dict[str, Any], output: Path) -> None:
    """`status` on a terminal or a log: phase, counts, speed and ETA, the servers that bind."""
    from distributed_downloader.plan import duration

    share = result["done"] / result["rows"] if result["rows"] else 1.0
    console.print(f"{output}: [bold]{result['phase']}[/]")
    console.print(f"rows: {result['done']:,} / {result['rows']:,} done ({share:.1%}); "
                  f"{result['successes']:,} images, {result['errors']:,} errors; batches "
                  f"{result['batches_done']:,} / {result['batches']:,}; servers done "
                  f"{result['servers_done']:,} / {result['servers']:,}")
    if result["errors_by_code"]:
        console.print("errors: " + ", ".join(f"{code} {count:,}" for code, count
                                             in result["errors_by_code"].items()))
    reused = result["reused"]
    if reused["previous"]:
        overlap = reused["overlap"] or {}
        console.print(f"reused: {reused['rows']:,} rows taken from earlier downloads (images "
                      f"or final errors), not requested ({', '.join(reused['previous'])}); URLs "
                      + ", ".join(f"{kind.replace('_', ' ')} {count:,}"
                                  for kind, count in overlap.items()))
    eta = duration(result["eta_seconds"]) if result["eta_seconds"] else "—"
    bound = f" (bound by {result['bound_by']})" if result["bound_by"] else ""
    console.print(f"speed: {result['images_per_second']:.1f} images/s over the last minutes; "
                  f"ETA {eta}{bound}")
    for wait in result["waiting"][:10]:
        left = "" if wait["seconds_left"] is None else f" {duration(wait['seconds_left'])}"
        console.print(f"waiting: {wait['server']}: {wait['reason']}{left}", highlight=False)
    table = Table(title="busiest and slowest servers", title_justify="left")
    for column in ("server", "done / rows", "rate/s", "429s", "state", "time left"):
        table.add_column(column, justify="left" if column in ("server", "state") else "right",
                         no_wrap=column != "server")
    for row in result["busiest"] + result["slowest"]:
        table.add_row(row["server"], f"{row['done']:,} / {row['rows']:,}",
                      "—" if row["rate"] is None else f"{row['rate']:.3g}",
                      f"{row['throttled']:,}", row["state"],
                      duration(row["remaining_seconds"]) if row["remaining_seconds"] else "—")
    if result["busiest"]:
        console.print(table)
