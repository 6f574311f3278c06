"""Where a run keeps its files, and how they are written so that a reader never sees half a file."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
    def duplicates(self) -> Path:
        return self.prep / "duplicates.parquet"

    @property
    def servers(self) -> Path:
        return self.prep / "servers.parquet"

    @property
    def downloaded(self) -> Path:
        """Fetch's output: the same Hive layout as the batches, with results in it."""
        return self.root / "downloaded_images"

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


def batch_folder(batches_root: Path, server_name: str, partition_id: int) -> Path:
    """A batch's Hive-partition folder, the same under prep's batches and fetch's output."""
    return batches_root / f"server_name={server_name}" / f"partition_id={partition_id}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a whole table atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def publish(source: Path, destination: Path) -> None:
    """Move a finished file or folder into place with one rename (replacing what was there)."""
    if destination.is_dir() and not destination.is_symlink():
        trash = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, trash)
        os.replace(source, destination)
        shutil.rmtree(trash)
    else:
        os.replace(source, destination)
    fsync_dir(destination.parent)
