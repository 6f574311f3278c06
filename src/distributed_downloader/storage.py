"""Where a run keeps its files, and how they are written so that a reader never sees half a file."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.errors import OutOfSpace, UserError, is_out_of_space

PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one run, under its output folder `OUT`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    @property
    def prep_work(self) -> Path:
        """Scratch space of a prep in progress; published piece by piece when it succeeds."""
        return self.prep / ".work"

    @property
    def batches(self) -> Path:
        return self.prep / "batches"

    @property
    def rejected(self) -> Path:
        return self.prep / "rejected.parquet"

    @property
    def dropped(self) -> Path:
        """Rows the GBIF filter left out, each with its reason and the value it read."""
        return self.prep / "dropped.parquet"

    @property
    def duplicates(self) -> Path:
        return self.prep / "duplicates.parquet"

    @property
    def servers(self) -> Path:
        return self.prep / "servers.parquet"

    @property
    def downloaded(self) -> Path:
        """Fetch's stored images: the same Hive layout as the batches, successes only, so the
        folder reads as one table (`pandas.read_parquet(OUT/downloaded_images)`)."""
        return self.root / "downloaded_images"

    @property
    def download_errors(self) -> Path:
        """Fetch's failed rows, one table beside the successes, in the same Hive layout."""
        return self.root / "download_errors"

    def check_writable(self) -> None:
        """Fail in one line, before any work, when the run folder cannot be made or written."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a folder: the run's output is a folder")
        probe = self.root / f".write-test-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            if is_out_of_space(exc):
                raise OutOfSpace(self.root, 0, free_bytes(self.root)) from None
            raise UserError(f"cannot write into {self.root}: {exc.strerror}") from None

    def batch_files(self, server_name: str, partition_id: int) -> BatchFiles:
        return BatchFiles(batch_folder(self.downloaded, server_name, partition_id),
                          batch_folder(self.download_errors, server_name, partition_id))

    def prepared_chunks(self, server_name: str, partition_id: int) -> list[Path]:
        """The Parquet files prep wrote for one batch (its rows to fetch)."""
        return sorted(batch_folder(self.batches, server_name, partition_id).glob("*.parquet"))

    def finished_markers(self) -> list[Path]:
        return list(self.downloaded.glob(f"*/*/{COMPLETED_MARKER}"))

    def _chunk_tree(self, prefix: str) -> Path:
        return self.downloaded if prefix == SUCCESS_PREFIX else self.download_errors

    def has_chunks(self, prefix: str) -> bool:
        """Whether any chunk of one kind (SUCCESS_PREFIX or ERROR_PREFIX) was committed."""
        return any(self._chunk_tree(prefix).glob(f"*/*/{prefix}*.parquet"))

    def chunk_pattern(self, prefix: str) -> str:
        """Every committed chunk of one kind, as a quoted glob for DuckDB's read_parquet."""
        return sql_path(self._chunk_tree(prefix) / "*" / "*" / f"{prefix}*.parquet")

    @property
    def server_profiles(self) -> Path:
        """Each server's learned (or probed) rate, read by the next run."""
        return self.root / "profiles" / "servers.csv"

    @property
    def rate_overrides(self) -> Path:
        """The user's hand-set rates and exclusions (`--rates`), kept with the run."""
        return self.root / "profiles" / "rates.csv"

    @property
    def robots(self) -> Path:
        """Each server's robots.txt as last fetched, with when it expires (one JSON each)."""
        return self.root / "profiles" / "robots"

    @property
    def profile_summary(self) -> Path:
        """Written by the profile stage: its presence means the servers were probed."""
        return self.root / "profiles" / "summary.json"

    @property
    def fetch_state(self) -> Path:
        """Rewritten every few seconds by a running fetch: each server's live budget."""
        return self.root / "fetch_state.json"

    @property
    def fetch_log(self) -> Path:
        """One JSON line every few seconds of every fetch: the run's history, for status."""
        return self.root / "fetch_progress.jsonl"

    @property
    def prep_summary(self) -> Path:
        """Written last: its presence is what marks a prep as finished."""
        return self.prep / "summary.json"

    @property
    def run_lock(self) -> Path:
        """Who writes into the run folder now: one command at a time (runlock.py)."""
        return self.root / "run.lock"

    @property
    def output_settings(self) -> Path:
        """The settings that shape what is stored, fixed by the run's first fetch."""
        return self.root / "output_settings.json"

    @property
    def quarantine(self) -> Path:
        """Files taken out of the result (unreadable chunks, duplicated rows' chunks), each
        under its own path relative to `OUT`: never deleted, never read as results."""
        return self.root / "quarantine"


def sql_path(path: Path | str) -> str:
    """A path as a SQL string literal (quotes doubled): the one way paths enter a query."""
    return "'" + str(path).replace("'", "''") + "'"


COMPLETED_MARKER = "_completed"  # `_`: Parquet readers (pyarrow, pandas, Spark) skip it
LEGACY_COMPLETED_MARKER = "completed"  # before errors had their own folder
SUCCESS_PREFIX = "successes-"
ERROR_PREFIX = "errors-"
# Where the other output formats keep a successes chunk's images (formats.py): beside
# `successes-KEY.parquet`, in `images-KEY.tar` (webdataset) or `images-KEY.h5` (hdf5), or in
# the batch's `images/` folder, one file per UUID (files).
IMAGES_PREFIX = "images-"
CHUNK_IMAGE_SUFFIXES = (".tar", ".h5")
IMAGES_FOLDER = "images"


def chunk_images(chunk: Path, suffix: str) -> Path:
    """The file that holds the images of the successes chunk `chunk` in a per-chunk format."""
    key = chunk.name.removeprefix(SUCCESS_PREFIX).removesuffix(".parquet")
    return chunk.with_name(f"{IMAGES_PREFIX}{key}{suffix}")


def images_chunk(artifact: Path) -> Path:
    """The successes chunk whose images `artifact` (`images-KEY.tar|.h5`) holds."""
    key = artifact.name.removeprefix(IMAGES_PREFIX).removesuffix(artifact.suffix)
    return artifact.with_name(f"{SUCCESS_PREFIX}{key}.parquet")


@dataclass(frozen=True)
class BatchFiles:
    """Where one batch's results are: its successes (with the `_completed` marker, written
    last, and any output-format artifact) and its errors, in two sibling trees."""

    successes: Path
    errors: Path

    @classmethod
    def of(cls, successes: Path) -> BatchFiles:
        """The batch whose successes folder this is (e.g. a `linked_from` of a reused row)."""
        run = RunLayout(successes.parent.parent.parent)
        return cls(successes, run.download_errors / successes.parent.name / successes.name)

    @classmethod
    def of_chunk(cls, chunk: Path) -> BatchFiles:
        """The batch a chunk (successes or errors) belongs to."""
        tree = chunk.parent.parent.parent
        run = RunLayout(tree.parent)
        relative = chunk.parent.relative_to(tree)
        return cls(run.downloaded / relative, run.download_errors / relative)

    @property
    def run(self) -> RunLayout:
        return RunLayout(self.successes.parent.parent.parent)

    @property
    def marker(self) -> Path:
        return self.successes / COMPLETED_MARKER

    @property
    def finished(self) -> bool:
        return self.marker.exists()

    def success_chunks(self) -> list[Path]:
        return chunk_files(self.successes, SUCCESS_PREFIX)

    def error_chunks(self) -> list[Path]:
        return chunk_files(self.errors, ERROR_PREFIX)

    def chunks(self) -> list[Path]:
        return self.success_chunks() + self.error_chunks()

    def image_files(self) -> list[Path]:
        """The per-chunk image files (`images-KEY.tar|.h5`), committed or left by a kill."""
        if not self.successes.is_dir():
            return []
        return sorted(p for p in self.successes.iterdir() if p.name.startswith(IMAGES_PREFIX)
                      and p.suffix in CHUNK_IMAGE_SUFFIXES)

    @property
    def images_folder(self) -> Path:
        """The batch's `images/` folder of the files output format."""
        return self.successes / IMAGES_FOLDER


def chunk_files(folder: Path, prefix: str) -> list[Path]:
    """Committed chunks of one kind (temporary files start with a dot and are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix)
                  and p.name.endswith(".parquet"))


def upgrade_layout(layout: RunLayout) -> int:
    """Move a run written before errors had their own tree into today's layout (renames only,
    each safe to repeat after a kill); returns how many files moved."""
    moved = 0
    for legacy in layout.downloaded.glob(f"*/*/{LEGACY_COMPLETED_MARKER}"):
        batch = BatchFiles.of(legacy.parent)
        for chunk in chunk_files(batch.successes, ERROR_PREFIX):
            batch.errors.mkdir(parents=True, exist_ok=True)
            os.replace(chunk, batch.errors / chunk.name)
            moved += 1
        os.replace(legacy, batch.marker)
        moved += 1
    for chunk in layout.downloaded.glob(f"*/*/{ERROR_PREFIX}*.parquet"):  # unfinished batches
        batch = BatchFiles.of(chunk.parent)
        batch.errors.mkdir(parents=True, exist_ok=True)
        os.replace(chunk, batch.errors / chunk.name)
        moved += 1
    return moved


def batch_folder(batches_root: Path, server_name: str, partition_id: int) -> Path:
    """A batch's Hive-partition folder, the same under prep's batches and fetch's output."""
    return batches_root / f"server_name={server_name}" / f"partition_id={partition_id}"


def sample_urls(layout: RunLayout, server_name: str, count: int,
                to_fetch_only: bool = True) -> list[str]:
    """The server's first `count` URLs (to fetch: rows an earlier download holds are not)."""
    urls: list[str] = []
    for partition in itertools.count():
        folder = batch_folder(layout.batches, server_name, partition)
        if not folder.is_dir():
            break
        for path in sorted(folder.glob("*.parquet")):
            wanted = [name for name in ("identifier", "reuse_from", "reuse_error_code")
                      if name in pq.read_schema(path).names]
            table = pq.read_table(path, columns=wanted)
            if to_fetch_only and "reuse_from" in table.column_names:
                table = table.filter(pc.and_(pc.is_null(table["reuse_from"]),
                                             pc.is_null(table["reuse_error_code"])))
            urls += table.column("identifier").to_pylist()[:count - len(urls)]
            if len(urls) >= count:
                return urls
    return urls


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (after a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename: hidden, so no glob of results sees it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def space_errors(folder: Path, size: int) -> Iterator[None]:
    """A full disk (or quota) while writing `size` bytes into `folder` becomes `OutOfSpace`,
    naming the folder: one line for the user instead of a traceback."""
    try:
        yield
    except OSError as exc:
        if is_out_of_space(exc):
            raise OutOfSpace(folder, size, free_bytes(folder)) from exc
        raise


@contextmanager
def committing(temporary: Path, size: int) -> Iterator[None]:
    """Around writing `temporary` and renaming it into place: on any failure (a full disk, a
    kill by exception) the temporary is removed, so nothing half-written stays behind."""
    try:
        with space_errors(temporary.parent, size):
            yield
    except BaseException:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename."""
    with space_errors(path.parent, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with committing(tmp, len(data)):
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def publish(source: Path, destination: Path) -> None:
    """Move a finished file or folder into place with one rename (replacing what was there)."""
    if destination.is_dir() and not destination.is_symlink():
        trash = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, trash)
        os.replace(source, destination)
        shutil.rmtree(trash)
    else:
        os.replace(source, destination)
    fsync_path(destination.parent)
