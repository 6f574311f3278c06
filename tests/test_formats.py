"""The Parquet sink's image column: built in one copy, the same column `pa.array` builds."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader.formats import ParquetSink, binary_column
from distributed_downloader.schema import SUCCESSES


@pytest.mark.parametrize("images", [
    [os.urandom(200_000), b"", os.urandom(3)],  # sizes of every kind, an empty body too
    [],
    [b"x", None, b"yz"],  # a row reused by link holds no image
])
def test_the_image_column_holds_each_image_as_it_came(images: list[bytes | None]) -> None:
    column = binary_column(images)
    assert column.type == pa.binary()
    assert column.to_pylist() == images


def test_a_parquet_chunk_reads_back_every_image(tmp_path) -> None:  # noqa: ANN001
    images = [os.urandom(size) for size in (150_000, 1, 90_000)]
    index = pa.table({"uuid": ["a", "b", "c"]})
    chunk = tmp_path / "successes-test.parquet"
    ParquetSink().commit(chunk, index, images)
    table = pq.read_table(chunk)
    assert table.column("uuid").to_pylist() == ["a", "b", "c"]
    assert table.column("image").to_pylist() == images
    assert table.schema.field("image").type == SUCCESSES.field("image").type
