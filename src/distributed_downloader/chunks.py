"""Chunk files, read and written whole: the helpers the batch writer, the output formats and the
readers of a run share (below all of them, so none imports another to reach these).

A chunk is written under a hidden temporary name, fsynced and renamed, so a reader (or a
resumed run) only ever sees whole chunks. A chunk that cannot be read is moved aside
(`OUT/quarantine/`, never deleted), with its images when its output format keeps them in a
file of their own, and its rows count as not written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.errors import OutOfSpace
from distributed_downloader.storage import (
    CHUNK_IMAGE_SUFFIXES,
    PARQUET_COMPRESSION,
    BatchFiles,
    RunLayout,
    chunk_images,
    committing,
    fsync_path,
    space_errors,
    temporary_name,
)

ROWS_PER_ROW_GROUP = 64  # small row groups: the writer buffers one at a time, not the chunk

# What reading a damaged file raises: truncated or not Parquet (ArrowInvalid, a ValueError),
# unreadable bytes (OSError).
UNREADABLE = (OSError, ValueError, pa.ArrowException)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetAside:
    """A file taken out of the result: where it was, where it is now, and why."""

    source: Path
    target: Path
    reason: str


def write_chunk(table: pa.Table, path: Path) -> None:
    """Write a chunk atomically; on a full disk, `OutOfSpace` and no file at all."""
    tmp = temporary_name(path)
    # Encoded images do not compress, nor repeat, nor have a useful min and max: storing them
    # as they are, with no dictionary and no statistics, saves a copy, a hash of every byte and
    # a comparison of every pair (a fifth of a chunk's CPU, written on a fetch worker's loop).
    compression = {name: "none" if name == "image" else PARQUET_COMPRESSION
                   for name in table.column_names}
    described = [name for name in table.column_names if name != "image"]
    try:
        with committing(tmp, table.nbytes):
            pq.write_table(table, tmp, compression=compression, use_dictionary=described,
                           write_statistics=described, row_group_size=ROWS_PER_ROW_GROUP)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except OutOfSpace as exc:
        exc.rows_in_write = table.num_rows  # what a row takes, when none was stored yet
        raise


def read_file(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, read directly. `pq.read_table` goes through pyarrow.dataset, whose
    import (pandas with it: ~0.2 s of CPU) a fetch worker would pay on its event loop as its
    first batch starts, and whose set-up every read pays again (3x the CPU of a small chunk).
    A column asked for that the file lacks raises, as `pq.read_table` does (a file's own read
    leaves it out)."""
    with pq.ParquetFile(path) as file:
        table = file.read(columns=columns)
    missing = [name for name in columns or () if name not in table.column_names]
    if missing:
        raise pa.ArrowInvalid(f"no column {missing[0]}")
    return table


def read_uuids(path: Path, columns: tuple[str, ...] = ()) -> tuple[list[str], str | None]:
    """A chunk's UUIDs (reading `columns` too), or ([], why it cannot be read)."""
    try:
        table = read_file(path, columns=["uuid", *columns])
        return table.column("uuid").to_pylist(), None
    except UNREADABLE as exc:
        return [], f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def set_aside(path: Path, reason: str) -> list[SetAside]:
    """Take a chunk out of the result, into `OUT/quarantine/` under its own path (a number
    added when one of that name is there already), its own image file after it; logged,
    never deleted. Its rows count as not written, so fetch asks for them again: a finished
    batch losing a chunk loses its `_completed` marker too (moved beside it), or those rows
    would never be fetched."""
    batch = BatchFiles.of_chunk(path)
    moved = [_move_aside(path, batch.run, reason)]
    for suffix in CHUNK_IMAGE_SUFFIXES:  # the chunk first: never rows without their images
        if chunk_images(path, suffix).exists():
            moved.append(_move_aside(chunk_images(path, suffix), batch.run,
                                     f"the images of {path.name}"))
    if batch.finished:
        moved.append(_move_aside(batch.marker, batch.run, f"its batch lost {path.name}"))
    return moved


def set_aside_images(batch: BatchFiles, paths: list[Path], reason: str) -> list[SetAside]:
    """Take image files that no committed chunk lists out of the result, into the quarantine
    as `set_aside` does (one log line for them all): whole images, never deleted."""
    moved = [_move_aside(path, batch.run, reason, quiet=True) for path in paths]
    if moved:
        log.warning("%s: %d image files %s; moved to %s", batch.successes, len(moved), reason,
                    moved[0].target.parent)
    return moved


def _move_aside(path: Path, layout: RunLayout, reason: str, quiet: bool = False) -> SetAside:
    target = layout.quarantine / path.relative_to(layout.root)
    copies = 0
    while target.exists():
        copies += 1
        target = target.with_name(f"{path.name}.{copies}")
    with space_errors(target.parent, 0):
        target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)  # same file system (both under OUT): a rename, nothing copied
    fsync_path(path.parent)
    fsync_path(target.parent)
    if not quiet:
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


def errors_by_code(batch: BatchFiles) -> dict[str, int]:
    """A batch's committed errors, counted by error code (an unreadable chunk: not counted)."""
    return count_error_codes(batch.error_chunks())


def count_error_codes(chunks: list[Path]) -> dict[str, int]:
    """The rows of these error chunks, counted by error code (an unreadable chunk: not
    counted)."""
    counts: dict[str, int] = {}
    for path in chunks:
        try:
            codes = read_file(path, columns=["error_code"]).column(0).to_pylist()
        except UNREADABLE:
            continue
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
    return counts

