"""`resize --image-size N`: stored images made smaller (never larger), with their sizes and hashes.

Writes, for each batch, new successes chunks under `OUT/tools/resize/`, with `image`,
`resized_size` and `hashsum_resized` updated for the images whose longest side was over N;
the others are copied as they are. `hashsum_original` and `original_size` still describe the
downloaded original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.errors import Failure
from distributed_downloader.formats import fill_images
from distributed_downloader.images import process_image
from distributed_downloader.storage import PARQUET_COMPRESSION, SUCCESS_PREFIX, chunk_files
from distributed_downloader.tools import Tool


def resize_batch(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
    size, quality = options["image_size"], options["image_quality"]
    counts = {"images": 0, "resized": 0, "unchanged": 0, "failed": 0}
    for path in chunk_files(source, SUCCESS_PREFIX):
        table = pq.read_table(path)
        rows = table.to_pylist()
        # From the output format's files or an earlier download, when not in the chunk: the
        # result holds the bytes itself, so it no longer links anywhere.
        fill_images(path, rows)
        for row in rows:
            row["linked_from"] = row["linked_uuid"] = None
        if "image" not in table.column_names:
            table = table.append_column("image", pa.array([None] * len(rows), pa.binary()))
        for row in rows:
            counts["images"] += 1
            if max(row["resized_size"]) <= size:
                counts["unchanged"] += 1
                continue
            encoding = row["image_format"] if row["image_format"] in ("jpeg", "webp") \
                else "original"
            smaller = process_image(row["image"], size, encoding, quality)
            if isinstance(smaller, Failure):
                counts["failed"] += 1  # kept as it was; image_verification reports it
                continue
            row.update(image=smaller.image, image_format=smaller.image_format,
                       resized_size=list(smaller.resized_size),
                       hashsum_resized=smaller.hashsum_resized)
            counts["resized"] += 1
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), result / path.name,
                       compression=PARQUET_COMPRESSION)
    return counts


TOOL = Tool("resize", per_batch=resize_batch)
