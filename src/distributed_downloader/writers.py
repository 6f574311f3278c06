"""Fetch's output: a batch's results as atomically written chunk files and a `completed` marker.

A batch's folder under `downloaded_images/` holds `successes-*.parquet` and `errors-*.parquet`
chunks, each written under a hidden temporary name, fsynced and renamed, so a reader (or a
resumed run) only ever sees whole chunks. The `completed` marker, written last, makes the batch
finished. Resuming skips every UUID already in a chunk; a kill loses only unwritten chunks.
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
    PARQUET_COMPRESSION,
    RunLayout,
    atomic_write_json,
    batch_folder,
    fsync_dir,
)

COMPLETED_MARKER = "completed"
SUCCESS_PREFIX = "successes-"
ERROR_PREFIX = "errors-"
CHUNK_MAX_ROWS = 500
CHUNK_MAX_BYTES = 16 << 20
CHUNK_MAX_AGE_SECONDS = 60.0
ROWS_PER_ROW_GROUP = 64  # small row groups: the writer buffers one at a time, not the chunk


def chunk_files(folder: Path, prefix: str) -> list[Path]:
    """Committed chunks of one kind (temporary files start with a dot and are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix)
                  and p.name.endswith(".parquet"))


def committed_uuids(folder: Path) -> set[str]:
    """UUIDs that already have their final row in this batch folder."""
    done: set[str] = set()
    for path in chunk_files(folder, SUCCESS_PREFIX) + chunk_files(folder, ERROR_PREFIX):
        done.update(pq.read_table(path, columns=["uuid"]).column("uuid").to_pylist())
    return done


def read_completed(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / COMPLETED_MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_stale_temporaries(folder: Path) -> None:
    """Half-written chunks of a killed run: never committed, safe to delete."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                path.unlink(missing_ok=True)


def reopen_for_retry(folder: Path) -> int:
    """Make a finished batch's retryable errors fetchable again; returns how many.

    The marker goes first, then each error chunk is replaced (atomically) by one without its
    retryable rows. A kill at any point leaves every row either committed or missing, and
    missing rows are what a resumed batch fetches.
    """
    retryable = [str(code) for code in RETRYABLE]
    reopened = 0
    chunks = chunk_files(folder, ERROR_PREFIX)
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
    (folder / COMPLETED_MARKER).unlink(missing_ok=True)
    fsync_dir(folder)
    for path, kept in plans:
        if kept.num_rows:
            write_chunk(kept, path)
        else:
            path.unlink()
    fsync_dir(folder)
    return reopened


def write_chunk(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # Encoded images do not compress: storing them as they are saves a copy and the CPU.
    compression = {name: "none" if name == "image" else PARQUET_COMPRESSION
                   for name in table.column_names}
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

    def __init__(self, folder: Path, keep_columns: list[str], budget: BufferBudget,
                 writer_token: str | None = None, output_format: str = "parquet") -> None:
        self.folder = folder
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
        folder.mkdir(parents=True, exist_ok=True)
        budget.writers.append(self)

    def add_success(self, row: dict[str, Any]) -> None:
        self._successes.append(row)
        size = len(row["image"] or b"")  # nothing held for a row reused by link
        self.buffered_bytes += size
        self.budget.used += size
        self._added()

    def add_error(self, row: dict[str, Any]) -> None:
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
        """Commit what is buffered as one successes and one errors chunk."""
        if not self._successes and not self._errors:
            return
        name = f"{self.token}-{self.sequence:05d}.parquet"
        self.sequence += 1
        if self._successes:
            table = pa.Table.from_pylist(self._successes, schema=self.successes_schema)
            write_chunk(table, self.folder / (SUCCESS_PREFIX + name))
            self.written_successes += len(self._successes)
        if self._errors:
            table = pa.Table.from_pylist(self._errors, schema=ERRORS)
            write_chunk(table, self.folder / (ERROR_PREFIX + name))
            self.written_errors += len(self._errors)
        fsync_dir(self.folder)
        self.budget.used -= self.buffered_bytes
        self._successes, self._errors = [], []
        self.buffered_bytes = 0
        self._oldest = None

    def close(self) -> None:
        self.flush()
        if self in self.budget.writers:
            self.budget.writers.remove(self)

    def complete(self, batch_rows: int) -> dict[str, int]:
        """Flush, check every row of the batch is committed once, and write the marker."""
        self.close()
        successes, errors = chunk_row_counts(self.folder)
        if successes + errors != batch_rows:
            raise RuntimeError(
                f"{self.folder}: {successes} successes + {errors} errors != {batch_rows} rows"
            )
        counts = {"rows": batch_rows, "successes": successes, "errors": errors}
        if self.output_format != "parquet":
            from distributed_downloader.formats import convert_batch

            convert_batch(self.folder, self.output_format)
        atomic_write_json(self.folder / COMPLETED_MARKER,
                          {**counts, "errors_by_code": errors_by_code(self.folder),
                           "output_format": self.output_format, "finished_at": time.time()})
        return counts


def chunk_row_counts(folder: Path) -> tuple[int, int]:
    """(successes, errors) committed in a batch folder, from the chunks' Parquet footers (no
    data is read)."""
    def rows(prefix: str) -> int:
        return sum(pq.read_metadata(path).num_rows for path in chunk_files(folder, prefix))

    return rows(SUCCESS_PREFIX), rows(ERROR_PREFIX)


def committed_rows(downloaded: Path) -> int:
    """Rows committed so far over a whole run: finished batches by their marker, the others by
    their chunks' footers."""
    total = 0
    for folder in downloaded.glob("*/*"):
        marker = folder / COMPLETED_MARKER
        total += json.loads(marker.read_text())["rows"] if marker.exists() else \
            sum(chunk_row_counts(folder))
    return total


def has_downloads(downloaded: Path) -> bool:
    """Whether any row was committed in the run (a chunk, or a finished batch)."""
    return any(downloaded.glob(f"*/*/{SUCCESS_PREFIX}*.parquet")) or \
        any(downloaded.glob(f"*/*/{ERROR_PREFIX}*.parquet")) or \
        any(downloaded.glob(f"*/*/{COMPLETED_MARKER}"))


def finished_batches(layout: RunLayout) -> list[tuple[str, int]]:
    """(server_name, partition_id) of every prepared batch that has its `completed` marker."""
    batches = []
    for row in pq.read_table(layout.servers).to_pylist():
        for partition in range(row["batches"]):
            folder = batch_folder(layout.downloaded, row["server_name"], partition)
            if (folder / COMPLETED_MARKER).exists():
                batches.append((row["server_name"], partition))
    return batches


def errors_by_code(folder: Path) -> dict[str, int]:
    """A batch folder's committed errors, counted by error code."""
    counts: dict[str, int] = {}
    for path in chunk_files(folder, ERROR_PREFIX):
        for code in pq.read_table(path, columns=["error_code"]).column(0).to_pylist():
            counts[code] = counts.get(code, 0) + 1
    return counts
