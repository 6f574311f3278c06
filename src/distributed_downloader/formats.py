"""Where a batch's images live, by output format, and how to read them back whatever it is.

`parquet` keeps the encoded images in the successes chunks (`image` column). The other formats
keep them beside the chunks, in one artifact per batch, and the chunks keep every other column
(so resume, status and the tools' queries read the same tables in every format):
  webdataset  `images.tar`: `{uuid}.{jpg,webp,png}` + `{uuid}.json` (every other column)
  files       `images/{uuid}.{ext}`
  hdf5        `images.h5`: rows sorted by `uuid`; `image` (variable-length bytes) beside one
              dataset per metadata column, readable with h5py alone
Artifacts are written under a hidden name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.errors import require_module
from distributed_downloader.storage import SUCCESS_PREFIX, chunk_files, committing, fsync_dir

OUTPUT_FORMATS = ("parquet", "webdataset", "files", "hdf5")
EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png", "gif": "gif", "tiff": "tif"}
ARTIFACTS = {"webdataset": "images.tar", "files": "images", "hdf5": "images.h5"}
FORMAT_NEEDS = {"hdf5": ("h5py", "hdf5", "the hdf5 output format")}  # (module, extra, purpose)


def require_format(output_format: str) -> None:
    """Fail before any download when the output format's library is missing."""
    if output_format in FORMAT_NEEDS:
        require_module(*FORMAT_NEEDS[output_format])


def extension(image_format: str | None) -> str:
    return EXTENSIONS.get(image_format or "", image_format or "bin")


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "image"}


def _write_tar(path: Path, rows: list[dict[str, Any]]) -> None:
    with tarfile.open(path, "w") as tar:
        for row in rows:
            for name, data in ((f"{row['uuid']}.{extension(row['image_format'])}", row["image"]),
                               (f"{row['uuid']}.json",
                                json.dumps(_metadata(row), ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def _write_files(path: Path, rows: list[dict[str, Any]]) -> None:
    path.mkdir()
    for row in rows:
        (path / f"{row['uuid']}.{extension(row['image_format'])}").write_bytes(row["image"])


def _write_hdf5(path: Path, rows: list[dict[str, Any]]) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as store:
        store.attrs["format"] = "distributed-downloader batch: rows sorted by uuid"
        images = store.create_dataset("image", (len(rows),), dtype=h5py.vlen_dtype(np.uint8))
        for index, row in enumerate(rows):
            images[index] = np.frombuffer(row["image"], dtype=np.uint8)
        for column in (key for key in (rows[0] if rows else {}) if key != "image"):
            values = [row[column] for row in rows]
            if column in ("original_size", "resized_size"):
                store.create_dataset(column, data=np.array(values, dtype=np.int32))
            elif isinstance(values[0], bool):
                store.create_dataset(column, data=np.array(values, dtype=bool))
            else:
                store.create_dataset(column, data=["" if v is None else str(v) for v in values],
                                     dtype=h5py.string_dtype())


WRITERS = {"webdataset": _write_tar, "files": _write_files, "hdf5": _write_hdf5}


def write_artifact(folder: Path, output_format: str, rows: list[dict[str, Any]]) -> Path:
    """Write a batch's images (rows with `image`) in `output_format`, replacing any earlier one."""
    rows = sorted(rows, key=lambda row: row["uuid"])
    final = folder / ARTIFACTS[output_format]
    temporary = folder / f".{final.name}.tmp"
    if temporary.is_dir():
        shutil.rmtree(temporary)
    elif temporary.exists():
        temporary.unlink()
    with committing(temporary, sum(len(row["image"] or b"") for row in rows)):
        WRITERS[output_format](temporary, rows)
    if final.is_dir():  # a folder cannot be renamed over: move the old one out of the way
        old = folder / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(temporary, final)
        shutil.rmtree(old)
    else:
        os.replace(temporary, final)
    fsync_dir(folder)
    return final


def read_artifact(folder: Path, uuids: set[str] | None = None) -> dict[str, bytes]:
    """uuid -> encoded image (only `uuids`, when given), from whichever artifact the folder
    holds (none: empty)."""
    images: dict[str, bytes] = {}
    if (folder / ARTIFACTS["webdataset"]).exists():
        with tarfile.open(folder / ARTIFACTS["webdataset"]) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if suffix != "json" and (uuids is None or key in uuids):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    images[key] = handle.read()
    elif (folder / ARTIFACTS["files"]).is_dir():
        for path in (folder / ARTIFACTS["files"]).iterdir():
            key = path.name.partition(".")[0]
            if uuids is None or key in uuids:
                images[key] = path.read_bytes()
    elif (folder / ARTIFACTS["hdf5"]).exists():
        import h5py

        with h5py.File(folder / ARTIFACTS["hdf5"], "r") as store:
            for index, uuid in enumerate(store["uuid"][:]):
                key = uuid.decode()
                if uuids is None or key in uuids:
                    images[key] = bytes(store["image"][index])
    return images


def read_successes(folder: Path, uuids: set[str] | None = None, follow_links: bool = True,
                   with_images: bool = True) -> list[dict[str, Any]]:
    """A batch's committed successes (only `uuids`, when given) with their `image`, in any
    output format (a batch converted halfway when a run was killed has some of each); rows
    reused by link get theirs from the earlier download unless `follow_links` is off.
    Without `with_images`: the other columns only."""
    rows = []
    for path in chunk_files(folder, SUCCESS_PREFIX):
        columns = None if with_images else \
            [name for name in pq.read_schema(path).names if name != "image"]
        table = pq.read_table(path, columns=columns)
        if uuids is not None:
            table = table.filter(pc.is_in(table["uuid"], value_set=pa.array(sorted(uuids),
                                                                            pa.string())))
        rows += table.to_pylist()
    if not follow_links:
        rows = [row for row in rows if not row.get("linked_from")]
    if with_images:
        in_artifact = uuids is not None and any(
            row.get("image") is None and not row.get("linked_from") for row in rows)
        fill_images(folder, rows, read_artifact(folder, uuids) if in_artifact else None)
    return rows


def fill_images(folder: Path, rows: list[dict[str, Any]],
                artifact: dict[str, bytes] | None = None) -> dict[str, bytes] | None:
    """Give each success row of a batch its image: kept in its chunk, in the batch's artifact,
    or, for a row reused by link, in the earlier download's batch. Returns the artifact's
    images it read (pass them back in for the batch's next chunk)."""
    linked: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("linked_from"):
            linked.setdefault(row["linked_from"], []).append(row)
        elif row.get("image") is None:
            artifact = read_artifact(folder) if artifact is None else artifact
            row["image"] = artifact.get(row["uuid"])
    for earlier, reused in linked.items():
        wanted = {row["linked_uuid"] for row in reused}
        images = {row["uuid"]: row["image"]
                  for row in read_successes(Path(earlier), wanted, follow_links=False)}
        for row in reused:
            row["image"] = images.get(row["linked_uuid"])
    return artifact


def convert_batch(folder: Path, output_format: str) -> None:
    """Move a finished batch's images out of its chunks into the format's artifact; the
    chunks keep every other column. Safe to run again after a kill at any point."""
    from distributed_downloader.writers import write_chunk

    write_artifact(folder, output_format, read_successes(folder, follow_links=False))
    for path in chunk_files(folder, SUCCESS_PREFIX):
        table = pq.read_table(path)
        if "image" in table.column_names:
            write_chunk(table.drop_columns(["image"]), path)
    fsync_dir(folder)
