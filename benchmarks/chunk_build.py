"""Building a successes chunk's table: rows buffered as dicts then `Table.from_pylist` (before)
against rows buffered column by column then `Table.from_pydict` (writers.ColumnBuffer, now).

    python benchmarks/chunk_build.py [--rows 500] [--image-bytes 60000] [--repeat 200]

Rows look like the worker's: the batch columns, sizes, hashes and an encoded image of
--image-bytes. Timed: appending the rows to the buffer plus building what the sink is given
(what a flush costs the worker before any file is written), best of --repeat, per row:
  parquet      the whole table, `image` column included (ParquetSink adds it to the index)
  other        webdataset/files/hdf5: before, the same whole table (the images went into
               Arrow, to be read back out when the batch was converted); now, the index only,
               the images stay the bytes the worker made
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import pyarrow as pa

from distributed_downloader.schema import successes_schema
from distributed_downloader.writers import ColumnBuffer


def make_rows(count: int, image_bytes: int) -> list[dict[str, Any]]:
    image = os.urandom(image_bytes)
    return [{"uuid": f"{i:032x}", "source_id": str(i), "identifier": f"http://h/img/{i}.jpg",
             "is_license_full": True, "license": "CC-BY", "source": "museum", "title": "t",
             "original_size": [1200, 1600], "resized_size": [540, 720],
             "hashsum_original": "a" * 32, "hashsum_resized": "b" * 32, "image": image,
             "image_format": "jpeg", "linked_from": None, "linked_uuid": None,
             "reuse_from": None}  # an extra key, as the worker's rows carry
            for i in range(count)]


def by_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    buffered = []
    for row in rows:
        buffered.append(row)
    return pa.Table.from_pylist(buffered, schema=schema)


def by_columns(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    buffer = ColumnBuffer(schema)
    for row in rows:
        buffer.append(row)
    index = buffer.table(without="image")
    images = pa.array(buffer.columns["image"], pa.binary())
    return index.add_column(schema.get_field_index("image"), "image", images)


def index_by_columns(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    buffer = ColumnBuffer(schema)
    for row in rows:
        buffer.append(row)
    return buffer.table(without="image")


def best(build: Any, rows: list[dict[str, Any]], schema: pa.Schema, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        build(rows, schema)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--image-bytes", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    schema = successes_schema([])
    rows = make_rows(args.rows, args.image_bytes)
    assert by_rows(rows, schema).equals(by_columns(rows, schema))
    before = best(by_rows, rows, schema, args.repeat)
    after = best(by_columns, rows, schema, args.repeat)
    index = best(index_by_columns, rows, schema, args.repeat)
    print(f"{args.rows} rows, {args.image_bytes:,} B images; µs per row (before → now)")
    print(f"  parquet  {before / args.rows * 1e6:7.2f} → {after / args.rows * 1e6:7.2f}")
    print(f"  other    {before / args.rows * 1e6:7.2f} → {index / args.rows * 1e6:7.2f}")


if __name__ == "__main__":
    main()
