"""A batch's writer: chunks are committed on the worker's writer thread while the event loop goes
on, a batch is marked finished only once its chunks are on disk, a failed chunk counts no row,
and rows wait for the disk when it falls behind.

The sink here is the Parquet one behind a gate the test opens: a disk as slow as the test wants.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from distributed_downloader.errors import OutOfSpace
from distributed_downloader.formats import ParquetSink
from distributed_downloader.storage import RunLayout
from distributed_downloader.writers import (
    CHUNK_MAX_BYTES,
    BatchWriter,
    BufferBudget,
    DiskThread,
)

GATE_SECONDS = 5.0  # how long a closed gate holds a commit at most (an old, blocking writer)


class GatedSink(ParquetSink):
    """Commits only once `gate` is open (or fails with `failure`); records the chunks' order."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.gate = threading.Event()
        self.failure = failure
        self.committed: list[str] = []

    def commit(self, chunk: Path, index: Any, images: list[bytes | None]) -> None:
        self.gate.wait(GATE_SECONDS)
        if self.failure is not None:
            raise self.failure
        super().commit(chunk, index, images)
        self.committed.append(chunk.name)


def row(number: int, image_bytes: int = 1000) -> dict[str, Any]:
    return {"uuid": f"{number:032x}", "source_id": str(number),
            "identifier": f"http://127.0.0.2/img/{number}.jpg", "image": bytes(image_bytes),
            "image_format": "jpeg", "original_size": [10, 10], "resized_size": [10, 10]}


def open_writer(tmp_path: Path, budget: BufferBudget, disk: DiskThread,
                sink: GatedSink, partition: int = 0) -> BatchWriter:
    writer = BatchWriter(RunLayout(tmp_path).batch_files("127.0.0.2", partition), [], budget,
                         disk, f"test{partition}")
    writer.sink = sink
    return writer


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp" in path.name]


def test_the_loop_goes_on_while_a_chunk_is_written_and_the_marker_waits_for_it(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        budget, disk, sink = BufferBudget(32 << 20), DiskThread(), GatedSink()
        writer = open_writer(tmp_path, budget, disk, sink)
        for number in range(3):
            writer.add_success(row(number))
        started = time.monotonic()
        writer.flush()
        assert time.monotonic() - started < 1.0, "the loop waited for the disk"
        writer.add_error({"uuid": "e" * 32, "error_code": "not_found", "error_msg": "404"})
        completing = asyncio.create_task(writer.complete(4))
        await asyncio.sleep(0.2)  # the loop runs while the chunk waits behind the gate
        assert not completing.done()
        assert not writer.batch.marker.exists()
        assert writer.rows_added == (3, 1)  # being written: still counted as given
        assert (writer.written_successes, budget.used) == (0, 3000)  # bytes held until on disk
        sink.gate.set()
        counts = await completing
        assert counts == {"rows": 4, "successes": 3, "errors": 1}
        marker = json.loads(writer.batch.marker.read_text())
        assert (marker["successes"], marker["errors"]) == (3, 1)
        assert (budget.used, budget.writing) == (0, 0)
        assert sink.committed == ["successes-test0-00000.parquet"]
        disk.close()

    asyncio.run(scenario())
    chunks = sorted(tmp_path.glob("download*/*/*/*.parquet"))
    assert [pq.read_table(chunk).num_rows for chunk in chunks] == [1, 3]  # errors, successes
    assert leftovers(tmp_path) == []


def test_a_batch_s_chunks_are_committed_in_the_order_of_their_names(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        disk, sink = DiskThread(), GatedSink()
        sink.gate.set()
        writer = open_writer(tmp_path, BufferBudget(32 << 20), disk, sink)
        for number in range(12):
            writer.add_success(row(number))
            writer.flush()
        assert (await writer.complete(12))["successes"] == 12
        disk.close()
        return sink.committed

    committed = asyncio.run(scenario())
    assert len(committed) == 12 and committed == sorted(committed)


def test_a_failed_chunk_counts_no_row_tells_the_worker_and_leaves_the_batch_unfinished(
        tmp_path: Path) -> None:
    full = OutOfSpace(tmp_path, 3000, 0)
    told: list[BaseException] = []

    async def scenario() -> BatchWriter:
        budget, disk = BufferBudget(32 << 20), DiskThread(on_failure=told.append)
        sink = GatedSink(failure=full)
        sink.gate.set()
        writer = open_writer(tmp_path, budget, disk, sink)
        for number in range(3):
            writer.add_success(row(number))
        with pytest.raises(OutOfSpace):
            await writer.complete(3)
        assert (budget.used, budget.writing) == (0, 0)  # the lost rows' bytes are given back
        disk.close()
        return writer

    writer = asyncio.run(scenario())
    assert told == [full]
    assert writer.rows_added == (0, 0)  # nothing counted that was not written
    assert not writer.batch.marker.exists()
    assert list(tmp_path.glob("download*/*/*/*.parquet")) == []
    assert leftovers(tmp_path) == []


def test_rows_wait_for_the_disk_while_the_writer_is_more_than_a_chunk_behind(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        budget, disk, sink = BufferBudget(64 << 20), DiskThread(), GatedSink()
        writers = [open_writer(tmp_path, budget, disk, sink, partition)
                   for partition in range(2)]
        await budget.wait_for_disk()  # nothing being written: no wait
        for number, writer in enumerate(writers):  # two chunks of 10 MiB: 20 MiB > 16 MiB
            writer.add_success(row(number, image_bytes=10 << 20))
            writer.flush()
        assert budget.writing > CHUNK_MAX_BYTES
        waiting = asyncio.create_task(budget.wait_for_disk())
        await asyncio.sleep(0.2)
        assert not waiting.done(), "rows went on while the disk was behind"
        sink.gate.set()
        await asyncio.wait_for(waiting, GATE_SECONDS)
        assert budget.writing <= CHUNK_MAX_BYTES
        for number, writer in enumerate(writers):
            assert (await writer.complete(1))["successes"] == 1
        assert (budget.used, budget.writing) == (0, 0)
        disk.close()

    asyncio.run(scenario())
