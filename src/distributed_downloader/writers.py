"""Fetch's output: a batch's results as atomically written chunk files and a `_completed` marker.

A batch's successes go to `downloaded_images/server_name=H/partition_id=N/successes-*.parquet`
and its errors to the same path under `download_errors/` (each tree reads as one table). The
batch's writer buffers rows column by column and commits them in chunks through the sink of the
run's output format (formats.py), which writes each file once, atomically. The `_completed`
marker, written last beside the successes, makes the batch finished. Resuming skips every UUID
already in a chunk; a kill loses only unwritten chunks. A chunk that cannot be read is moved
aside (`OUT/quarantine/`, never deleted) and its rows count as not written; a UUID committed
twice keeps one row. A batch's end reads its chunks back only when another writer may have
touched them: a writer that finds just the chunks it began with and its own knows their rows.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.chunks import (
    SetAside,
    chunk_row_counts,
    count_error_codes,
    errors_by_code,
    read_uuids,
    readable_chunks,
    set_aside,
    write_chunk,
)
from distributed_downloader.errors import RETRYABLE
from distributed_downloader.formats import Sink, rewrite_chunk, set_aside_uncommitted, sink_for
from distributed_downloader.schema import ERRORS, successes_schema
from distributed_downloader.storage import (
    ERROR_PREFIX,
    SUCCESS_PREFIX,
    BatchFiles,
    RunLayout,
    atomic_write_json,
    fsync_path,
    space_errors,
)

CHUNK_MAX_ROWS = 500
# A chunk's images at most: writing it copies them into Arrow once more, so a worker holds
# up to max_output_memory plus this while it writes.
CHUNK_MAX_BYTES = 16 << 20
CHUNK_MAX_AGE_SECONDS = 60.0

log = logging.getLogger(__name__)


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
            if path.name.startswith(SUCCESS_PREFIX):
                rewrite_chunk(path, pa.array(keep))
            else:
                write_chunk(pq.read_table(path).filter(pa.array(keep)), path)
            fsync_path(path.parent)
            log.warning("%s: %s", path, reason)
    return dropped


def remove_stale_temporaries(batch: BatchFiles) -> None:
    """Half-written files of a killed run: never committed, safe to delete. Whole images whose
    chunk was never written are set aside."""
    for folder in (batch.successes, batch.errors):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(".") and ".tmp-" in path.name:
                    path.unlink(missing_ok=True)
    set_aside_uncommitted(batch)


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
    fsync_path(batch.successes)
    for path, kept in plans:
        if kept.num_rows:
            write_chunk(kept, path)
        else:
            path.unlink()
    fsync_path(batch.errors)
    return reopened


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


@dataclass
class Tally:
    """A batch's committed rows as its writer knows them without reading a chunk: those of
    the chunks there when it began (each UUID once), plus what it committed itself."""

    chunks: set[Path]
    successes: int
    errors: int
    errors_by_code: dict[str, int]

    def add(self, chunk: Path, rows: int, error_codes: list[str] | None = None) -> None:
        """A chunk this writer committed: its successes, or its errors with their codes."""
        self.chunks.add(chunk)
        if error_codes is None:
            self.successes += rows
            return
        self.errors += rows
        for code in error_codes:
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1


class ColumnBuffer:
    """Rows held as one list per column of `schema`: a chunk's table is built from the columns
    as they are (`Table.from_pydict`), with no row-to-column transpose at flush time."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0

    def append(self, row: dict[str, Any]) -> None:
        """A row's value for each column (a missing one is null; other keys are ignored)."""
        for name, values in self.columns.items():
            values.append(row.get(name))
        self.rows += 1

    def table(self, without: str | None = None) -> pa.Table:
        """The rows as a table (all but the column `without`, which the caller takes as a
        list: a sink that keeps images in files of their own never copies them into Arrow)."""
        schema = self.schema if without is None else \
            self.schema.remove(self.schema.get_field_index(without))
        return pa.Table.from_pydict({name: self.columns[name] for name in schema.names},
                                    schema=schema)

    def clear(self) -> None:
        for values in self.columns.values():
            values.clear()
        self.rows = 0


class BatchWriter:
    """Collects one batch's final rows and commits them in chunks, the successes through the
    sink of the output format chosen here (its files written once, the chunk last)."""

    def __init__(self, batch: BatchFiles, keep_columns: list[str], budget: BufferBudget,
                 writer_token: str | None = None, output_format: str = "parquet") -> None:
        self.batch = batch
        self.output_format = output_format
        self.sink: Sink = sink_for(output_format)
        self.budget = budget
        self.token = writer_token or secrets.token_hex(4)
        self.sequence = 0
        self._successes = ColumnBuffer(successes_schema(keep_columns))
        self._errors = ColumnBuffer(ERRORS)
        self.buffered_bytes = 0
        self._oldest: float | None = None
        self.written_successes = 0
        self.written_errors = 0
        self.discarded = False
        self._tally: Tally | None = None  # known once `take_stock` found each UUID once
        for folder in (batch.successes, batch.errors):
            with space_errors(folder.parent, 0):
                folder.mkdir(parents=True, exist_ok=True)
        budget.writers.append(self)

    def take_stock(self) -> tuple[set[str], tuple[int, int]]:
        """The UUIDs already committed in the batch (by an earlier run) and their (successes,
        errors) rows, from one read of each chunk as the batch starts; an unreadable chunk is
        set aside on the way (its rows are fetched again). Kept, with the chunks' names and
        their error codes (read only when there are earlier errors: on a resume), so that
        `complete` need not read any chunk back."""
        chunks = readable_chunks(self.batch)
        done: set[str] = set()
        successes = errors = 0
        for path, uuids in chunks.items():
            done.update(uuids)
            if path.parent == self.batch.successes:
                successes += len(uuids)
            else:
                errors += len(uuids)
        error_chunks = [path for path in chunks if path.parent == self.batch.errors]
        by_code = count_error_codes(error_chunks)
        each_uuid_once = len(done) == successes + errors
        if each_uuid_once and sum(by_code.values()) == errors:  # and every error's code read
            self._tally = Tally(set(chunks), successes, errors, by_code)
        return done, (successes, errors)

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
        return (self.written_successes + self._successes.rows,
                self.written_errors + self._errors.rows)

    def _added(self) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        if (self._successes.rows + self._errors.rows >= CHUNK_MAX_ROWS
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
        if self.discarded or not (self._successes.rows or self._errors.rows):
            return
        name = f"{self.token}-{self.sequence:05d}.parquet"
        self.sequence += 1
        if self._successes.rows:
            self.sink.commit(self.batch.successes / (SUCCESS_PREFIX + name),
                             self._successes.table(without="image"),
                             self._successes.columns["image"])
            fsync_path(self.batch.successes)
            if self._tally is not None:
                self._tally.add(self.batch.successes / (SUCCESS_PREFIX + name),
                                self._successes.rows)
            self.written_successes += self._successes.rows
            self.budget.used -= self.buffered_bytes
            self._successes.clear()
            self.buffered_bytes = 0
        if self._errors.rows:
            write_chunk(self._errors.table(), self.batch.errors / (ERROR_PREFIX + name))
            fsync_path(self.batch.errors)
            if self._tally is not None:
                self._tally.add(self.batch.errors / (ERROR_PREFIX + name), self._errors.rows,
                                self._errors.columns["error_code"])
            self.written_errors += self._errors.rows
            self._errors.clear()
        self._oldest = None

    def close(self) -> None:
        self.flush()
        self._leave_budget()

    def discard(self) -> None:
        """Write nothing more (the disk is full): the buffered rows are dropped, and fetched
        again by the next run."""
        self.discarded = True
        self.budget.used -= self.buffered_bytes
        self._successes.clear()
        self._errors.clear()
        self.buffered_bytes = 0
        self._leave_budget()

    def _leave_budget(self) -> None:
        if self in self.budget.writers:
            self.budget.writers.remove(self)

    def complete(self, batch_rows: int) -> dict[str, int]:
        """Flush, keep one row per UUID, check every row of the batch is committed, and write
        the marker. Nothing written is read back or converted: the sink wrote it finished.
        When the batch's chunks are just those it began with and its own, none is read at all:
        this writer committed only rows not committed before, each once, so no UUID is in two
        of them and their rows are known. Any other chunk there (another writer's, one of its
        own gone), or rows that do not add up, and every chunk is read: duplicates resolved,
        rows counted."""
        self.close()
        tally = self._tally
        if (tally is None or tally.successes + tally.errors != batch_rows
                or set(self.batch.chunks()) != tally.chunks):
            resolve_duplicates(self.batch)
            successes, errors = chunk_row_counts(self.batch)
            tally = Tally(set(), successes, errors, errors_by_code(self.batch))
        if tally.successes + tally.errors != batch_rows:
            raise RuntimeError(f"{self.batch.successes}: {tally.successes} successes + "
                               f"{tally.errors} errors != {batch_rows} rows")
        counts = {"rows": batch_rows, "successes": tally.successes, "errors": tally.errors}
        atomic_write_json(self.batch.marker,
                          {**counts, "errors_by_code": tally.errors_by_code,
                           "output_format": self.output_format, "finished_at": time.time()})
        return counts


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
