"""A batch's end: its writer reads no chunk back when the batch holds just the chunks it began
with and its own (their rows are known), and reads every chunk, keeping one row per UUID, when
anything else is there (another writer's chunk, one of its own gone)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from distributed_downloader import chunks
from distributed_downloader.formats import read_successes
from distributed_downloader.storage import BatchFiles, RunLayout
from distributed_downloader.writers import CHUNK_MAX_ROWS, BatchWriter, BufferBudget

FORMATS = ["parquet", "webdataset", "files", "hdf5"]


def success(i: int) -> dict[str, Any]:
    return {"uuid": f"{i:032x}", "source_id": str(i), "identifier": f"http://h/img/{i}.jpg",
            "original_size": [8, 8], "resized_size": [8, 8], "hashsum_original": "a" * 32,
            "hashsum_resized": "b" * 32, "image": f"jpeg {i}".encode(), "image_format": "jpeg"}


def error(i: int, code: str) -> dict[str, Any]:
    return {"uuid": f"{i:032x}", "identifier": f"http://h/img/{i}.jpg", "retry_count": 1,
            "error_code": code, "error_msg": code, "http_status": 404}


def writer_of(batch: BatchFiles, output_format: str = "parquet", token: str = "w0") -> BatchWriter:
    return BatchWriter(batch, [], BufferBudget(1 << 30), token, output_format)


@contextmanager
def chunk_reads() -> Iterator[list[Path]]:
    """The chunks read meanwhile (their rows or their footers), one entry per read."""
    seen: list[Path] = []
    read_file, read_metadata, read_table = chunks.read_file, pq.read_metadata, pq.read_table

    def recorded(read):
        def read_and_record(path, *args, **kwargs):
            seen.append(Path(path))
            return read(path, *args, **kwargs)
        return read_and_record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "read_file", recorded(read_file))
        patch.setattr(pq, "read_metadata", recorded(read_metadata))
        patch.setattr(pq, "read_table", recorded(read_table))
        yield seen


def marker(batch: BatchFiles) -> dict[str, Any]:
    return json.loads(batch.marker.read_text())


def committed_uuids(batch: BatchFiles) -> list[str]:
    """Every committed row's UUID, successes and errors, as a reader of the run sees them."""
    successes = [row["uuid"] for row in read_successes(batch.successes)]
    errors = [uuid for path in batch.error_chunks()
              for uuid in pq.read_table(path).column("uuid").to_pylist()]
    return successes + errors


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_batch_with_only_its_own_chunks_ends_without_reading_one(
        tmp_path: Path, output_format: str) -> None:
    batch = RunLayout(tmp_path).batch_files("127.0.0.2", 0)
    writer = writer_of(batch, output_format)
    assert writer.take_stock() == (set(), (0, 0))
    for i in range(CHUNK_MAX_ROWS + 100):  # two chunks
        writer.add_success(success(i))
    for i, code in enumerate(["http_404", "http_404", "timeout"], start=1000):
        writer.add_error(error(i, code))
    rows = CHUNK_MAX_ROWS + 103
    assert len(batch.chunks()) == 1  # the guard: the first chunk committed before the end

    with chunk_reads() as reads:
        counts = writer.complete(rows)

    assert reads == []
    assert counts == {"rows": rows, "successes": rows - 3, "errors": 3}
    assert marker(batch)["errors_by_code"] == {"http_404": 2, "timeout": 1}
    assert chunks.chunk_row_counts(batch) == (rows - 3, 3)  # what a read would have found
    assert sorted(committed_uuids(batch)) == sorted(
        [success(i)["uuid"] for i in range(rows - 3)] + [f"{i:032x}" for i in range(1000, 1003)])


def test_a_resumed_batch_counts_its_earlier_chunks_without_reading_them_again(
        tmp_path: Path) -> None:
    batch = RunLayout(tmp_path).batch_files("127.0.0.2", 0)
    killed = writer_of(batch, token="w1")
    for i in range(5):
        killed.add_success(success(i))
    killed.add_error(error(5, "http_404"))
    killed.add_error(error(6, "http_500"))
    killed.close()  # a kill after this chunk: no marker

    writer = writer_of(batch, token="w2")
    done, earlier = writer.take_stock()
    assert (len(done), earlier) == (7, (5, 2))
    for i in range(7, 10):
        writer.add_success(success(i))
    writer.add_error(error(10, "http_404"))
    with chunk_reads() as reads:
        counts = writer.complete(11)

    assert reads == []
    assert counts == {"rows": 11, "successes": 8, "errors": 3}
    assert marker(batch)["errors_by_code"] == {"http_404": 2, "http_500": 1}
    assert chunks.chunk_row_counts(batch) == (8, 3)


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_batch_with_another_writers_chunk_keeps_one_row_per_uuid(
        tmp_path: Path, output_format: str) -> None:
    """A lost worker's batch handed back: the first worker still commits rows the second one
    commits too."""
    batch = RunLayout(tmp_path).batch_files("127.0.0.2", 0)
    writer = writer_of(batch, output_format, token="w2")
    writer.take_stock()
    lost = writer_of(batch, output_format, token="w1")
    for i in range(5, 10):
        lost.add_success(success(i))
    lost.close()
    for i in range(10):
        writer.add_success(success(i))

    with chunk_reads() as reads:
        counts = writer.complete(10)

    assert reads  # the other writer's chunk made it read them back
    assert counts == {"rows": 10, "successes": 10, "errors": 0}
    stored = read_successes(batch.successes)
    assert sorted(row["uuid"] for row in stored) == [success(i)["uuid"] for i in range(10)]
    assert all(row["image"] == success(int(row["uuid"], 16))["image"] for row in stored)


def test_earlier_chunks_with_a_uuid_twice_are_resolved_at_the_end(tmp_path: Path) -> None:
    """Two writers of an earlier run, both killed: the rows they share are kept once."""
    batch = RunLayout(tmp_path).batch_files("127.0.0.2", 0)
    for token in ("w1", "w2"):
        killed = writer_of(batch, token=token)
        for i in range(3):
            killed.add_success(success(i))
        killed.close()
    writer = writer_of(batch, token="w3")
    done, earlier = writer.take_stock()
    assert (len(done), earlier) == (3, (6, 0))
    for i in range(3, 6):
        writer.add_success(success(i))

    counts = writer.complete(6)

    assert counts == {"rows": 6, "successes": 6, "errors": 0}
    assert sorted(committed_uuids(batch)) == [success(i)["uuid"] for i in range(6)]


def test_a_batch_that_lost_one_of_its_own_chunks_is_not_finished(tmp_path: Path) -> None:
    batch = RunLayout(tmp_path).batch_files("127.0.0.2", 0)
    writer = writer_of(batch)
    writer.take_stock()
    for i in range(CHUNK_MAX_ROWS + 10):
        writer.add_success(success(i))
    [first] = batch.success_chunks()
    chunks.set_aside(first, "a test took it")

    with pytest.raises(RuntimeError, match="10 successes"):
        writer.complete(CHUNK_MAX_ROWS + 10)
    assert not batch.finished
