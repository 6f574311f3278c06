"""Fetch's output: a batch's results as atomically written chunk files and a `_completed` marker.

A batch's successes go to `downloaded_images/server_name=H/partition_id=N/successes-*.parquet`
and its errors to the same path under `download_errors/` (each tree reads as one table); each
chunk is written under a hidden temporary name, fsynced and renamed, so a reader (or a resumed
run) only ever sees whole chunks. The `_completed` marker, written last beside the successes,
makes the batch finished. Resuming skips every UUID already in a chunk; a kill loses only
unwritten chunks.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.errors import RETRYABLE
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

__all__ = ["COMPLETED_MARKER", "ERROR_PREFIX", "SUCCESS_PREFIX", "chunk_files"]


def committed_uuids(batch: BatchFiles) -> set[str]:
    """UUIDs that already have their final row in this batch."""
    done: set[str] = set()
    for path in batch.chunks():
        done.update(pq.read_table(path, columns=["uuid"]).column("uuid").to_pylist())
    return done


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
    with committing(tmp, table.nbytes):
        pq.write_table(table, tmp, compression=compression, row_group_size=ROWS_PER_ROW_GROUP)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)


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
        """Flush, check every row of the batch is committed once, and write the marker."""
        self.close()
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
    read)."""
    def rows(chunks: list[Path]) -> int:
        return sum(pq.read_metadata(path).num_rows for path in chunks)

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
    return any(layout.downloaded.glob(f"*/*/{SUCCESS_PREFIX}*.parquet")) or \
        any(layout.download_errors.glob(f"*/*/{ERROR_PREFIX}*.parquet")) or \
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
    """A batch's committed errors, counted by error code."""
    counts: dict[str, int] = {}
    for path in batch.error_chunks():
        for code in pq.read_table(path, columns=["error_code"]).column(0).to_pylist():
            counts[code] = counts.get(code, 0) + 1
    return counts
