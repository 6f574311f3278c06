"""What `--previous` costs prep: next month's snapshot matched against last month's download.

    python benchmarks/incremental_prep.py --rows 1000000

Last month: prep_bench's generated multimedia-N.txt, prepared, then "downloaded" synthetically:
one successes chunk per batch (every column but the image bytes, as a webdataset download
keeps them) for 94% of the rows, an errors chunk with the rest (half 404, final; half timeouts,
retryable). This month: 90% of last month's lines (every tenth dropped: link rot) and 10% new
ones. The script times `prep` of this month with and without `--previous` and reports the
overlap it found, whose `new` and `gone` it checks by plain set difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from prep_bench import WORK, generate  # noqa: E402

from distributed_downloader.schema import ERRORS, successes_schema  # noqa: E402


def next_month(last: Path, path: Path) -> None:
    """Every tenth line of `last` dropped, a tenth as many new lines added."""
    with open(last, encoding="utf-8") as source, open(path, "w", encoding="utf-8") as out:
        out.write(source.readline())
        added = 0
        for number, line in enumerate(source):
            if number % 10 == 0:
                fields = line.split("\t")
                fields[0] = str(9_000_000_000 + added)
                fields[3] = fields[3].replace("/media/", "/media/new/", 1)
                out.write("\t".join(fields))
                added += 1
            else:
                out.write(line)


def fake_download(out: Path) -> None:
    """Chunks for every prepared batch, as if fetch had run (no image bytes)."""
    schema = successes_schema([]).remove(successes_schema([]).get_field_index("image"))
    for batch in (out / "prep" / "batches").glob("*/*"):
        rows = pq.read_table(batch / "part-0.parquet").to_pylist()
        target = out / "downloaded_images" / batch.parent.name / batch.name
        target.mkdir(parents=True, exist_ok=True)
        successes, errors = [], []
        for row in rows:
            bucket = zlib.crc32(row["identifier"].encode()) % 100
            if bucket < 94:
                successes.append({**row, "original_size": [600, 800], "resized_size": [192, 256],
                                  "hashsum_original": f"{bucket:032x}",
                                  "hashsum_resized": f"{bucket:032x}", "image_format": "jpeg"})
            else:
                code = "http_404" if bucket < 97 else "timeout"
                errors.append({"uuid": row["uuid"], "identifier": row["identifier"],
                               "retry_count": 1, "error_code": code, "error_msg": code,
                               "http_status": 404 if code == "http_404" else None})
        pq.write_table(pa.Table.from_pylist(successes, schema=schema),
                       target / "successes-w0.bench-0.parquet")
        if errors:
            failed = out / "download_errors" / batch.parent.name / batch.name
            failed.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS),
                           failed / "errors-w0.bench-0.parquet")


def prep(input_path: Path, output: Path, memory_limit: str, *extra: str) -> dict:
    if output.exists():
        shutil.rmtree(output)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "distributed_downloader", "prep", str(input_path),
                    "--output", str(output), "--memory-limit", memory_limit, *extra],
                   check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((output / "prep" / "summary.json").read_text())
    summary["wall_seconds"] = time.monotonic() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-limit", default="512MB")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    last = WORK / f"multimedia-{args.rows}.txt"
    if not last.exists():
        generate(last, args.rows)
    this = WORK / f"multimedia-{args.rows}-next.txt"
    next_month(last, this)
    old = WORK / f"incremental-old-{args.rows}"
    prep(last, old, args.memory_limit)
    fake_download(old)
    plain = prep(this, WORK / f"incremental-plain-{args.rows}", args.memory_limit)
    reused = prep(this, WORK / f"incremental-new-{args.rows}", args.memory_limit,
                  "--previous", str(old))
    print(f"{'prep of this month':<26} {'seconds':>8} {'peak MiB':>9} {'rows kept':>10}")
    for label, summary in (("without --previous", plain), ("with --previous", reused)):
        print(f"{label:<26} {summary['wall_seconds']:>8.1f} {summary['peak_memory_mib']:>9.0f} "
              f"{summary['rows_kept']:>10,}")
    overlap = reused["overlap"]
    print("overlap (distinct URLs): " + ", ".join(f"{k} {v:,}" for k, v in overlap.items()))
    # The same counts by plain set difference over the two preps' batches.
    urls = "SELECT DISTINCT identifier FROM read_parquet('{}/prep/batches/*/*/*.parquet')"
    this_urls = urls.format(WORK / f"incremental-plain-{args.rows}")
    last_urls = urls.format(old)
    new = duckdb.sql(f"SELECT count(*) FROM ({this_urls} EXCEPT {last_urls})").fetchall()[0][0]
    gone = duckdb.sql(f"SELECT count(*) FROM ({last_urls} EXCEPT {this_urls})").fetchall()[0][0]
    assert (overlap["new"], overlap["gone"]) == (new, gone), (new, gone)
    print(f"rows reused: {reused['reused_rows']:,} of {reused['download_rows']:,}")


if __name__ == "__main__":
    main()
