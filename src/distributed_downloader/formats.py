"""Output formats: one sink per format, writing each chunk of successes once, and the readers
that give every row its image back whatever the format.

`parquet` keeps the encoded images in the successes chunks (`image` column). The other formats
keep them in files of their own, written before the chunk that lists them, and the chunks
(`successes-KEY.parquet`, the batch's index) keep every other column, so resume, status and the
tools' queries read the same tables in every format:
  webdataset  `images-KEY.tar` beside each chunk: `{uuid}.{jpg,webp,png}` + `{uuid}.json`
              (every other column), sorted by uuid: a WebDataset shard
  files       `images/{uuid}.{ext}`, one folder per batch
  hdf5        `images-KEY.h5` beside each chunk: rows sorted by `uuid`; `image` (variable-length
              bytes) beside one dataset per metadata column, readable with h5py alone
Every file is written under a hidden name, fsynced and renamed into place; a chunk's images are
committed before the chunk, so a committed row always has its image. Images that a kill left
without their chunk are set aside when the batch is taken up again (`set_aside_uncommitted`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.chunks import readable_chunks, set_aside_images, write_chunk
from distributed_downloader.errors import require_module
from distributed_downloader.schema import SUCCESSES
from distributed_downloader.storage import (
    IMAGES_FOLDER,
    SUCCESS_PREFIX,
    BatchFiles,
    chunk_files,
    chunk_images,
    committing,
    fsync_path,
    images_chunk,
    space_errors,
    temporary_name,
)

EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png", "gif": "gif", "tiff": "tif"}
FORMAT_NEEDS = {"hdf5": ("h5py", "hdf5", "the hdf5 output format")}  # (module, extra, purpose)
Images = dict[str, bytes]  # uuid -> encoded image
# Files of one chunk fsynced at once (files format): the file system commits them together, one
# journal commit for many files instead of one each (20x faster than one after the other here).
FSYNC_THREADS = 8

log = logging.getLogger(__name__)


def require_format(output_format: str) -> None:
    """Fail before any download when the output format's library is missing."""
    if output_format in FORMAT_NEEDS:
        require_module(*FORMAT_NEEDS[output_format])


def extension(image_format: str | None) -> str:
    return EXTENSIONS.get(image_format or "", image_format or "bin")


def binary_column(images: list[bytes | None]) -> pa.Array:
    """The images as an Arrow column, copied once into one buffer. `pa.array` copies them one
    by one into a buffer it keeps growing, on the event loop: 2-3x the CPU (a 16 MiB chunk of
    light images, ~25 ms instead of ~9)."""
    sizes = [len(image) for image in images if image is not None]
    if len(sizes) < len(images) or sum(sizes) >= 1 << 31:  # nulls, or past int32 offsets
        return pa.array(images, pa.binary())
    offsets = np.zeros(len(images) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    data = b"".join(images)  # type: ignore[arg-type]  # no None here
    return pa.Array.from_buffers(pa.binary(), len(images),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


class ParquetSink:
    """Images inside the chunk (`image` column): the chunk is all there is to write."""

    output_format = "parquet"

    def commit(self, chunk: Path, index: pa.Table, images: list[bytes | None]) -> None:
        """Commit a successes chunk: `index` (every column but `image`) and its images."""
        position = min(SUCCESSES.get_field_index("image"), index.num_columns)
        write_chunk(index.add_column(position, "image", binary_column(images)), chunk)

    def holds(self, chunk: Path) -> bool:
        return False  # rows of a Parquet chunk carry their image: nothing to look up

    def read(self, chunk: Path, rows: list[dict[str, Any]]) -> Images:
        return {}


class ImageFileSink:
    """The images of a chunk in a file of their own (`images-KEY{suffix}`), committed before the
    chunk, which keeps every other column. Subclasses say how the file is written and read."""

    output_format = ""
    suffix = ""
    legacy_name = ""  # the batch's one file before sinks (converted when the batch finished)

    def commit(self, chunk: Path, index: pa.Table, images: list[bytes | None]) -> None:
        self.write(self.artifact(chunk), index, images)
        write_chunk(index, chunk)

    def artifact(self, chunk: Path) -> Path:
        return chunk_images(chunk, self.suffix)

    def holds(self, chunk: Path) -> bool:
        return self.artifact(chunk).exists() or (chunk.parent / self.legacy_name).exists()

    def write(self, target: Path, index: pa.Table, images: list[bytes | None]) -> None:
        """The images of the rows of `index` (sorted by uuid; rows without an image, reused by
        link, left out) into the file `target`, atomically."""
        uuids = index.column("uuid").to_pylist()
        order = sorted((i for i, image in enumerate(images) if image is not None),
                       key=uuids.__getitem__)
        rows, kept = index.take(pa.array(order, pa.int64())), [images[i] for i in order]
        _commit_file(target, sum(map(len, kept)), lambda tmp: self.write_to(tmp, rows, kept))

    def read(self, chunk: Path, rows: list[dict[str, Any]]) -> Images:
        path = self.artifact(chunk)
        if not path.exists():
            path = chunk.parent / self.legacy_name
        return self.read_from(path, {row["uuid"] for row in rows})

    def write_to(self, path: Path, rows: pa.Table, images: list[bytes]) -> None:
        raise NotImplementedError

    def read_from(self, path: Path, uuids: set[str] | None) -> Images:
        raise NotImplementedError


class WebDatasetSink(ImageFileSink):
    """A tar shard per chunk: `{uuid}.{ext}` and `{uuid}.json` (every other column)."""

    output_format, suffix, legacy_name = "webdataset", ".tar", "images.tar"

    def write_to(self, path: Path, rows: pa.Table, images: list[bytes]) -> None:
        with tarfile.open(path, "w") as tar:
            for row, image in zip(rows.to_pylist(), images):
                metadata = json.dumps(row, ensure_ascii=False).encode()
                for name, data in ((f"{row['uuid']}.{extension(row['image_format'])}", image),
                                   (f"{row['uuid']}.json", metadata)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))

    def read_from(self, path: Path, uuids: set[str] | None) -> Images:
        images = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if suffix != "json" and (uuids is None or key in uuids):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    images[key] = handle.read()
        return images


class HDF5Sink(ImageFileSink):
    """An HDF5 file per chunk: `image` (variable-length bytes) beside one dataset per column."""

    output_format, suffix, legacy_name = "hdf5", ".h5", "images.h5"

    def write_to(self, path: Path, rows: pa.Table, images: list[bytes]) -> None:
        import h5py  # an optional dependency (`require_format` checked it is there)
        import numpy as np

        with h5py.File(path, "w") as store:
            store.attrs["format"] = "distributed-downloader chunk: rows sorted by uuid"
            stored = store.create_dataset("image", (len(images),),
                                          dtype=h5py.vlen_dtype(np.uint8))
            for position, image in enumerate(images):
                stored[position] = np.frombuffer(image, dtype=np.uint8)
            for field in rows.schema:
                values = rows.column(field.name).to_pylist()
                if field.name in ("original_size", "resized_size"):
                    store.create_dataset(field.name, data=np.array(values, dtype=np.int32))
                elif pa.types.is_boolean(field.type):
                    store.create_dataset(field.name, data=np.array(values, dtype=bool))
                else:
                    store.create_dataset(field.name, dtype=h5py.string_dtype(),
                                         data=["" if v is None else str(v) for v in values])

    def read_from(self, path: Path, uuids: set[str] | None) -> Images:
        import h5py

        images = {}
        with h5py.File(path, "r") as store:
            for position, uuid in enumerate(store["uuid"][:]):
                key = uuid.decode()
                if uuids is None or key in uuids:
                    images[key] = bytes(store["image"][position])
        return images


class FilesSink:
    """One file per image in the batch's `images/` folder, each committed before its chunk."""

    output_format = "files"

    def commit(self, chunk: Path, index: pa.Table, images: list[bytes | None]) -> None:
        self.write(chunk.parent / IMAGES_FOLDER, index, images)
        write_chunk(index, chunk)

    def holds(self, chunk: Path) -> bool:
        return (chunk.parent / IMAGES_FOLDER).is_dir()

    def write(self, folder: Path, index: pa.Table, images: list[bytes | None]) -> None:
        """Each image (rows without one, reused by link, left out) as `folder/{uuid}.{ext}`:
        all written under hidden names, fsynced together, then renamed into place."""
        folder.mkdir(exist_ok=True)
        columns = [index.column(name).to_pylist() for name in ("uuid", "image_format")]
        pending: list[tuple[Path, Path]] = []
        try:
            with space_errors(folder, sum(len(image or b"") for image in images)):
                for uuid, image_format, image in zip(*columns, images):
                    if image is not None:
                        final = folder / f"{uuid}.{extension(image_format)}"
                        pending.append((temporary_name(final), final))
                        pending[-1][0].write_bytes(image)
                with ThreadPoolExecutor(FSYNC_THREADS) as pool:
                    list(pool.map(fsync_path, [tmp for tmp, _ in pending]))
        except BaseException:
            for tmp, _ in pending:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in pending:
            os.replace(tmp, final)
        fsync_path(folder)

    def read(self, chunk: Path, rows: list[dict[str, Any]]) -> Images:
        folder, images = chunk.parent / IMAGES_FOLDER, {}
        for row in rows:
            path = folder / f"{row['uuid']}.{extension(row['image_format'])}"
            if path.exists():
                images[row["uuid"]] = path.read_bytes()
        return images


Sink = ParquetSink | WebDatasetSink | HDF5Sink | FilesSink
SINKS: dict[str, Sink] = {sink.output_format: sink for sink in (
    ParquetSink(), WebDatasetSink(), FilesSink(), HDF5Sink())}
# A batch's images in one file (or folder) per batch, as `export` writes them.
EXPORT_NAMES = {"webdataset": "images.tar", "files": IMAGES_FOLDER, "hdf5": "images.h5"}
EXPORT_SINKS: dict[str, ImageFileSink | FilesSink] = {
    sink.output_format: sink for sink in (WebDatasetSink(), FilesSink(), HDF5Sink())}


def sink_for(output_format: str) -> Sink:
    """The sink of an output format, chosen once, when a batch's writer is built."""
    return SINKS[output_format]


def _commit_file(final: Path, size: int, write: Callable[[Path], None]) -> None:
    """Write one file under a hidden name, fsync it, rename it into place (the folder is
    fsynced by the caller, once for all its files)."""
    tmp = temporary_name(final)
    with committing(tmp, size):
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)


def stored_images(chunk: Path, rows: list[dict[str, Any]]) -> Images:
    """The images of these rows of a successes chunk, from wherever its format keeps them."""
    for sink in SINKS.values():
        if sink.holds(chunk):
            return sink.read(chunk, rows)
    return {}


def read_successes(folder: Path, uuids: set[str] | None = None, follow_links: bool = True,
                   with_images: bool = True) -> list[dict[str, Any]]:
    """A batch's committed successes (only `uuids`, when given) with their `image`, in any
    output format; rows reused by link get theirs from the earlier download unless
    `follow_links` is off. Without `with_images`: the other columns only."""
    rows = []
    for path in chunk_files(folder, SUCCESS_PREFIX):
        columns = None if with_images else \
            [name for name in pq.read_schema(path).names if name != "image"]
        table = pq.read_table(path, columns=columns)
        if uuids is not None:
            table = table.filter(pc.is_in(table["uuid"], value_set=pa.array(sorted(uuids),
                                                                            pa.string())))
        chunk_rows = table.to_pylist()
        if not follow_links:
            chunk_rows = [row for row in chunk_rows if not row.get("linked_from")]
        if with_images:
            fill_images(path, chunk_rows)
        rows += chunk_rows
    return rows


def fill_images(chunk: Path, rows: list[dict[str, Any]]) -> None:
    """Give each row of a successes chunk its image: kept in the chunk, in the files of the
    chunk's output format, or, for a row reused by link, in the earlier download's batch."""
    missing = [row for row in rows if row.get("image") is None and not row.get("linked_from")]
    if missing:
        images = stored_images(chunk, missing)
        for row in missing:
            row["image"] = images.get(row["uuid"])
    linked: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("linked_from"):
            linked.setdefault(row["linked_from"], []).append(row)
    for earlier, reused in linked.items():
        wanted = {row["linked_uuid"] for row in reused}
        images = {row["uuid"]: row["image"]
                  for row in read_successes(Path(earlier), wanted, follow_links=False)}
        for row in reused:
            row["image"] = images.get(row["linked_uuid"])


def rewrite_chunk(chunk: Path, keep: pa.Array) -> None:
    """Keep only the rows `keep` marks of a successes chunk, in the format it was written in:
    its image file first (the rows it drops are kept elsewhere), then the chunk."""
    table = pq.read_table(chunk).filter(keep)
    sink = next((sink for sink in SINKS.values() if isinstance(sink, ImageFileSink)
                 and sink.artifact(chunk).exists()), None)
    if sink is None:  # images in the chunk, or one file per UUID that the kept row shares
        write_chunk(table, chunk)
        return
    rows = table.select(["uuid", "image_format", "linked_from"]).to_pylist()
    stored = sink.read(chunk, [row for row in rows if not row["linked_from"]])
    sink.commit(chunk, table, [stored.get(row["uuid"]) for row in rows])


def read_success_table(folder: Path) -> tuple[pa.Table, list[bytes | None]]:
    """A batch's committed successes (every column but `image`) and their images (following
    links), whatever the output format: what an export writes out."""
    tables, images = [], []
    for path in chunk_files(folder, SUCCESS_PREFIX):
        table = pq.read_table(path)
        rows = table.select([name for name in ("uuid", "image", "image_format", "linked_from",
                                               "linked_uuid") if name in table.column_names])
        filled = rows.to_pylist()
        fill_images(path, filled)
        images += [row["image"] for row in filled]
        tables.append(table.drop_columns([name for name in ("image",)
                                          if name in table.column_names]))
    if not tables:
        return SUCCESSES.remove(SUCCESSES.get_field_index("image")).empty_table(), []
    return pa.concat_tables(tables, promote_options="default"), images


def set_aside_uncommitted(batch: BatchFiles) -> list[Path]:
    """Image files no committed chunk lists: written before a chunk that a kill (or a full disk)
    stopped, or left by a chunk set aside. Their rows are fetched again; the files are moved to
    the quarantine (hidden temporaries are deleted). Returns what was taken out."""
    uncommitted = [path for path in batch.image_files() if not images_chunk(path).exists()]
    folder = batch.images_folder
    if folder.is_dir():
        committed = {uuid for path, uuids in readable_chunks(batch).items()
                     if path.name.startswith(SUCCESS_PREFIX) for uuid in uuids}
        for path in folder.iterdir():
            if path.name.startswith("."):
                path.unlink(missing_ok=True)
            elif path.name.partition(".")[0] not in committed:
                uncommitted.append(path)
    set_aside_images(batch, uncommitted, "are in no committed chunk (a stopped run's)")
    return uncommitted
