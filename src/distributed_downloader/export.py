"""`export OUT --to webdataset|files|hdf5`: a finished Parquet download in another format.

Batch by batch, into `OUT/export/FORMAT/server_name=HOST/partition_id=N/`, without downloading
again (the post-processing runner does the work: hidden folder, rename into place, resume by
skipping the batches already there). Every format keeps the batch's errors (`errors.parquet`)
and its `completed` marker beside the images:
  webdataset  `images.tar`: `{uuid}.{jpg,webp,png}` + `{uuid}.json` (every other column), read by
              the `webdataset` library and by Hugging Face `datasets`
  files       `{uuid}.{ext}` files + `metadata.parquet` (every other column, and `file`)
  hdf5        `images.h5`: rows sorted by `uuid`; the encoded images as variable-length byte
              arrays (`image`) beside one dataset per metadata column, readable with h5py alone
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.schema import ERRORS
from distributed_downloader.storage import PARQUET_COMPRESSION
from distributed_downloader.tools import Tool
from distributed_downloader.writers import COMPLETED_MARKER, ERROR_PREFIX, SUCCESS_PREFIX, \
    chunk_files

EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png", "gif": "gif", "tiff": "tif"}


def _successes(source: Path) -> list[dict[str, Any]]:
    rows = []
    for path in chunk_files(source, SUCCESS_PREFIX):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda row: row["uuid"])


def _keep_errors_and_marker(source: Path, result: Path) -> int:
    tables = [pq.read_table(path) for path in chunk_files(source, ERROR_PREFIX)]
    errors = pa.concat_tables(tables) if tables else ERRORS.empty_table()
    pq.write_table(errors, result / "errors.parquet", compression=PARQUET_COMPRESSION)
    shutil.copy2(source / COMPLETED_MARKER, result / COMPLETED_MARKER)
    return errors.num_rows


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "image"}


def _extension(row: dict[str, Any]) -> str:
    return EXTENSIONS.get(row["image_format"], row["image_format"] or "bin")


def to_webdataset(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
    rows = _successes(source)
    with tarfile.open(result / "images.tar", "w") as tar:
        for row in rows:
            for name, data in ((f"{row['uuid']}.{_extension(row)}", row["image"]),
                               (f"{row['uuid']}.json",
                                json.dumps(_metadata(row), ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return {"images": len(rows), "errors": _keep_errors_and_marker(source, result)}


def to_files(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
    rows = _successes(source)
    metadata = []
    for row in rows:
        name = f"{row['uuid']}.{_extension(row)}"
        (result / name).write_bytes(row["image"])
        metadata.append({**_metadata(row), "file": name})
    if metadata:
        pq.write_table(pa.Table.from_pylist(metadata), result / "metadata.parquet",
                       compression=PARQUET_COMPRESSION)
    return {"images": len(rows), "errors": _keep_errors_and_marker(source, result)}


def to_hdf5(source: Path, result: Path, options: dict[str, Any]) -> dict[str, int]:
    import h5py
    import numpy as np

    rows = _successes(source)
    strings = h5py.string_dtype()
    with h5py.File(result / "images.h5", "w") as store:
        store.attrs["format"] = "distributed-downloader batch: rows sorted by uuid"
        images = store.create_dataset("image", (len(rows),), dtype=h5py.vlen_dtype(np.uint8))
        for index, row in enumerate(rows):
            images[index] = np.frombuffer(row["image"], dtype=np.uint8)
        columns = [key for key in (rows[0] if rows else {}) if key != "image"]
        for column in columns:
            values = [row[column] for row in rows]
            if column in ("original_size", "resized_size"):
                store.create_dataset(column, data=np.array(values, dtype=np.int32))
            elif isinstance(values[0], bool):
                store.create_dataset(column, data=np.array(values, dtype=bool))
            else:
                store.create_dataset(column, data=["" if v is None else str(v) for v in values],
                                     dtype=strings)
    return {"images": len(rows), "errors": _keep_errors_and_marker(source, result)}


FORMATS = [
    Tool("webdataset", "tar shards of {uuid}.jpg + {uuid}.json", per_batch=to_webdataset,
         home="export"),
    Tool("files", "one image file per UUID + metadata.parquet", per_batch=to_files,
         home="export"),
    Tool("hdf5", "one HDF5 file per batch (h5py)", per_batch=to_hdf5, home="export"),
]
