"""Fetch's output: a batch's results as atomically written chunk files and a `_completed` marker.

A batch's successes go to `downloaded_images/server_name=H/partition_id=N/successes-*.parquet`
and its errors to the same path under `download_errors/` (each tree reads as one table); each
chunk is written under a hidden temporary name, fsynced and renamed, so a reader (or a resumed
run) only ever sees whole chunks. The `_completed` marker, written last beside the successes,
makes the batch finished. Resuming skips every UUID already in a chunk; a kill loses only
unwritten chunks. A chunk that cannot be read is moved aside (`OUT/quarantine/`, never deleted)
and its rows count as not written; a UUID committed twice keeps one row.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.errors import RETRYABLE, OutOfSpace
from distributed_downloader.schema import ERRORS, successes_schema
from distributed_downloader.storage import (
    COMPLETED_MARKER,
    ERROR_PREFIX,
    PARQUET_COMPRESSION,
    SUCCESS_PREFIX,
    BatchFiles,
    RunLayout,
    atomic_write_json,
    chunk_files,
    committing,
    fsync_dir,
    space_errors,
    temporary_name,
)

CHUNK_MAX_ROWS = 500
CHUNK_MAX_BYTES = 16 << 20
CHUNK_MAX_AGE_SECONDS = 60.0
ROWS_PER_ROW_GROUP = 64  # small row groups: the writer buffers one at a time, not the chunk

# What reading a damaged file raises: truncated or not Parquet (ArrowInvalid, a ValueError),
# unreadable bytes (OSError).
UNREADABLE = (OSError, ValueError, pa.ArrowException)

__all__ = ["COMPLETED_MARKER", "ERROR_PREFIX", "SUCCESS_PREFIX", "chunk_files"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetAside:
    """A file taken out of the result: where it was, where it is now, and why."""

    source: Path
    target: Path
    reason: str


def read_uuids(path: Path, columns: tuple[str, ...] = ()) -> tuple[list[str], str | None]:
    """A chunk's UUIDs (reading `columns` too), or ([], why it cannot be read)."""
    try:
        table = pq.read_table(path, columns=["uuid", *columns])
        return table.column("uuid").to_pylist(), None
    except UNREADABLE as exc:
        return [], f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def set_aside(path: Path, reason: str) -> list[SetAside]:
    """Take a chunk out of the result, into `OUT/quarantine/` under its own path (a number
    added when one of that name is there already); logged, never deleted. Its rows count as
    not written, so fetch asks for them again: a finished batch losing a chunk loses its
    `_completed` marker too (moved beside it), or those rows would never be fetched."""
    batch = BatchFiles.of_chunk(path)
    moved = [_move_aside(path, batch.run, reason)]
    if batch.finished:
        moved.append(_move_aside(batch.marker, batch.run, f"its batch lost {path.name}"))
    return moved


def _move_aside(path: Path, layout: RunLayout, reason: str) -> SetAside:
    target = layout.quarantine / path.relative_to(layout.root)
    copies = 0
    while target.exists():
        copies += 1
        target = target.with_name(f"{path.name}.{copies}")
    with space_errors(target.parent, 0):
        target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)  # same file system (both under OUT): a rename, nothing copied
    fsync_dir(path.parent)
    fsync_dir(target.parent)
    log.warning("%s: %s; moved to %s", path, reason, target)
    return SetAside(path, target, reason)


def readable_chunks(batch: BatchFiles) -> dict[Path, list[str]]:
    """Every chunk of a batch with its UUIDs (successes first, each kind by name); a chunk
    that cannot be read is set aside on the way."""
    chunks = {}
    for path in batch.chunks():
        uuids, problem = read_uuids(path)
        if problem is None:
            chunks[path] = uuids
        else:
            set_aside(path, problem)
    return chunks


def set_aside_unreadable(layout: RunLayout) -> list[SetAside]:
    """Set aside every chunk of the run that cannot be read (the columns fetch's counts read).
    Reads every chunk: for when a query over all of them failed, not for every start."""
    moved = []
    for root, prefix, columns in ((layout.downloaded, SUCCESS_PREFIX, ()),
                                  (layout.download_errors, ERROR_PREFIX, ("error_code",))):
        for path in sorted(root.glob(f"*/*/{prefix}*.parquet")):
            _, problem = read_uuids(path, columns)
            if problem is not None:
                moved += set_aside(path, problem)
    return moved


def committed_uuids(batch: BatchFiles) -> set[str]:
    """UUIDs that already have their final row in this batch; an unreadable chunk is set aside
    on the way (its rows are fetched again)."""
    return {uuid for uuids in readable_chunks(batch).values() for uuid in uuids}


def resolve_duplicates(batch: BatchFiles) -> int:
    """Keep one row per UUID in a batch (two writers of one batch, or a success and an error of
    one row): a success over an error, else the first by chunk name. A chunk losing rows is
    rewritten atomically, one losing all of them set aside; each logged. Returns rows dropped.
    The kept copy is never touched, so a kill halfway leaves every UUID at least once."""
    chunks = readable_chunks(batch)
    keeper: dict[str, Path] = {}
    for path, uuids in chunks.items():
        for uuid in uuids:
            keeper.setdefault(uuid, path)
    if sum(len(uuids) for uuids in chunks.values()) == len(keeper):
        return 0
    dropped = 0
    for path, uuids in chunks.items():
        seen: set[str] = set()
        keep = []
        for uuid in uuids:
            keep.append(keeper[uuid] == path and uuid not in seen)
            seen.add(uuid)
        lost = [uuid for uuid, kept in zip(uuids, keep) if not kept]
        if not lost:
            continue
        dropped += len(lost)
        where = sorted({keeper[uuid].name for uuid in lost})
        rule = "a success over an error" if path.name.startswith(ERROR_PREFIX) and any(
            name.startswith(SUCCESS_PREFIX) for name in where) else "the first chunk by name"
        reason = (f"{len(lost)} of its {len(uuids)} rows are also in {', '.join(where)} "
                  f"(e.g. uuid {lost[0]}): kept there ({rule}), dropped here")
        if len(lost) == len(uuids):
            set_aside(path, reason)
        else:
            write_chunk(pq.read_table(path).filter(pa.array(keep)), path)
            fsync_dir(path.parent)
            log.warning("%s: %s", path, reason)
    return dropped


def read_completed(batch: BatchFiles) -> dict[str, Any] | None:
    try:
        return json.loads(batch.marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_stale_temporaries(batch: BatchFiles) -> None:
    """Half-written chunks of a killed run: never committed, safe to delete."""
    for folder in (batch.successes, batch.errors):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(".") and ".tmp-" in path.name:
                    path.unlink(missing_ok=True)


def reopen_for_retry(batch: BatchFiles) -> int:
    """Make a finished batch's retryable errors fetchable again; returns how many.

    The marker goes first, then each error chunk is replaced (atomically) by one without its
    retryable rows. A kill at any point leaves every row either committed or missing, and
    missing rows are what a resumed batch fetches.
    """
    retryable = [str(code) for code in RETRYABLE]
    reopened = 0
    chunks = batch.error_chunks()
    plans = []
    for path in chunks:
        table = pq.read_table(path)
        keep = pc.invert(pc.is_in(table.column("error_code"), value_set=pa.array(retryable)))
        kept = table.filter(keep)
        if kept.num_rows != table.num_rows:
            plans.append((path, kept))
            reopened += table.num_rows - kept.num_rows
    if not reopened:
        return 0
    batch.marker.unlink(missing_ok=True)
    fsync_dir(batch.successes)
    for path, kept in plans:
        if kept.num_rows:
            write_chunk(kept, path)
        else:
            path.unlink()
    fsync_dir(batch.errors)
    return reopened


def write_chunk(table: pa.Table, path: Path) -> None:
    """Write a chunk atomically; on a full disk, `OutOfSpace` and no file at all."""
    tmp = temporary_name(path)
    # Encoded images do not compress: storing them as they are saves a copy and the CPU.
    compression = {name: "none" if name == "image" else PARQUET_COMPRESSION
                   for name in table.column_names}
    try:
        with committing(tmp, table.nbytes):
            pq.write_table(table, tmp, compression=compression,
                           row_group_size=ROWS_PER_ROW_GROUP)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except OutOfSpace as exc:
        exc.rows_in_write = table.num_rows  # what a row takes, when none was stored yet
        raise


@dataclass
class BufferBudget:
    """Bytes of images a worker holds in memory across all its batches' unwritten chunks."""

    limit: int
    used: int = 0
    writers: list[BatchWriter] = field(default_factory=list)

    def over(self) -> bool:
        return self.used > self.limit

    def largest(self) -> BatchWriter | None:
        return max(self.writers, key=lambda writer: writer.buffered_bytes, default=None)


class BatchWriter:
    """Collects one batch's final rows and commits them in chunks."""

    def __init__(self, batch: BatchFiles, keep_columns: list[str], budget: BufferBudget,
                 writer_token: str | None = None, output_format: str = "parquet") -> None:
        self.batch = batch
        self.output_format = output_format
        self.successes_schema = successes_schema(keep_columns)
        self.budget = budget
        self.token = writer_token or secrets.token_hex(4)
        self.sequence = 0
        self._successes: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self.buffered_bytes = 0
        self._oldest: float | None = None
        self.written_successes = 0
        self.written_errors = 0
        self.discarded = False
        for folder in (batch.successes, batch.errors):
            with space_errors(folder.parent, 0):
                folder.mkdir(parents=True, exist_ok=True)
        budget.writers.append(self)

    def add_success(self, row: dict[str, Any]) -> None:
        if self.discarded:
            return
        self._successes.append(row)
        size = len(row["image"] or b"")  # nothing held for a row reused by link
        self.buffered_bytes += size
        self.budget.used += size
        self._added()

    def add_error(self, row: dict[str, Any]) -> None:
        if self.discarded:
            return
        self._errors.append(row)
        self._added()

    @property
    def rows_added(self) -> tuple[int, int]:
        """(successes, errors) given to this writer so far, committed or still buffered."""
        return (self.written_successes + len(self._successes),
                self.written_errors + len(self._errors))

    def _added(self) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        if (len(self._successes) + len(self._errors) >= CHUNK_MAX_ROWS
                or self.buffered_bytes >= CHUNK_MAX_BYTES):
            self.flush()
        while self.budget.over():
            largest = self.budget.largest()
            if largest is None or not largest.buffered_bytes:
                break
            largest.flush()

    def flush_if_old(self) -> None:
        if self._oldest is not None and time.monotonic() - self._oldest > CHUNK_MAX_AGE_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Commit what is buffered as one successes and one errors chunk. Each is forgotten
        once committed: after a failure (a full disk) what was committed stays so, and no
        row is counted that was not written."""
        if self.discarded or (not self._successes and not self._errors):
            return
        name = f"{self.token}-{self.sequence:05d}.parquet"
        self.sequence += 1
        if self._successes:
            table = pa.Table.from_pylist(self._successes, schema=self.successes_schema)
            write_chunk(table, self.batch.successes / (SUCCESS_PREFIX + name))
            fsync_dir(self.batch.successes)
            self.written_successes += len(self._successes)
            self.budget.used -= self.buffered_bytes
            self._successes, self.buffered_bytes = [], 0
        if self._errors:
            table = pa.Table.from_pylist(self._errors, schema=ERRORS)
            write_chunk(table, self.batch.errors / (ERROR_PREFIX + name))
            fsync_dir(self.batch.errors)
            self.written_errors += len(self._errors)
            self._errors = []
        self._oldest = None

    def close(self) -> None:
        self.flush()
        self._leave_budget()

    def discard(self) -> None:
        """Write nothing more (the disk is full): the buffered rows are dropped, and fetched
        again by the next run."""
        self.discarded = True
        self.budget.used -= self.buffered_bytes
        self._successes, self._errors, self.buffered_bytes = [], [], 0
        self._leave_budget()

    def _leave_budget(self) -> None:
        if self in self.budget.writers:
            self.budget.writers.remove(self)

    def complete(self, batch_rows: int) -> dict[str, int]:
        """Flush, keep one row per UUID, check every row of the batch is committed, and write
        the marker."""
        self.close()
        resolve_duplicates(self.batch)
        successes, errors = chunk_row_counts(self.batch)
        if successes + errors != batch_rows:
            raise RuntimeError(f"{self.batch.successes}: {successes} successes + {errors} "
                               f"errors != {batch_rows} rows")
        counts = {"rows": batch_rows, "successes": successes, "errors": errors}
        if self.output_format != "parquet":
            from distributed_downloader.formats import convert_batch

            convert_batch(self.batch.successes, self.output_format)
        atomic_write_json(self.batch.marker,
                          {**counts, "errors_by_code": errors_by_code(self.batch),
                           "output_format": self.output_format, "finished_at": time.time()})
        return counts


def chunk_row_counts(batch: BatchFiles) -> tuple[int, int]:
    """(successes, errors) committed in a batch, from the chunks' Parquet footers (no data is
    read). A chunk whose footer cannot be read counts as not written, as fetch treats it."""
    def rows(chunks: list[Path]) -> int:
        total = 0
        for path in chunks:
            try:
                total += pq.read_metadata(path).num_rows
            except UNREADABLE:
                pass
        return total

    return rows(batch.success_chunks()), rows(batch.error_chunks())


def bytes_per_row(layout: RunLayout) -> float | None:
    """What a committed row has taken on disk so far (chunks, artifacts), on average; None
    before the first."""
    rows = committed_rows(layout)
    if not rows:
        return None
    size = sum(path.stat().st_size for root in (layout.downloaded, layout.download_errors)
               for path in root.rglob("*") if path.is_file())
    return size / rows


def committed_rows(layout: RunLayout) -> int:
    """Rows committed so far over a whole run: finished batches by their marker, the others by
    their chunks' footers."""
    total = 0
    folders = {path.relative_to(root) for root in (layout.downloaded, layout.download_errors)
               for path in root.glob("*/*")}
    for relative in folders:
        batch = BatchFiles(layout.downloaded / relative, layout.download_errors / relative)
        total += json.loads(batch.marker.read_text())["rows"] if batch.finished else \
            sum(chunk_row_counts(batch))
    return total


def has_downloads(layout: RunLayout) -> bool:
    """Whether any row was committed in the run (a chunk, or a finished batch)."""
    return layout.has_chunks(SUCCESS_PREFIX) or layout.has_chunks(ERROR_PREFIX) or \
        bool(layout.finished_markers())


def finished_batches(layout: RunLayout) -> list[tuple[str, int]]:
    """(server_name, partition_id) of every prepared batch that has its `_completed` marker."""
    batches = []
    for row in pq.read_table(layout.servers).to_pylist():
        for partition in range(row["batches"]):
            if layout.batch_files(row["server_name"], partition).finished:
                batches.append((row["server_name"], partition))
    return batches


def errors_by_code(batch: BatchFiles) -> dict[str, int]:
    """A batch's committed errors, counted by error code (an unreadable chunk: not counted)."""
    counts: dict[str, int] = {}
    for path in batch.error_chunks():
        try:
            codes = pq.read_table(path, columns=["error_code"]).column(0).to_pylist()
        except UNREADABLE:
            continue
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
    return counts
