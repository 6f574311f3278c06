"""The command line: commands only. Each command gathers settings and calls one stage.

Setting flags are generated from the settings model, so a flag, its YAML key and its help text
can never disagree (`--batch-size` is `batch_size`).
"""

from __future__ import annotations

import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from distributed_downloader import __version__
from distributed_downloader.config import SETTING_NAMES, InputFormat, Settings, load_settings
from distributed_downloader.errors import UserError
from distributed_downloader.executors import remember_stop_signals, stop_on_signals

console = Console()
err_console = Console(stderr=True)

PROGRESS_LOG_SECONDS = 5.0
ON_ERROR: list[Callable[[], None]] = []  # run before exiting on a user error (MPI: end all ranks)


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """A click parameter type for a settings annotation, and whether it is a boolean flag."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if annotation is bool:
        return None, True
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation in (int, float, str):
        return annotation, False
    return str, False  # lists (comma-separated) and mappings (YAML only, in practice)


def setting_option(name: str, *extra_flags: str) -> Callable[[Callable], Callable]:
    """A flag for the setting `name`, typed and described by the settings model."""
    field = Settings.model_fields[name]
    flag = "--" + name.replace("_", "-")
    click_type, is_flag = _click_type(field.annotation)
    default = field.get_default(call_default_factory=True)
    help_text = field.description or ""
    if default not in (None, [], {}):
        help_text += f" [default: {default}]"
    if is_flag:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if field.annotation == list[Path]:  # repeated: --previous A --previous B
        return click.option(flag, name, type=click.Path(path_type=Path), multiple=True,
                            callback=lambda ctx, param, value: list(value) or None,
                            help=help_text + " Repeat for several.")
    return click.option(flag, *extra_flags, name, type=click_type, default=None, help=help_text)


def setting_options(*names: str) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        for name in reversed(names):
            command = setting_option(name)(command)
        return command

    return decorate


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Settings file: YAML (ours or the original downloader's) or the first version's .env.",
)


FETCH_SETTINGS = (
    "workers", "image_size", "output_image_format", "output_format", "image_quality",
    "default_rate_limit",
    "max_rate_limit", "rate_multiplier", "max_connections_per_server", "max_retries",
    "server_down_after", "retry_delay", "retry_delay_max", "rate_increase_interval",
    "rate_growth_factor", "rate_decrease_factor", "throttle_memory", "throttle_memory_max",
    "overload_failure_share", "overload_min_failures", "breaker_failures", "breaker_max_pause",
    "timeout", "connect_timeout", "max_body_size", "max_image_pixels",
    "user_agent", "allow_network", "cpu_per_worker", "rates", "executor", "min_worker_rate",
    "contact", "opt_out_directives", "opt_out_server_after", "ignore_opt_out", "dns_servers",
    "respect_robots", "previous_mode",
)
PROFILE_SETTINGS = ("default_rate_limit", "max_rate_limit", "max_connections_per_server",
                    "profile_requests", "timeout", "connect_timeout", "user_agent", "contact",
                    "allow_network", "dns_servers", "rates", "respect_robots")
PREP_SETTINGS = ("url_column", "id_column", "keep_columns", "batch_size", "keep_duplicates",
                 "strict_image_format", "uuid", "memory_limit", "previous")


def gather_settings(config_file: Path | None, flags: dict[str, Any]) -> Settings:
    overrides = {name: value for name, value in flags.items() if name in SETTING_NAMES}
    settings, without_effect = load_settings(config_file, overrides)
    if without_effect:
        err_console.print(
            f"[yellow]note:[/] {config_file}: these keys of the original downloader have no "
            f"effect here (this version lays out its folders and scripts itself): "
            f"{', '.join(without_effect)}"
        )
    return settings


def _prep_progress() -> Callable:
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


def print_prep_summary(summary: dict[str, Any], output: Path) -> None:
    table = Table(title="prep summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
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
                          "above, and prep/rejected.parquet for rows that could not be used)",
                          highlight=False)
    console.print(f"batches in [bold]{output / 'prep' / 'batches'}[/]")
    if overlap is not None:
        console.print(f"overlap by server in [bold]{output / 'prep' / 'overlap.parquet'}[/]")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distributed-downloader")
def cli() -> None:
    """Download images from lists of URLs, on one machine or a cluster, politely and resumably.

    The usual run is one command: `distributed-downloader download INPUT --output OUT`.
    """


def input_options(command: Callable) -> Callable:
    """INPUT, --output and --format: what prep and download share."""
    command = click.option(
        "--format", "input_format", default=None,
        type=click.Choice(list(typing.get_args(InputFormat))),
        help=f"{Settings.model_fields['input_format'].description} [default: auto]")(command)
    command = click.option(
        "--output", "-o", "output", type=click.Path(path_type=Path), required=True,
        help=Settings.model_fields["output"].description)(command)
    return click.argument("input", type=click.Path(path_type=Path))(command)


def _prep(settings: Settings, force: bool = False) -> None:
    from distributed_downloader.prep import run_prep

    assert settings.output is not None
    report = _prep_progress()
    try:
        summary = run_prep(settings, force=force, progress=report)
    finally:
        report.stop()  # type: ignore[attr-defined]
    print_prep_summary(summary, settings.output)


@cli.command()
@input_options
@setting_options(*PREP_SETTINGS)
@click.option("--force", is_flag=True, help="Replace a finished prep in OUT/prep/.")
@config_option
def prep(input: Path, config_file: Path | None, force: bool, **flags: Any) -> None:
    """Filter INPUT, give every row a UUID, and cut it into batches by server."""
    _prep(gather_settings(config_file, {"input": input, **flags}), force)


def print_fetch_summary(summary: dict[str, Any], output: Path) -> None:
    table = Table(title="fetch summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
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


def _mpi_prelude() -> None:
    """First thing under --executor mpi: every rank but 0 becomes a worker here (and exits
    when rank 0 says so); on rank 0, any error from now on ends every rank."""
    from distributed_downloader.executors import mpi

    if ON_ERROR:
        return  # already done (download, then its fetch)
    comm = mpi.world()
    ON_ERROR.append(lambda: mpi.abort_world(2))
    if comm.Get_rank() != mpi.SCHEDULER_RANK:
        interrupted = mpi.run_worker_rank(comm)
        sys.exit(130 if interrupted else 0)
    stop_on_signals()


def _mpi_executor(settings: Settings) -> Any:
    from distributed_downloader.executors import mpi

    _mpi_prelude()
    return mpi.MpiExecutor(mpi.world(), settings)


def _fetch(settings: Settings, retry_errors: bool, started: float | None = None) -> None:
    from distributed_downloader.fetch import FetchPlan, run_fetch
    from distributed_downloader.progress import FetchProgress

    assert settings.output is not None
    executor = _mpi_executor(settings) if settings.executor == "mpi" else None
    remember_stop_signals()  # acted on when the executor starts, before any worker does
    progress: list[FetchProgress] = []

    def on_plan(plan: FetchPlan) -> None:
        if plan.reopened_rows:
            err_console.print(f"retrying {plan.reopened_rows:,} rows with retryable errors")
        progress.append(FetchProgress(err_console, plan.pending_rows))

    try:
        summary = run_fetch(settings, retry_errors, on_tick=lambda s: progress[0](s),
                            on_plan=on_plan, executor=executor, robots_fetched_since=started)
    finally:
        if progress:
            progress[0].stop()
    print_fetch_summary(summary, settings.output)
    if summary["opt_outs_ignored"]:
        err_console.print(f"[yellow]warning:[/] ignored the opt-out (X-Robots-Tag) of "
                          f"{summary['opt_outs_ignored']:,} images (--ignore-opt-out)")
    blocked = summary["errors_by_code"].get("blocked_address", 0)
    if blocked:
        err_console.print(f"[yellow]note:[/] {blocked:,} URLs were refused as blocked_address "
                          "(private, loopback or other non-public addresses); if you trust "
                          "them, `--allow-network CIDR` admits them and `fetch --retry-errors` "
                          "fetches them", highlight=False)
    if summary["interrupted"]:
        sys.exit(130)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
@setting_options(*FETCH_SETTINGS)
@click.option("--retry-errors", is_flag=True,
              help="Fetch again the rows whose error is retryable (timeouts, 429, 5xx, ...).")
@config_option
def fetch(output: Path, config_file: Path | None, retry_errors: bool, **flags: Any) -> None:
    """Download the batches that prep wrote in OUTPUT; re-run to resume."""
    _fetch(gather_settings(config_file, {"output": output, **flags}), retry_errors)


@cli.command()
@input_options
@setting_options(*PREP_SETTINGS, *FETCH_SETTINGS, "profile_requests")
@click.option("--retry-errors", is_flag=True,
              help="Fetch again the rows whose error is retryable (timeouts, 429, 5xx, ...).")
@click.option("--no-profile", is_flag=True,
              help="Skip probing the servers; start every server at default_rate_limit.")
@click.option("--force", is_flag=True,
              help="Prepare INPUT again although OUT holds a prep (of another input too), as "
              "long as nothing was downloaded into OUT yet.")
@config_option
def download(input: Path, config_file: Path | None, retry_errors: bool, no_profile: bool,
             force: bool, **flags: Any) -> None:
    """One shot: prep INPUT into OUT, profile its servers (each unless done), then fetch;
    re-run to resume."""
    from distributed_downloader.fetch import check_output_settings
    from distributed_downloader.prep import check_same_input, prep_is_finished
    from distributed_downloader.storage import RunLayout

    started = time.time()
    settings = gather_settings(config_file, {"input": input, **flags})
    assert settings.output is not None
    layout = RunLayout(settings.output)
    if settings.executor == "mpi":
        _mpi_prelude()  # the other ranks fetch; rank 0 alone preps and profiles
    check_output_settings(layout, settings)
    if not settings.contact:
        err_console.print("[yellow]note:[/] no contact in the User-Agent; set --contact "
                          "EMAIL_OR_URL so that hosts can reach you before they block you")
    if prep_is_finished(layout) and force:
        _prep(settings, force=True)  # refused once anything was downloaded
    elif prep_is_finished(layout):
        check_same_input(layout, input)
        err_console.print(f"prep: already done in {layout.prep}, resuming")
    else:
        _prep(settings)
    if not no_profile and not layout.profile_summary.exists():
        _profile(settings)
    _fetch(settings, retry_errors, started)  # robots.txt files fetched since: used as they are


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


def _profile(settings: Settings) -> None:
    from distributed_downloader.profile import run_profile

    assert settings.output is not None
    print_profile_summary(run_profile(settings), settings.output)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
@setting_options(*PROFILE_SETTINGS)
@config_option
def profile(output: Path, config_file: Path | None, **flags: Any) -> None:
    """Probe every server of OUTPUT (a few requests each, one a second at most) for a safe
    starting rate; writes OUTPUT/profiles/servers.csv."""
    _profile(gather_settings(config_file, {"output": output, **flags}))


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (for scripts).")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write an HTML page with plots (and the plots as PNG beside it).")
def status(output: Path, as_json: bool, report_path: Path | None) -> None:
    """Where the run in OUTPUT stands: done, failed by code, speed, ETA, servers; works while
    a fetch runs and after."""
    import json

    from distributed_downloader.plan import duration
    from distributed_downloader.status import run_status

    result = run_status(output)
    if report_path is not None:
        from distributed_downloader.report import write_report

        written = write_report(result, report_path)
        err_console.print(f"report: {', '.join(str(path) for path in written)}")
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        return
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
        table.add_column(column, justify="left" if column in ("server", "state") else "right")
    for row in result["busiest"] + result["slowest"]:
        table.add_row(row["server"], f"{row['done']:,} / {row['rows']:,}",
                      "—" if row["rate"] is None else f"{row['rate']:.3g}",
                      f"{row['throttled']:,}", row["state"],
                      duration(row["remaining_seconds"]) if row["remaining_seconds"] else "—")
    if result["busiest"]:
        console.print(table)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--fix", is_flag=True,
              help="Move broken batches aside (OUT/verify/quarantine/) so fetch redoes them.")
@click.option("--workers", type=int, default=None, help="Checking processes [default: cores].")
def verify(output: Path, fix: bool, workers: int | None) -> None:
    """Check every finished batch of OUTPUT: files readable, counts, images decode and match
    their hashes, each prepared UUID exactly once. Exit code 1 when something is broken."""
    from distributed_downloader.verify import run_verify

    summary = run_verify(output, fix, workers)
    console.print(f"verify: {summary['batches_checked']:,} finished batches, "
                  f"{summary['rows_checked']:,} rows, {summary['images_decoded']:,} images "
                  f"decoded in {summary['seconds']:.1f} s; {summary['batches_unfinished']:,} "
                  f"batches not finished (not checked)")
    for batch in summary["broken"]:
        more = f" (+{batch['more_problems']} more)" if batch["more_problems"] else ""
        console.print(f"[red]broken[/] {batch['batch']}: {'; '.join(batch['problems'])}{more}",
                      highlight=False, soft_wrap=True)
    if summary["moved_aside"]:
        console.print(f"moved {len(summary['moved_aside'])} broken batches aside; run fetch "
                      "to download them again")
    elif summary["broken"]:
        console.print("run `verify --fix`, then fetch, to download them again")
        sys.exit(1)
    else:
        console.print("[green]every finished batch is sound[/]")


TOOL_NAMES = ("resize", "image_verification", "duplication_based", "size_based")


def tool_options(command: Callable) -> Callable:
    """What a tool run takes: its own options, and where it runs."""
    for option in reversed([
        click.option("--image-size", type=int, default=None,
                     help="resize: the new longest side [default: new_resize_size, 720]."),
        click.option("--min-side", type=int, default=None,
                     help="size_based: smallest side an original must have [default: "
                     "threshold_size, 224]."),
        click.option("--restart", is_flag=True, help="Start the tool over (drop its results)."),
        click.option("--workers", type=int, default=None, help="Local processes [default: "
                     "tools_num_workers, or one per core when that is 1]."),
        click.option("--executor", type=click.Choice(["local", "mpi"]), default="local",
                     help="local processes, or MPI ranks (under mpirun/srun)."),
        config_option,
    ]):
        command = option(command)
    return command


def _tool_settings(name: str, output: Path, config_file: Path | None, image_size: int | None,
                   min_side: int | None) -> tuple[Settings, dict[str, Any]]:
    settings = gather_settings(config_file, {"output": output})
    options: dict[str, Any] = {}
    if name == "resize":
        options = {"image_size": image_size or settings.new_resize_size,
                   "image_quality": settings.image_quality}
    elif name == "size_based":
        options = {"min_side": settings.threshold_size if min_side is None else min_side}
    return settings, options


@cli.command()
@click.argument("name", type=click.Choice(TOOL_NAMES))
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@tool_options
def tools(name: str, output: Path, config_file: Path | None, image_size: int | None,
          min_side: int | None, restart: bool, workers: int | None, executor: str) -> None:
    """Post-process a download: resize, image_verification, duplication_based, size_based.
    Results go to OUTPUT/tools/NAME/; a re-run resumes."""
    from distributed_downloader.tools import run_tool

    settings, options = _tool_settings(name, output, config_file, image_size, min_side)
    if executor == "mpi":
        from distributed_downloader.executors import mpi

        comm = mpi.world()
        ON_ERROR.append(lambda: mpi.abort_world(2))
        if comm.Get_rank() != mpi.SCHEDULER_RANK:
            mpi.serve_tasks(comm)
            return
        try:
            summary = run_tool(name, output, options, restart, executor="mpi")
        finally:
            mpi.release_task_ranks()
    else:
        if workers is None and settings.tools_num_workers > 1:
            workers = settings.tools_num_workers
        summary = run_tool(name, output, options, restart, workers)
    details = ", ".join(f"{key.replace('_', ' ')} {value:,}" for key, value in summary.items()
                        if isinstance(value, int) and key != "finished_at")
    console.print(f"tools {name}: {details} in {summary['seconds']:.1f} s")
    console.print(f"results in [bold]{output / 'tools' / name}[/]")


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
@setting_option("max_nodes", "--nodes")
@setting_options("workers_per_node", "cpu_per_worker", "default_rate_limit", "min_worker_rate",
                 "rates")
@click.option("--worker-speed", type=float, default=None,
              help="Images/s one worker core decodes and encodes [default: 35, measured by "
              "benchmarks/throughput.py].")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@config_option
def plan(output: Path, config_file: Path | None, worker_speed: float | None, as_json: bool,
         **flags: Any) -> None:
    """Expected duration of OUTPUT's download on a cluster, and which servers bound it."""
    import json

    from distributed_downloader.plan import DEFAULT_WORKER_SPEED, duration, make_plan

    settings = gather_settings(config_file, {"output": output, **flags})
    result = make_plan(settings, settings.max_nodes, settings.workers_per_node,
                       worker_speed or DEFAULT_WORKER_SPEED)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"plan: {result['rows']:,} rows on {result['servers']:,} servers; {result['nodes']} "
        f"nodes × {result['workers_per_node']} workers = {result['workers']} workers "
        f"(decode capacity {result['capacity']:,.0f} images/s)")
    console.print(
        f"expected duration: [bold]{duration(result['seconds'])}[/] "
        f"(average {result['average_rate']:,.0f} images/s; the cores alone would need "
        f"{duration(result['capacity_bound_seconds'])})")
    if result["skipped_rows"]:
        console.print(f"not fetched (servers excluded or down): {result['skipped_rows']:,} rows")
    table = Table(title="servers that bound the run", title_justify="left")
    for column in ("server", "rows", "rate/s", "workers", "alone needs", "share of run"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for row in result["largest"]:
        table.add_row(row["server"], f"{row['rows']:,}", f"{row['rate']:g}",
                      str(row["workers"]), duration(row["alone_seconds"]),
                      f"{row['share_of_run']:.0%}")
    console.print(table)
    console.print(
        f"the original downloader's nominal ceiling (42 ranks × 10 requests/s = 420/s) would "
        f"claim {duration(result['original_nominal_seconds'])}; no schedule can beat the "
        f"largest server's rows ÷ its rate")


CLUSTER_SETTINGS = ("account", "partition", "time_limit", "stop_margin", "max_nodes",
                    "workers_per_node", "num_downloads", "launcher", "srun_mpi")


@cli.group()
def slurm() -> None:
    """Run a download as a chain of time-limited Slurm jobs: submit, status, cancel."""


@slurm.command()
@click.argument("input", type=click.Path(path_type=Path), required=False)
@click.option("--output", "-o", "output", type=click.Path(path_type=Path),
              help=Settings.model_fields["output"].description)
@setting_options(*CLUSTER_SETTINGS, *PREP_SETTINGS, *FETCH_SETTINGS, "profile_requests")
@config_option
def submit(input: Path | None, config_file: Path | None, **flags: Any) -> None:
    """Write the job scripts into OUT/slurm/ and submit prep → profile → download periods,
    each after the last; periods chain until every batch is done."""
    from distributed_downloader.executors.slurm import submit_chain

    settings = gather_settings(config_file, {"input": input, **flags})
    chain = submit_chain(settings)
    assert settings.output is not None
    for job in chain.jobs[-3:]:
        label = f"download period {job.period}" if job.kind == "download" else job.kind
        console.print(f"submitted {label}: job {job.id}")
    console.print(f"scripts and logs in [bold]{settings.output.resolve() / 'slurm'}[/]; watch "
                  f"with `distributed-downloader slurm status {settings.output}`")


@slurm.command(name="status")
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def slurm_status(output: Path, as_json: bool) -> None:
    """Show the chain's jobs and the run's progress."""
    import json

    from distributed_downloader.executors.slurm import chain_status

    status = chain_status(gather_settings(None, {"output": output}))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    rows, batches = status["rows"], status["batches"]
    console.print(f"chain: [bold]{status['state']}[/] {status['reason']}")
    if rows is not None:
        console.print(f"progress: {status['rows_done']:,} / {rows:,} rows, "
                      f"{status['batches_done']:,} / {batches:,} batches")
    table = Table(show_header=True, title_justify="left")
    for column in ("job", "step", "Slurm state", "started", "rows at start"):
        table.add_column(column)
    for job in status["jobs"]:
        step = f"download {job['period']}" if job["kind"] == "download" else job["kind"]
        started = time.strftime("%H:%M:%S", time.localtime(job["started"])) \
            if job["started"] else ""
        at_start = "" if job["rows_at_start"] is None else f"{job['rows_at_start']:,}"
        table.add_row(job["id"], step, job["slurm_state"], started, at_start)
    console.print(table)


@slurm.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
def cancel(output: Path) -> None:
    """Stop the chain: cancel its queued and running jobs (committed chunks stay)."""
    from distributed_downloader.executors.slurm import cancel_chain

    cancelled = cancel_chain(gather_settings(None, {"output": output}))
    console.print(f"cancelled jobs: {', '.join(cancelled) or 'none was active'}")


@slurm.command(hidden=True)
@click.argument("output", type=click.Path(path_type=Path, file_okay=False))
def period(output: Path) -> None:
    """Inside a download job: queue the next period and go on, or end the chain."""
    import os

    from distributed_downloader.executors.slurm import STOP_CHAIN, start_period

    fetch, reason = start_period(gather_settings(None, {"output": output}),
                                 os.environ.get("SLURM_JOB_ID", "manual"))
    console.print(f"slurm period: {reason}")
    if not fetch:
        sys.exit(STOP_CHAIN)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--to", "to_format", type=click.Choice(["webdataset", "files", "hdf5"]),
              required=True, help="The format to write, under OUTPUT/export/FORMAT/.")
@click.option("--restart", is_flag=True, help="Start the export over.")
@click.option("--workers", type=int, default=None, help="Processes [default: one per core].")
def export(output: Path, to_format: str, restart: bool, workers: int | None) -> None:
    """Convert the finished batches of a Parquet download into WebDataset shards, image files
    or HDF5, without downloading again; a re-run resumes."""
    from distributed_downloader.tools import run_tool

    summary = run_tool(to_format, output, {}, restart, workers)
    console.print(f"export {to_format}: {summary.get('images', 0):,} images, "
                  f"{summary.get('errors', 0):,} errors in {summary['batches_this_run']:,} "
                  f"batches this run ({summary['batches_done']:,} in all), "
                  f"{summary['seconds']:.1f} s")
    console.print(f"in [bold]{output / 'export' / to_format}[/]")


@slurm.command(name="tool")
@click.argument("name", type=click.Choice(TOOL_NAMES))
@click.argument("output", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--image-size", type=int, default=None, help="resize: the new longest side.")
@click.option("--min-side", type=int, default=None, help="size_based: smallest side.")
@config_option
def slurm_tool(name: str, output: Path, image_size: int | None, min_side: int | None,
               config_file: Path | None) -> None:
    """Submit a post-processing tool as one MPI job (tools_max_nodes × tools_workers_per_node);
    submit it again to resume after a time limit."""
    from distributed_downloader.executors.slurm import submit_tool

    settings = gather_settings(config_file, {"output": output})
    options = [*(["--image-size", str(image_size)] if image_size else []),
               *(["--min-side", str(min_side)] if min_side is not None else [])]
    job = submit_tool(settings, name, options)
    console.print(f"submitted tools {name}: job {job}; log in {output / 'slurm' / 'logs'}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        for action in ON_ERROR:
            action()
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        for action in ON_ERROR:
            action()
        sys.exit(130)
    except Exception:
        for action in ON_ERROR:  # under MPI: the other ranks must not wait for rank 0
            action()
        raise
