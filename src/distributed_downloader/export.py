"""`export OUT --to webdataset|files|hdf5`: a finished Parquet download in another format.

Batch by batch, into `OUT/export/FORMAT/server_name=HOST/partition_id=N/`, without downloading
again (the post-processing runner does the work: hidden folder, rename into place, resume by
skipping the batches already there). Every format keeps the batch's errors (`errors.parquet`)
and its `_completed` marker beside the images:
  webdataset  `images.tar`: `{uuid}.{jpg,webp,png}` + `{uuid}.json` (every other column), read by
              the `webdataset` library and by Hugging Face `datasets`
  files       `images/{uuid}.{ext}` + `metadata.parquet` (every other column, and `file`)
  hdf5        `images.h5`: rows sorted by `uuid`; the encoded images as variable-length byte
              arrays (`image`) beside one dataset per metadata column, readable with h5py alone
The artifacts are those of `--output-format` (formats.py); the source may be in any format.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.formats import (
    ARTIFACTS,
    FORMAT_NEEDS,
    extension,
    read_successes,
    write_artifact,
)
from distributed_downloader.schema import ERRORS
from distributed_downloader.storage import PARQUET_COMPRESSION
from distributed_downloader.tools import Tool
from distributed_downloader.storage import COMPLETED_MARKER, BatchFiles


def _export(output_format: str, source: Path, result: Path) -> dict[str, int]:
    rows = read_successes(source)
    write_artifact(result, output_format, rows)
    if output_format == "files" and rows:  # the images' metadata, with each image's file
        folder = ARTIFACTS["files"]
        metadata = [{**{k: v for k, v in row.items() if k != "image"},
                     "file": f"{folder}/{row['uuid']}.{extension(row['image_format'])}"}
                    for row in rows]
        pq.write_table(pa.Table.from_pylist(metadata), result / "metadata.parquet",
                       compression=PARQUET_COMPRESSION)
    tables = [pq.read_table(path) for path in BatchFiles.of(source).error_chunks()]
    errors = pa.concat_tables(tables) if tables else ERRORS.empty_table()
    pq.write_table(errors, result / "errors.parquet", compression=PARQUET_COMPRESSION)
    shutil.copy2(source / COMPLETED_MARKER, result / COMPLETED_MARKER)
    return {"images": len(rows), "errors": errors.num_rows}


def _format_tool(output_format: str) -> Tool:
    def per_batch(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
        return _export(output_format, source, result)

    per_batch.__name__ = f"export_{output_format}"
    return Tool(output_format, per_batch=per_batch, home="export",
                needs=FORMAT_NEEDS.get(output_format))


FORMATS = [
    _format_tool("webdataset"),
    _format_tool("files"),
    _format_tool("hdf5"),
]
