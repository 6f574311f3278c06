"""`export OUT --to webdataset|files|hdf5`: a finished download in another format.

Batch by batch, into `OUT/export/FORMAT/server_name=HOST/partition_id=N/`, without downloading
again (the post-processing runner in tools/ does the work: hidden folder, rename into place,
resume by skipping the batches already there). Every format keeps the batch's errors
(`errors.parquet`) and its `_completed` marker beside the images, one file (or folder) per batch:
  webdataset  `images.tar`: `{uuid}.{jpg,webp,png}` + `{uuid}.json` (every other column), read by
              the `webdataset` library and by Hugging Face `datasets`
  files       `images/{uuid}.{ext}` + `metadata.parquet` (every other column, and `file`)
  hdf5        `images.h5`: rows sorted by `uuid`; the encoded images as variable-length byte
              arrays (`image`) beside one dataset per metadata column, readable with h5py alone
The files are written by the sinks of `--output-format` (formats.py); the source may be in any
format.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.formats import (
    EXPORT_NAMES,
    EXPORT_SINKS,
    extension,
    read_success_table,
)
from distributed_downloader.schema import ERRORS
from distributed_downloader.storage import COMPLETED_MARKER, PARQUET_COMPRESSION, BatchFiles

EXPORT_FORMATS = tuple(EXPORT_NAMES)


def export_batch(output_format: str, source: Path, result: Path,
                 options: dict[str, Any]) -> dict[str, int]:
    """One finished batch (`source`) written into `result` in `output_format`."""
    table, images = read_success_table(source)
    EXPORT_SINKS[output_format].write(result / EXPORT_NAMES[output_format], table, images)
    if output_format == "files" and table.num_rows:  # the metadata, with each image's file
        files = [f"{EXPORT_NAMES['files']}/{uuid}.{extension(image_format)}" for uuid, image_format
                 in zip(table["uuid"].to_pylist(), table["image_format"].to_pylist())]
        metadata = table.append_column("file", pa.array(files))
        pq.write_table(metadata, result / "metadata.parquet", compression=PARQUET_COMPRESSION)
    tables = [pq.read_table(path) for path in BatchFiles.of(source).error_chunks()]
    errors = pa.concat_tables(tables) if tables else ERRORS.empty_table()
    pq.write_table(errors, result / "errors.parquet", compression=PARQUET_COMPRESSION)
    shutil.copy2(source / COMPLETED_MARKER, result / COMPLETED_MARKER)
    return {"images": table.num_rows, "errors": errors.num_rows}
