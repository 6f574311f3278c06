"""The command line: commands only. Each command gathers settings and calls one stage.

Setting flags are generated from the settings model, so a flag, its YAML key and its help text
can never disagree (`--batch-size` is `batch_size`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from distributed_downloader import __version__
from distributed_downloader.config import (
    FETCH_SETTINGS,
    PREP_SETTINGS,
    PROFILE_SETTINGS,
    SETTING_NAMES,
    InputFormat,
    Settings,
    load_settings,
    setting_field,
)
from distributed_downloader.errors import (
    EXIT_INTERRUPTED,
    EXIT_OUT_OF_SPACE,
    EXIT_USER_ERROR,
    UserError,
    is_out_of_space,
    require_module,
)
from distributed_downloader import pipeline, render
from distributed_downloader.stop_signals import remember_stop_signals
from distributed_downloader.render import console, err_console



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
    field = setting_field(name)
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
    if field.annotation == list[str]:
        help_text += " Several: comma-separated, a,b."
    return click.option(flag, *extra_flags, name, type=click_type, default=None, help=help_text)


def hidden_alias(flag: str, name: str, click_type: Any) -> Callable[[Callable], Callable]:
    """A flag an earlier version used for the setting `name`: accepted, not shown. Given with
    the setting's own flag, the last one on the command line wins."""
    def keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.params[name] = value
        return value

    return click.option(flag, f"_alias_{name}", type=click_type, default=None, hidden=True,
                        expose_value=False, callback=keep)


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


def run_folder(exists: bool = False) -> Callable[[Callable], Callable]:
    """The run's folder, named the same way on every command: `OUT` or `--output/-o OUT`."""
    path = click.Path(path_type=Path, file_okay=False, exists=exists)

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def command(*args: Any, output: Path | None = None, output_option: Path | None = None,
                    **kwargs: Any) -> Any:
            if output is not None and output_option is not None and output != output_option:
                raise click.UsageError(f"two run folders given: {output} and --output "
                                       f"{output_option}")
            folder = output or output_option
            if folder is None:
                raise click.UsageError("the run's folder is missing: give it as OUTPUT or "
                                       "--output/-o OUTPUT")
            return function(*args, output=folder, **kwargs)

        command = click.option("--output", "-o", "output_option", type=path,
                               help="The run's folder (or give it as OUTPUT).")(command)
        return click.argument("output", type=path, required=False)(command)

    return decorate


save_overrides_option = click.option(
    "--save-overrides", is_flag=True,
    help="Keep this command's flags that loosen politeness or safety (--allow-network, "
    "--no-respect-robots, --ignore-opt-out, a higher rate or connection limit) for the run's "
    "later commands; without it they apply to this command (and its Slurm chain) only.")


def gather_settings(config_file: Path | None, flags: dict[str, Any],
                    announce: bool = False) -> Settings:
    """The command's settings; with `announce`, say which differ from the defaults and why."""
    overrides = {name: value for name, value in flags.items() if name in SETTING_NAMES}
    loaded = load_settings(config_file, overrides, flags.get("save_overrides", False))
    if loaded.without_effect:
        err_console.print(
            f"[yellow]note:[/] {config_file}: these keys of the original downloader have no "
            f"effect here (this version lays out its folders and scripts itself): "
            f"{', '.join(loaded.without_effect)}"
        )
    if announce:
        render.announce_settings(loaded)
    return loaded.settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distributed-downloader")
def cli() -> None:
    """Download images from lists of URLs, on one machine or a cluster, politely and resumably.

    The usual run is one command: `distributed-downloader download INPUT --output OUT`.
    """


def input_options(command: Callable) -> Callable:
    """INPUT, --output and --input-format: what prep and download share."""
    command = setting_option("input_format")(command)
    command = hidden_alias("--format", "input_format",
                           click.Choice(list(typing.get_args(InputFormat))))(command)
    command = click.option(
        "--output", "-o", "output", type=click.Path(path_type=Path), required=True,
        help=setting_field("output").description)(command)
    return click.argument("input", type=click.Path(path_type=Path))(command)


@cli.command()
@input_options
@setting_options(*PREP_SETTINGS)
@click.option("--force", is_flag=True, help="Replace a finished prep in OUT/prep/.")
@config_option
def prep(input: Path, config_file: Path | None, force: bool, **flags: Any) -> None:
    """Filter INPUT, give every row a UUID, and cut it into batches by server."""
    settings = gather_settings(config_file, {"input": input, **flags}, announce=True)
    with pipeline.run_lock(settings.paths.run_folder("prep"), "prep", settings):
        pipeline.prep(settings, force)


@cli.command()
@run_folder()
@setting_options(*FETCH_SETTINGS)
@click.option("--retry-errors", is_flag=True,
              help="Fetch again the rows whose error is retryable (timeouts, 429, 5xx, ...).")
@save_overrides_option
@config_option
def fetch(output: Path, config_file: Path | None, retry_errors: bool, **flags: Any) -> None:
    """Download the batches that prep wrote in OUTPUT; re-run to resume."""
    settings = gather_settings(config_file, {"output": output, **flags}, announce=True)
    if settings.cluster.executor == "mpi":
        pipeline.start_mpi()  # the other ranks wait in here for rank 0's word
    remember_stop_signals()  # from here a stop ends the run cleanly, lock released
    with pipeline.run_lock(output, "fetch", settings, mpi_ranks=settings.cluster.executor == "mpi"):
        pipeline.fetch(settings, retry_errors)


@cli.command()
@input_options
@setting_options(*PREP_SETTINGS, *FETCH_SETTINGS, "profile_requests")
@click.option("--retry-errors", is_flag=True,
              help="Fetch again the rows whose error is retryable (timeouts, 429, 5xx, ...).")
@click.option("--profile", "run_profile", is_flag=True,
              help="Probe every server (the profile command) before fetching. Without it, "
              "fetching starts at once and a server's first requests are its probe: "
              "first_contact_rate, stepping up with each report of good answers.")
@click.option("--no-profile", is_flag=True, hidden=True,
              help="The default now: kept so that earlier scripts run unchanged.")
@click.option("--force", is_flag=True,
              help="Prepare INPUT again although OUT holds a prep (of another input too), as "
              "long as nothing was downloaded into OUT yet.")
@save_overrides_option
@config_option
def download(input: Path, config_file: Path | None, retry_errors: bool, run_profile: bool,
             no_profile: bool, force: bool, **flags: Any) -> None:
    """One shot: prep INPUT into OUT (unless done), then fetch; re-run to resume."""
    settings = gather_settings(config_file, {"input": input, **flags}, announce=True)
    pipeline.download(settings, input, retry_errors=retry_errors, force=force,
                      run_profile=run_profile and not no_profile)


@cli.command()
@run_folder()
@setting_options(*PROFILE_SETTINGS)
@save_overrides_option
@config_option
def profile(output: Path, config_file: Path | None, **flags: Any) -> None:
    """Probe every server of OUTPUT (a few requests each, one a second at most) for a safe
    starting rate; writes OUTPUT/profiles/servers.csv."""
    settings = gather_settings(config_file, {"output": output, **flags}, announce=True)
    with pipeline.run_lock(output, "profile", settings):
        pipeline.profile(settings)


@cli.command()
@run_folder(exists=True)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (for scripts).")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write an HTML page with plots (and the plots as PNG beside it).")
def status(output: Path, as_json: bool, report_path: Path | None) -> None:
    """Where the run in OUTPUT stands: done, failed by code, speed, ETA, servers; works while
    a fetch runs and after."""
    import json

    from distributed_downloader.status import run_status

    if report_path is not None:
        require_module("matplotlib", "report", "status --report")
    result = run_status(output)
    if report_path is not None:
        from distributed_downloader.report import write_report

        written = write_report(result, report_path)
        err_console.print(f"report: {', '.join(str(path) for path in written)}")
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        return
    render.print_status(result, output)


@cli.command()
@run_folder(exists=True)
@click.option("--fix", is_flag=True,
              help="Move broken finished batches aside (OUT/verify/quarantine/) and broken "
              "chunks of unfinished ones (OUT/quarantine/), so fetch redoes them.")
@click.option("--workers", type=int, default=None, help="Checking processes [default: cores].")
def verify(output: Path, fix: bool, workers: int | None) -> None:
    """Check every chunk of OUTPUT: files readable, images decode and match their hashes, each
    UUID once; in finished batches also the counts and each prepared UUID present. Exit code 1
    when something is broken."""
    from distributed_downloader.verify import run_verify

    with pipeline.run_lock(output, "verify --fix", gather_settings(None, {"output": output})) \
            if fix else contextlib.nullcontext():
        summary = run_verify(output, fix, workers)
    console.print(f"verify: {summary['batches_checked']:,} finished batches, "
                  f"{summary['rows_checked']:,} rows, {summary['images_decoded']:,} images "
                  f"decoded in {summary['seconds']:.1f} s; {summary['batches_unfinished']:,} "
                  f"batches not finished ({summary['unfinished_chunks_checked']:,} chunks "
                  "checked)")
    for batch in summary["broken"]:
        more = f" (+{batch['more_problems']} more)" if batch["more_problems"] else ""
        state = "" if batch["finished"] else " (unfinished)"
        console.print(f"[red]broken[/] {batch['batch']}{state}: {'; '.join(batch['problems'])}"
                      f"{more}", highlight=False, soft_wrap=True)
    if summary["moved_aside"]:
        console.print(f"moved {len(summary['moved_aside'])} broken batches aside; run fetch "
                      "to download them again")
    if summary["chunks_set_aside"]:
        console.print(f"set {len(summary['chunks_set_aside'])} chunks of unfinished batches "
                      f"aside, into {output / 'quarantine'}; run fetch to download their rows "
                      "again", highlight=False, soft_wrap=True)
    if summary["broken"] and not fix:
        console.print("run `verify --fix`, then fetch, to download them again")
        sys.exit(1)
    if not summary["broken"]:
        console.print("[green]every finished batch is sound[/], and every chunk of the "
                      "unfinished ones")


TOOL_NAMES = ("resize", "image_verification", "duplication_based", "size_based")


# Each tool's own settings (its command's --help shows them, and only them); the flags the
# first versions used stay accepted, hidden.
TOOL_OPTIONS: dict[str, list[Callable]] = {
    "resize": [setting_option("new_resize_size"),
               hidden_alias("--image-size", "new_resize_size", int)],
    "size_based": [setting_option("threshold_size"),
                   hidden_alias("--min-side", "threshold_size", int)],
}
TOOL_SUMMARIES = {
    "resize": "Make stored images smaller (longest side --new-resize-size).",
    "image_verification": "Decode every stored image; list the ones that fail.",
    "duplication_based": "Find images with the same original; keep the lowest UUID.",
    "size_based": "List images whose original is smaller than --threshold-size pixels.",
}


def tool_options(command: Callable) -> Callable:
    """Where a tool runs, for every tool."""
    for option in reversed([
        click.option("--restart", is_flag=True, help="Start the tool over (drop its results)."),
        click.option("--workers", type=int, default=None, help="Local processes [default: "
                     "tools_num_workers, or one per core when that is 1]."),
        click.option("--executor", type=click.Choice(["local", "mpi"]), default="local",
                     help="local processes, or MPI ranks (under mpirun/srun)."),
        config_option,
    ]):
        command = option(command)
    return command


def _tool_settings(name: str, output: Path, config_file: Path | None,
                   flags: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
    settings = gather_settings(config_file, {"output": output, **flags})
    options: dict[str, Any] = {}
    if name == "resize":
        options = {"image_size": settings.tools.new_resize_size,
                   "image_quality": settings.images.image_quality}
    elif name == "size_based":
        options = {"min_side": settings.tools.threshold_size}
    return settings, options


@cli.group()
def tools() -> None:
    """Post-process a download (`tools NAME OUTPUT`); results go to OUTPUT/tools/NAME/, and a
    re-run resumes. `tools NAME --help` shows a tool's options."""


def _run_tool_command(name: str, output: Path, config_file: Path | None, restart: bool,
                      workers: int | None, executor: str, **flags: Any) -> None:
    settings, options = _tool_settings(name, output, config_file, flags)
    pipeline.tool(name, output, settings, options, restart, workers, executor)


def _tool_command(name: str) -> None:
    def command(output: Path, **options: Any) -> None:
        _run_tool_command(name, output, **options)

    command.__doc__ = TOOL_SUMMARIES[name] + " Results go to OUTPUT/tools/" + name + "/."
    for option in reversed(TOOL_OPTIONS.get(name, [])):
        command = option(command)
    tools.command(name=name)(run_folder(exists=True)(tool_options(command)))


for _name in TOOL_NAMES:
    _tool_command(_name)


@cli.command()
@run_folder()
@setting_option("max_nodes")
@hidden_alias("--nodes", "max_nodes", int)
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
    result = make_plan(settings, settings.cluster.max_nodes, settings.cluster.workers_per_node,
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
        table.add_column(column, justify="left" if column == "server" else "right",
                         no_wrap=column != "server")
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
              help=setting_field("output").description)
@setting_options(*CLUSTER_SETTINGS, *PREP_SETTINGS, *FETCH_SETTINGS, "profile_requests")
@click.option("--profile", "run_profile", is_flag=True,
              help="Submit a profile job (probe every server) before the first download period.")
@save_overrides_option
@config_option
def submit(input: Path | None, config_file: Path | None, run_profile: bool,
           **flags: Any) -> None:
    """Write the job scripts into OUT/slurm/ and submit prep → (profile) → download periods,
    each after the last; periods chain until every batch is done."""
    from distributed_downloader.executors.slurm import submit_chain

    settings = gather_settings(config_file, {"input": input, **flags}, announce=True)
    chain = submit_chain(settings, run_profile)
    for job in chain.jobs[-3:]:
        label = f"download period {job.period}" if job.kind == "download" else job.kind
        console.print(f"submitted {label}: job {job.id}")
    folder = settings.paths.run_folder("slurm submit")
    console.print(f"scripts and logs in [bold]{folder.resolve() / 'slurm'}[/]; watch "
                  f"with `distributed-downloader slurm status {folder}`")


@slurm.command(name="status")
@run_folder()
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
@run_folder()
def cancel(output: Path) -> None:
    """Stop the chain: cancel its queued and running jobs (committed chunks stay)."""
    from distributed_downloader.executors.slurm import cancel_chain

    cancelled = cancel_chain(gather_settings(None, {"output": output}))
    console.print(f"cancelled jobs: {', '.join(cancelled) or 'none was active'}")


@slurm.command(hidden=True)
@run_folder()
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
@run_folder(exists=True)
@click.option("--to", "to_format", type=click.Choice(["webdataset", "files", "hdf5"]),
              required=True, help="The format to write, under OUTPUT/export/FORMAT/.")
@click.option("--restart", is_flag=True, help="Start the export over.")
@click.option("--workers", type=int, default=None, help="Processes [default: one per core].")
def export(output: Path, to_format: str, restart: bool, workers: int | None) -> None:
    """Convert the finished batches of a Parquet download into WebDataset shards, image files
    or HDF5, without downloading again; a re-run resumes."""
    from distributed_downloader.tools import run_tool

    with pipeline.run_lock(output, f"export --to {to_format}",
                           gather_settings(None, {"output": output})):
        summary = run_tool(to_format, output, {}, restart, workers)
    console.print(f"export {to_format}: {summary.get('images', 0):,} images, "
                  f"{summary.get('errors', 0):,} errors in {summary['batches_this_run']:,} "
                  f"batches this run ({summary['batches_done']:,} in all), "
                  f"{summary['seconds']:.1f} s")
    console.print(f"in [bold]{output / 'export' / to_format}[/]")


@slurm.command(name="tool")
@click.argument("name", type=click.Choice(TOOL_NAMES))
@run_folder(exists=True)
@setting_options("new_resize_size", "threshold_size")
@hidden_alias("--image-size", "new_resize_size", int)
@hidden_alias("--min-side", "threshold_size", int)
@config_option
def slurm_tool(name: str, output: Path, new_resize_size: int | None,
               threshold_size: int | None, config_file: Path | None) -> None:
    """Submit a post-processing tool as one MPI job (tools_max_nodes × tools_workers_per_node);
    submit it again to resume after a time limit."""
    from distributed_downloader.executors.slurm import submit_tool

    settings = gather_settings(config_file, {"output": output})
    options = [*(["--new-resize-size", str(new_resize_size)] if new_resize_size else []),
               *(["--threshold-size", str(threshold_size)] if threshold_size is not None else [])]
    job = submit_tool(settings, name, options)
    console.print(f"submitted tools {name}: job {job}; log in {output / 'slurm' / 'logs'}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
        # What is left is freed at exit all the same: frozen, it spares the interpreter's last
        # garbage collections a walk over every object (~0.15 s, a fixed cost of each command).
        gc.freeze()
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        _exit_with_error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        for action in pipeline.ON_ERROR:
            action(EXIT_USER_ERROR)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        if not is_out_of_space(exc):  # one a write did not name (the writers name theirs)
            _fail(EXIT_USER_ERROR)
            raise
        _exit_with_error(f"out of space: {exc}; free space (or raise the quota), then run the "
                         "same command again", EXIT_OUT_OF_SPACE)
    except Exception:
        _fail(EXIT_USER_ERROR)
        raise


def _exit_with_error(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    _fail(code)
    sys.exit(code)


def _fail(code: int) -> None:
    for action in pipeline.ON_ERROR:  # under MPI: the other ranks must not wait for rank 0
        action(code)
