"""`verify`: is what the download wrote sound? Every chunk, finished batch or not.

A finished batch is sound when every chunk reads, the counts match its `_completed` marker, every
stored image decodes and hashes to its `hashsum_resized`, and its output holds each prepared
UUID exactly once, in successes or in errors. An unfinished batch's chunks must read, hold
sound images and UUIDs of the batch, each once. Batches are checked in parallel processes
(decoding is the cost). `--fix` moves broken finished batches aside, under
`OUT/verify/quarantine/`, and an unfinished batch's broken chunks under `OUT/quarantine/` (as
fetch does with a chunk it cannot read), so that the next fetch downloads their rows again;
nothing is deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from distributed_downloader.chunks import set_aside
from distributed_downloader.errors import UserError
from distributed_downloader.executors.batches import run_batches
from distributed_downloader.formats import fill_images
from distributed_downloader.storage import (
    BatchFiles,
    RunLayout,
    atomic_write_json,
    upgrade_layout,
)
from distributed_downloader.writers import resolve_duplicates

MAX_PROBLEMS_LISTED = 5  # per batch; the count says how many more


@dataclass
class BatchCheck:
    server_name: str
    partition_id: int
    finished: bool = True
    rows: int = 0
    images: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)
    bad_chunks: dict[str, str] = field(default_factory=dict)  # path -> its first problem
    duplicates: int = 0  # UUIDs in more than one row

    @property
    def folder_name(self) -> str:
        return f"server_name={self.server_name}/partition_id={self.partition_id}"


def _image_problem(data: bytes, expected_md5: str) -> str | None:
    if hashlib.md5(data).hexdigest() != expected_md5:
        return "hashsum_resized does not match the stored bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding
        return f"stored image does not decode ({type(exc).__name__})"
    return None


def check_batch(root: str, server_name: str, partition_id: int) -> BatchCheck:
    """Check one batch, finished or not; problems are plain sentences."""
    layout = RunLayout(Path(root))
    files = layout.batch_files(server_name, partition_id)
    check = BatchCheck(server_name, partition_id, finished=files.finished)
    marker: dict = {}
    if check.finished:
        try:
            marker = json.loads(files.marker.read_text())
        except (OSError, ValueError) as exc:
            check.problems.append(f"unreadable _completed marker ({exc})")
            return check
    seen: Counter = Counter()
    successes = _check_chunks(check, files, files.success_chunks(), seen, images=True)
    errors = _check_chunks(check, files, files.error_chunks(), seen, images=False)
    check.rows = successes + errors
    if check.finished and (successes, errors) != (marker.get("successes"),
                                                  marker.get("errors")):
        check.problems.append(f"chunks hold {successes} successes and {errors} errors, the "
                              f"marker says {marker.get('successes')} and {marker.get('errors')}")
    _check_uuids(check, seen, _prepared_uuids(layout, server_name, partition_id))
    return check


def _prepared_uuids(layout: RunLayout, server_name: str, partition_id: int) -> set[str]:
    prepared: set[str] = set()
    for path in layout.prepared_chunks(server_name, partition_id):
        prepared.update(pq.read_table(path, columns=["uuid"]).column(0).to_pylist())
    return prepared


def _check_chunks(check: BatchCheck, files: BatchFiles, chunks: list[Path], seen: Counter,
                  images: bool) -> int:
    """Read every chunk of one kind (successes: decode and hash each image too); returns the
    rows found. A chunk that fails is noted as bad, for --fix to set aside."""
    def bad(path: Path, problem: str) -> None:
        check.problems.append(problem)
        check.bad_chunks.setdefault(str(path), problem)

    rows_found = 0
    for path in chunks:
        check.chunks += 1
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file is the finding
            bad(path, f"{path.name} is unreadable ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0]})")
            continue
        uuids = table.column("uuid").to_pylist()
        seen.update(uuids)
        rows_found += len(uuids)
        if not images:
            continue
        rows = table.to_pylist()
        try:
            fill_images(path, rows)  # from the chunk, its output format's files, or a link
        except Exception as exc:  # noqa: BLE001 - a damaged image file is the finding
            bad(path, f"the images of {path.name} are unreadable ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0]})")
            continue
        for uuid, row, md5 in zip(uuids, rows, table.column("hashsum_resized").to_pylist()):
            problem = _image_problem(row["image"], md5) if row["image"] is not None else \
                "stored image missing from the chunk's images"
            if problem:
                bad(path, f"uuid {uuid} in {path.name}: {problem}")
        check.images += len(uuids)
    return rows_found


def _check_uuids(check: BatchCheck, seen: Counter, prepared: set[str]) -> None:
    """Each prepared UUID once (all of them, once the batch is finished), and no other."""
    twice = [uuid for uuid, count in seen.items() if count > 1]
    check.duplicates = len(twice)
    missing = prepared - set(seen)
    unknown = set(seen) - prepared
    if twice:
        check.problems.append(f"{len(twice)} UUIDs written more than once (e.g. {twice[0]})")
    if missing and check.finished:
        check.problems.append(f"{len(missing)} prepared UUIDs are in neither successes nor "
                              f"errors (e.g. {sorted(missing)[0]})")
    if unknown:
        check.problems.append(f"{len(unknown)} UUIDs that this batch never had (e.g. "
                              f"{sorted(unknown)[0]})")


def _batches_with_output(layout: RunLayout) -> list[tuple[str, int]]:
    """(server_name, partition_id) of every prepared batch that holds a chunk or a marker."""
    batches = []
    for row in pq.read_table(layout.servers).to_pylist():
        for partition in range(row["batches"]):
            files = layout.batch_files(row["server_name"], partition)
            if files.finished or files.chunks():
                batches.append((row["server_name"], partition))
    return batches


def _fix_unfinished(check: BatchCheck, layout: RunLayout) -> list[dict[str, str]]:
    """Set an unfinished batch's broken chunks aside (as fetch does with an unreadable one)
    and keep one row per UUID: fetch downloads the rows set aside again."""
    moved = []
    for chunk, problem in check.bad_chunks.items():
        for item in set_aside(Path(chunk), problem):
            moved.append({"chunk": str(item.source), "to": str(item.target),
                          "reason": item.reason})
    if check.duplicates:
        resolve_duplicates(layout.batch_files(check.server_name, check.partition_id))
    return moved


def run_verify(output: Path, fix: bool = False, workers: int | None = None) -> dict[str, Any]:
    layout = RunLayout(output)
    if not layout.prep_summary.exists():
        raise UserError(f"{output} has no finished prep: nothing to verify")
    layout.check_writable()  # it writes its findings into OUT/verify/
    upgrade_layout(layout)
    started = time.monotonic()
    batches = [(str(output), server, partition)
               for server, partition in _batches_with_output(layout)]
    checks: list[BatchCheck] = run_batches(check_batch, batches, workers)
    finished = [check for check in checks if check.finished]
    unfinished = [check for check in checks if not check.finished]
    broken = [check for check in checks if check.problems]
    moved, set_aside_chunks = [], []
    if fix:
        quarantine = layout.root / "verify" / "quarantine" / time.strftime("%Y%m%d-%H%M%S")
        for check in broken:
            if not check.finished:
                set_aside_chunks += _fix_unfinished(check, layout)
                continue
            files = layout.batch_files(check.server_name, check.partition_id)
            target = quarantine / check.folder_name
            target.mkdir(parents=True, exist_ok=True)
            for kind, folder in (("successes", files.successes), ("errors", files.errors)):
                if folder.exists():
                    shutil.move(str(folder), target / kind)
            moved.append(str(target))
    summary = {
        "batches_checked": len(finished),
        "batches_unfinished": json.loads(layout.prep_summary.read_text())["batches"]
        - len(finished),
        "unfinished_chunks_checked": sum(check.chunks for check in unfinished),
        "rows_checked": sum(check.rows for check in finished),
        "images_decoded": sum(check.images for check in finished),
        "broken": [{"batch": check.folder_name, "finished": check.finished,
                    "problems": check.problems[:MAX_PROBLEMS_LISTED],
                    "more_problems": max(0, len(check.problems) - MAX_PROBLEMS_LISTED)}
                   for check in broken],
        "moved_aside": moved,
        "chunks_set_aside": set_aside_chunks,
        "seconds": round(time.monotonic() - started, 2),
    }
    atomic_write_json(layout.root / "verify" / "summary.json", summary)
    return summary
