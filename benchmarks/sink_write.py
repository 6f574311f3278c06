"""What writing a batch costs the worker in each output format: rows given to a `BatchWriter`,
chunks committed, the batch completed (marker written).

    PYTHONPATH=src python benchmarks/sink_write.py [--rows 2000] [--image-bytes 60000]
                                                   [--formats parquet webdataset files hdf5]

Run it once on each side of a change (e.g. with PYTHONPATH pointing at the other checkout) to
compare: before sinks, the other formats wrote each image into Parquet and, when the batch
finished, read it back and wrote it again. Prints, per format, seconds (best of --repeat) and
the bytes written to disk (from /proc/self/io `write_bytes`, when the kernel counts them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from distributed_downloader.storage import RunLayout
from distributed_downloader.writers import BatchWriter, BufferBudget


def make_rows(count: int, image_bytes: int) -> list[dict[str, Any]]:
    return [{"uuid": f"{i:032x}", "source_id": str(i), "identifier": f"http://h/img/{i}.jpg",
             "is_license_full": True, "license": "CC-BY", "source": "museum", "title": "t",
             "original_size": [1200, 1600], "resized_size": [540, 720],
             "hashsum_original": "a" * 32, "hashsum_resized": "b" * 32,
             "image": os.urandom(image_bytes), "image_format": "jpeg"}
            for i in range(count)]


def written_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_batch(root: Path, output_format: str, rows: list[dict[str, Any]]) -> tuple[float, int]:
    batch = RunLayout(root).batch_files("127.0.0.2", 0)
    started, before = time.perf_counter(), written_bytes()
    writer = BatchWriter(batch, [], BufferBudget(48 << 20), "bench", output_format)
    for row in rows:
        writer.add_success(row)
    writer.complete(len(rows))
    return time.perf_counter() - started, written_bytes() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--image-bytes", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["parquet", "webdataset", "files", "hdf5"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    args = parser.parse_args()
    rows = make_rows(args.rows, args.image_bytes)
    print(f"{args.rows} rows of {args.image_bytes:,} B images "
          f"({args.rows * args.image_bytes / 2**20:.0f} MiB)")
    for output_format in args.formats:
        results = []
        for _ in range(args.repeat):
            root = Path(tempfile.mkdtemp(dir=args.dir))
            try:
                results.append(write_batch(root, output_format, rows))
            finally:
                shutil.rmtree(root)
        seconds, written = min(results)
        print(f"  {output_format:<11} {seconds:6.2f} s  {written / 2**20:7.0f} MiB written")


if __name__ == "__main__":
    main()
