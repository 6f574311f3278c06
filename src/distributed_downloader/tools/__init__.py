"""Post-processing tools (the original's `distributed_downloader_tools`), run over a download.

`tools NAME OUT` runs one tool. Tools that work batch by batch (`resize`,
`image_verification`) write each batch's result into a hidden folder and rename it into place
under `OUT/tools/NAME/`, so a batch's result is there whole or not at all; a re-run skips the
batches already done, which is the whole of resuming after a kill. Tools over the whole run
(`duplication_based`, `size_based`) are one DuckDB query each, written to a temporary file and
renamed. Nothing a reader may hold is rewritten in place: the download itself is never touched.

Each tool records its options and what it did in `OUT/tools/NAME/summary.json`; resuming with
other options is refused (`--restart` starts over).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from distributed_downloader.errors import UserError, require_module
from distributed_downloader.executors.batches import run_batches
from distributed_downloader.export import EXPORT_FORMATS, export_batch
from distributed_downloader.formats import FORMAT_NEEDS
from distributed_downloader.storage import (
    COMPLETED_MARKER,
    SUCCESS_PREFIX,
    RunLayout,
    atomic_write_json,
    batch_folder,
    fsync_path,
    sql_path,
    upgrade_layout,
)
from distributed_downloader.writers import finished_batches

BatchWork = Callable[[Path, Path, dict[str, Any]], dict[str, int]]
RunWork = Callable[[RunLayout, Path, dict[str, Any]], dict[str, Any]]
TOOL_DONE = COMPLETED_MARKER  # written last in a batch's result folder, with its counts


@dataclass(frozen=True)
class Tool:
    name: str  # its command: `tools NAME` (summary and options in cli.py)
    per_batch: BatchWork | None = None  # (downloaded batch folder, result folder, options)
    whole_run: RunWork | None = None  # (layout, tool folder, options)
    home: str = "tools"  # results go to OUT/{home}/{name}/ (exports: OUT/export/FORMAT/)
    needs: tuple[str, str, str] | None = None  # an optional module: (module, extra, purpose)


def export_tool(output_format: str) -> Tool:
    """`export --to FORMAT` (export.py): a per-batch tool writing into OUT/export/FORMAT/."""
    return Tool(output_format, per_batch=partial(export_batch, output_format), home="export",
                needs=FORMAT_NEEDS.get(output_format))


def registry() -> dict[str, Tool]:
    from distributed_downloader.tools import duplication_based, image_verification, resize, \
        size_based

    tools = [resize.TOOL, image_verification.TOOL, duplication_based.TOOL, size_based.TOOL,
             *map(export_tool, EXPORT_FORMATS)]
    return {tool.name: tool for tool in tools}


def query_successes(layout: RunLayout, target: Path, select: str) -> Any:
    """Write `select` (over a view `successes` of every committed success) to the Parquet file
    `target`, atomically; returns the DuckDB connection (None: no success yet, no file)."""
    import duckdb

    if not layout.has_chunks(SUCCESS_PREFIX):
        return None
    temporary = target.with_name(f".{target.name}.tmp")
    con = duckdb.connect()
    # union_by_name: chunks of other output formats have no `image` column.
    con.execute("CREATE VIEW successes AS SELECT * FROM read_parquet("
                f"{layout.chunk_pattern(SUCCESS_PREFIX)}, union_by_name = true)")
    con.execute(f"COPY ({select}) TO {sql_path(temporary)} (FORMAT parquet, COMPRESSION zstd)")
    os.replace(temporary, target)
    return con


def run_batch(name: str, root: str, server_name: str, partition_id: int,
              options: dict[str, Any]) -> dict[str, int]:
    """One batch of a per-batch tool: work in a hidden folder, then rename it into place."""
    layout = RunLayout(Path(root))
    tool = registry()[name]
    assert tool.per_batch is not None
    final = batch_folder(layout.root / tool.home / name, server_name, partition_id)
    scratch = final.parent / f".{final.name}.{secrets.token_hex(4)}"
    scratch.mkdir(parents=True)
    counts = tool.per_batch(batch_folder(layout.downloaded, server_name, partition_id),
                            scratch, options)
    atomic_write_json(scratch / TOOL_DONE, {**counts, "finished_at": time.time()})
    os.rename(scratch, final)
    fsync_path(final.parent)
    return counts


def _start(layout: RunLayout, tool: Tool, options: dict[str, Any], restart: bool) -> Path:
    folder = layout.root / tool.home / tool.name
    recorded = folder / "options.json"
    if restart and folder.exists():
        shutil.rmtree(folder)
    if recorded.exists():
        before = json.loads(recorded.read_text())
        if before != options:
            raise UserError(f"{folder} was started with {before}, not {options}; run with "
                            "--restart to start over")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, options)
    for scratch in folder.glob("*/.partition_id=*"):  # a batch in progress when killed
        shutil.rmtree(scratch, ignore_errors=True)
    for legacy in folder.glob("*/*/done"):  # the marker's name before it was `_`-prefixed
        os.replace(legacy, legacy.with_name(TOOL_DONE))
    return folder


def run_tool(name: str, output: Path, options: dict[str, Any], restart: bool = False,
             workers: int | None = None, executor: str = "local") -> dict[str, Any]:
    tools = registry()
    if name not in tools:
        raise UserError(f"unknown tool '{name}'; tools: {', '.join(tools)}")
    tool = tools[name]
    layout = RunLayout(output)
    if not layout.prep_summary.exists():
        raise UserError(f"{output} has no finished prep: nothing to post-process")
    layout.check_writable()
    if tool.needs is not None:
        require_module(*tool.needs)
    upgrade_layout(layout)
    folder = _start(layout, tool, options, restart)
    started = time.monotonic()
    totals: dict[str, Any] = {}
    if tool.per_batch is not None:
        todo = [(s, p) for s, p in finished_batches(layout)
                if not (batch_folder(folder, s, p) / TOOL_DONE).exists()]
        results = run_batches(run_batch, [(name, str(layout.root), s, p, options)
                                          for s, p in todo], workers, executor)
        for counts in results:
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
        totals["batches_this_run"] = len(todo)
        totals["batches_done"] = sum(1 for _ in folder.glob(f"*/*/{TOOL_DONE}"))
    else:
        assert tool.whole_run is not None
        totals = tool.whole_run(layout, folder, options)
    summary = {"tool": name, "options": options, **totals,
               "seconds": round(time.monotonic() - started, 2), "finished_at": time.time()}
    atomic_write_json(folder / "summary.json", summary)
    return summary

