"""The prep stage: input → filtered, normalised rows with UUIDs → batches by server.

The input is read once: chunks are parsed and checked on a few threads (Arrow's kernels release
the GIL) and committed in input order into a few staging Parquet files by server, which keeps
memory bounded whatever the input's size. DuckDB then deduplicates the staged rows and sorts
them by server out of core, a file at a time, and the batches are cut from its sorted output.
Everything is written under `prep/.work/` and published into `prep/` at the end,
`summary.json` last, so a killed prep leaves nothing a later stage could take for finished.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader import __version__
from distributed_downloader.config import Settings, save_settings
from distributed_downloader.errors import InputError, UserError
from distributed_downloader.prep.partition import (
    STAGING_FILES,
    PartitionResult,
    ServerNumbers,
    build_batches,
    staging_file_of,
    staging_paths,
)
from distributed_downloader.prep.previous import check_previous
from distributed_downloader.prep.readers import ChunkJob
from distributed_downloader.prep.rows import (
    ChunkCleaner,
    CleanChunk,
    RejectedRow,
    Tally,
    resolve_roles,
)
from distributed_downloader.prep.sources import Source, discover, input_fingerprint
from distributed_downloader.schema import DROPPED, REJECTED, staging_schema
from distributed_downloader.storage import (
    PARQUET_COMPRESSION,
    RunLayout,
    atomic_write_json,
    publish,
    upgrade_layout,
)
from distributed_downloader.writers import has_downloads

REJECTED_ROWS_PER_GROUP = 10_000
# Threads that parse and check chunks; the main thread reads ahead and commits in order.
PARSE_THREADS = max(2, min(4, os.cpu_count() or 1))
CHUNKS_IN_FLIGHT = PARSE_THREADS + 2  # each holds a few tens of MiB
# Cleaned chunks waiting for the thread that writes them to the staging files, in order.
WRITES_IN_FLIGHT = 2
# The staging files are read by DuckDB and deleted: fast compression, statistics left out,
# dictionaries only where values repeat.
STAGING_OPTIONS = {"compression": "lz4", "write_statistics": False,
                   "use_dictionary": ["license", "source", "server_name"]}


@dataclass
class PrepProgress:
    source: str
    rows_read: int
    rows_kept: int
    phase: str  # "reading" | "batching"


ProgressCallback = Callable[[PrepProgress], None]


def prep_is_finished(layout: RunLayout) -> bool:
    return layout.prep_summary.exists()


def check_same_input(layout: RunLayout, source: Path) -> None:
    """A run folder belongs to one input: resuming it with another one is refused."""
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    summary = json.loads(layout.prep_summary.read_text())
    recorded = summary.get("input_fingerprint")
    same = recorded == input_fingerprint(source) if recorded else \
        Path(summary["input"]) == source.resolve()
    if not same:
        raise UserError(
            f"{layout.root} holds the run of {summary['input']}, not of {source.resolve()}: a "
            "run folder belongs to one input. Use another --output, `--previous "
            f"{layout.root}` there to build on this run, or --force to prepare the new input "
            "here (only while nothing was downloaded yet)")


class _StagingWriter:
    """Writes the kept rows into the staging files, each row into its server's file, in input
    order within each file."""

    def __init__(self, paths: list[Path], schema: pa.Schema) -> None:
        self.paths = paths
        self._writers = [pq.ParquetWriter(path, schema, **STAGING_OPTIONS) for path in paths]

    def write(self, rows: pa.Table, rows_per_file: list[int]) -> None:
        """`rows` in the order of their files, `rows_per_file[k]` of them for file k."""
        start = 0
        for writer, count in zip(self._writers, rows_per_file):
            if count:
                writer.write_table(rows.slice(start, count))
            start += count

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


class _RejectedWriter:
    """Streams rejected rows into a Parquet file, a row group every few thousand rows."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, REJECTED, compression=PARQUET_COMPRESSION)
        self._rows: list[RejectedRow] = []

    def add(self, rows: list[RejectedRow]) -> None:
        self._rows.extend(rows)
        if len(self._rows) >= REJECTED_ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        table = pa.table(
            {
                "source_file": [row.source_file for row in self._rows],
                "row_number": [row.row_number for row in self._rows],
                "raw_value": [row.raw_value for row in self._rows],
                "reason": [str(row.reason) for row in self._rows],
            },
            schema=REJECTED,
        )
        self._writer.write_table(table)
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _row_key_prefix(source: Source, input_path: Path, several: bool) -> str:
    """Rows without an id are keyed by line number, prefixed by their file when there are many."""
    if not several:
        return ""
    label = source.label
    try:
        label = str(Path(label).relative_to(input_path))
    except ValueError:
        pass
    return f"{label}:"


def _in_order(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], CleanChunk]],
              depth: int) -> Iterator[CleanChunk]:
    """Runs tasks on the pool, at most `depth` at once, and yields their results in order."""
    running: deque[Future] = deque()
    try:
        for task in tasks:
            running.append(pool.submit(task))
            if len(running) >= depth:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for future in running:
            future.cancel()


def _cleaned(job: ChunkJob, cleaner: ChunkCleaner) -> Callable[[], CleanChunk]:
    return lambda: cleaner.clean(job())


def _clean_chunks(source: Source, settings: Settings, several: bool,
                  pool: ThreadPoolExecutor) -> Iterator[CleanChunk]:
    """One source's chunks, parsed and checked on the pool, in input order."""
    assert settings.paths.input is not None
    reader = source.make_reader()
    roles = resolve_roles(reader.columns, source, settings)
    prefix = _row_key_prefix(source, settings.paths.input, several)
    cleaner = ChunkCleaner(roles, source, prefix, settings.prep.keep_columns,
                           settings.prep.strict_image_format)
    readable = [name for name in roles.wanted if name in reader.columns]
    tasks = (_cleaned(job, cleaner) for job in reader.jobs(readable))
    return _in_order(pool, tasks, CHUNKS_IN_FLIGHT)


def _read_sources(
    sources: list[Source],
    settings: Settings,
    staging: _StagingWriter,
    rejected: _RejectedWriter,
    dropped: pq.ParquetWriter,
    tally: Tally,
    servers: ServerNumbers,
    progress: ProgressCallback | None,
) -> None:
    """Stream every source into the staging files, committing chunks on a thread of their own."""
    schema = staging_schema(settings.prep.keep_columns)
    writes: deque[Future] = deque()

    def commit(chunk: CleanChunk, first_row_index: int) -> None:
        if chunk.rows_kept:
            staging.write(*_staging_table(chunk, first_row_index, servers, schema))
        if chunk.left_out.num_rows:
            dropped.write_table(chunk.left_out)

    with ThreadPoolExecutor(PARSE_THREADS) as pool, ThreadPoolExecutor(1) as writer:
        for source in sources:
            try:
                for chunk in _clean_chunks(source, settings, len(sources) > 1, pool):
                    writes.append(writer.submit(commit, chunk, tally.rows_kept))
                    tally.add(chunk)
                    rejected.add(chunk.rejected)
                    while len(writes) > WRITES_IN_FLIGHT:
                        writes.popleft().result()
                    if progress:
                        progress(PrepProgress(source.label, tally.rows_read, tally.rows_kept,
                                              "reading"))
            except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
                raise InputError(f"{source.label}: cannot read further ({exc})") from None
        while writes:
            writes.popleft().result()


def _stage_input(sources: list[Source], settings: Settings, work: Path,
                 progress: ProgressCallback | None) -> tuple[Tally, ServerNumbers]:
    """Reads the input once: the staging files (rows kept), `work/rejected.parquet` and
    `work/dropped.parquet`; returns the counts and the servers in order of appearance."""
    tally = Tally()
    servers = ServerNumbers()
    staging = _StagingWriter(staging_paths(work), staging_schema(settings.prep.keep_columns))
    rejected = _RejectedWriter(work / "rejected.parquet")
    dropped = pq.ParquetWriter(work / "dropped.parquet", DROPPED, compression=PARQUET_COMPRESSION)
    try:
        _read_sources(sources, settings, staging, rejected, dropped, tally, servers, progress)
    finally:
        staging.close()
        rejected.close()
        dropped.close()
    if tally.rows_read == 0:
        raise InputError(f"{settings.paths.input}: no data rows (only a header, or empty)")
    return tally, servers


def _staging_table(chunk: CleanChunk, first_row_index: int, servers: ServerNumbers,
                   schema: pa.Schema) -> tuple[pa.Table, list[int]]:
    """A cleaned chunk's kept rows, numbered in input order, as the staging files hold them:
    ordered by staging file (in input order within each), in one copy; and how many rows go
    to each file."""
    names = chunk.columns["server_name"]
    if chunk.kept is not None:
        names = names.take(chunk.kept)
    server_ids = servers.of(names)
    files = staging_file_of(server_ids)
    order = np.argsort(files, kind="stable")  # ranks among the kept rows
    positions = order if chunk.kept is None else chunk.kept[order]
    values = {
        **{name: column.take(positions) for name, column in chunk.columns.items()},
        "row_index": pa.array(first_row_index + order.astype(np.int64)),
        "server_id": server_ids.take(order),
    }
    table = pa.Table.from_arrays([values[f.name] for f in schema], schema=schema)
    return table, np.bincount(files, minlength=STAGING_FILES).tolist()


def _make_room(layout: RunLayout, force: bool) -> None:
    """Clears a finished prep away when asked to and while nothing was downloaded from it."""
    if not prep_is_finished(layout):
        return
    if not force:
        raise UserError(
            f"{layout.prep} holds a finished prep; use --force to prepare again "
            "(it replaces prep/ only, while nothing was downloaded yet)"
        )
    upgrade_layout(layout)
    if has_downloads(layout):
        raise UserError(
            f"{layout.root} already holds downloads of its prep: preparing again there "
            "would mix two inputs in one folder; use another --output (with --previous "
            f"{layout.root} to reuse what it holds)")
    shutil.rmtree(layout.prep)


def _fresh_work_folder(layout: RunLayout) -> Path:
    work = layout.prep_work
    if work.exists():
        shutil.rmtree(work)  # a killed prep's leftovers
    work.mkdir(parents=True)
    return work


def _publish_outputs(work: Path, layout: RunLayout) -> None:
    for name in ("batches", "rejected.parquet", "dropped.parquet", "duplicates.parquet",
                 "servers.parquet", "overlap.parquet"):
        if (work / name).exists():
            publish(work / name, layout.prep / name)


def _summary(settings: Settings, sources: list[Source], warnings: list[str], tally: Tally,
             result: PartitionResult, previous: list[RunLayout],
             started: float) -> dict[str, Any]:
    assert settings.paths.input is not None
    return {
        "input": str(settings.paths.input.resolve()),
        "input_fingerprint": input_fingerprint(settings.paths.input),
        "formats": sorted({source.format for source in sources}),
        "rows_read": tally.rows_read,
        "rows_kept": tally.rows_kept,
        "dropped": tally.as_dict(),
        "kept_without_image_format": tally.kept_without_image_format,
        "duplicates": result.duplicates,
        "download_rows": result.download_rows,
        "servers": len(result.servers),
        "batches": result.batches,
        "batch_size": settings.prep.batch_size,
        "previous": [str(earlier.root) for earlier in previous],
        "overlap": result.overlap,
        "reused_rows": sum(server.reused_rows for server in result.servers),
        "seconds": round(time.monotonic() - started, 3),
        "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "warnings": warnings,
        "version": __version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_prep(
    settings: Settings, force: bool = False, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Prepare `settings.paths.input` into `settings.paths.output/prep/`; returns the summary
    written."""
    if settings.paths.input is None or settings.paths.output is None:
        raise UserError("prep needs an INPUT and an --output folder")
    started = time.monotonic()
    layout = RunLayout(settings.paths.output)
    layout.check_writable()
    _make_room(layout, force)
    sources, warnings = discover(settings.paths.input, settings.prep.input_format)
    previous = check_previous(settings.prep.previous, settings.paths.output)
    work = _fresh_work_folder(layout)
    save_settings(settings)

    tally, servers = _stage_input(sources, settings, work, progress)
    if progress:
        progress(PrepProgress("", tally.rows_read, tally.rows_kept, "batching"))
    result = build_batches(staging_paths(work), work, settings, settings.prep.keep_columns,
                           servers.names, previous)
    _publish_outputs(work, layout)
    summary = _summary(settings, sources, warnings, tally, result, previous, started)
    atomic_write_json(layout.prep_summary, summary)
    shutil.rmtree(work, ignore_errors=True)
    return summary
