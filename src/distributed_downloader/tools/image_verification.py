"""`image_verification`: decode every stored image; record the ones that fail, and why."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from distributed_downloader.storage import PARQUET_COMPRESSION
from distributed_downloader.tools import Tool
from distributed_downloader.formats import read_successes

FAILURES = pa.schema([("uuid", pa.string()), ("identifier", pa.string()), ("error", pa.string())])


def verify_batch(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
    failures = []
    rows = read_successes(source)  # in any output format
    for row in rows:
        try:
            with Image.open(io.BytesIO(row["image"] or b"")) as image:
                image.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding
            failures.append({"uuid": row["uuid"], "identifier": row["identifier"],
                             "error": f"{type(exc).__name__}: {exc}"[:500]})
    pq.write_table(pa.Table.from_pylist(failures, schema=FAILURES), result / "failures.parquet",
                   compression=PARQUET_COMPRESSION)
    return {"images": len(rows), "failed": len(failures)}


TOOL = Tool("image_verification", per_batch=verify_batch)
