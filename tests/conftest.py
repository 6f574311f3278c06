"""Shared helpers: run the real CLI in a child process and read back what it wrote."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: object, check: bool = True, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CliResult:
    """Run `distributed-downloader ARGS...` as a user would, in a child process."""
    command = [sys.executable, "-m", "distributed_downloader", *map(str, args)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    result = CliResult(completed.returncode, completed.stdout, completed.stderr)
    if check and completed.returncode != 0:
        raise AssertionError(
            f"command failed ({completed.returncode}): {' '.join(command)}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return result


def read_batches(out: Path) -> pa.Table:
    """All prepared rows, read back as one Hive-partitioned table with DuckDB."""
    pattern = out / "prep" / "batches" / "*" / "*" / "*.parquet"
    return duckdb.sql(
        f"SELECT * EXCLUDE (file_row_number) FROM read_parquet('{pattern}', "
        "hive_partitioning = true, file_row_number = true) "
        "ORDER BY server_name, partition_id, file_row_number"
    ).to_arrow_table()


def read_parquet(path: Path) -> pa.Table:
    return duckdb.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_table()


def prep_summary(out: Path) -> dict:
    return json.loads((out / "prep" / "summary.json").read_text())


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def read_successes(out: Path) -> pa.Table:
    pattern = out / "downloaded_images" / "*" / "*" / "successes-*.parquet"
    if not list(out.glob("downloaded_images/*/*/successes-*.parquet")):
        return pa.table({"uuid": pa.array([], pa.string())})
    return duckdb.sql(  # union_by_name: in other output formats, chunks drop `image`
        f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, "
        "union_by_name = true)"
    ).to_arrow_table()


def read_errors(out: Path) -> pa.Table:
    pattern = out / "download_errors" / "*" / "*" / "errors-*.parquet"
    if not list(out.glob("download_errors/*/*/errors-*.parquet")):
        return pa.table({"uuid": pa.array([], pa.string())})
    return duckdb.sql(
        f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)"
    ).to_arrow_table()


def copy_run(original: Path, copy: Path) -> Path:
    """A copy of a run folder that is a run of its own (its config.yaml names the copy), so
    that tests can share one expensive prep or download and each change its own copy."""
    shutil.copytree(original, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace(str(original), str(copy)))
    return copy


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# Fetch settings for farm tests: loopback allowed (but not 127.0.0.128 and above, where canaries
# live), short timeouts so fault paths stay quick.
FARM_ALLOW = "127.0.0.0/25"
FAST_REQUESTS = ["--allow-network", FARM_ALLOW, "--timeout", "3", "--connect-timeout", "2"]
FAST_FETCH = [*FAST_REQUESTS, "--retry-delay", "0.2"]  # failed URLs asked again sooner


def stored_images(folder: Path, output_format: str) -> list[tuple[dict, bytes]]:
    """(index row, image) of each success of a downloaded batch, read from the files of its
    output format with that format's own library: `images-KEY.tar` / `images-KEY.h5` beside
    each `successes-KEY.parquet`, or `images/{uuid}.jpg`. Each image is there once, and only
    the images of the batch's rows are."""
    found: list[tuple[dict, bytes]] = []
    for chunk in sorted(folder.glob("successes-*.parquet")):
        rows = pq.read_table(chunk).to_pylist()
        key = chunk.name.removeprefix("successes-").removesuffix(".parquet")
        if output_format == "files":
            found += [(row, (folder / "images" / f"{row['uuid']}.jpg").read_bytes())
                      for row in rows]
        elif output_format == "webdataset":
            import webdataset as wds

            samples = list(wds.WebDataset(str(folder / f"images-{key}.tar"),
                                          shardshuffle=False, empty_check=False))
            assert sorted(s["__key__"] for s in samples) == sorted(r["uuid"] for r in rows)
            images = {s["__key__"]: s["jpg"] for s in samples}
            assert all(json.loads(s["json"])["uuid"] == s["__key__"] for s in samples)
            found += [(row, images[row["uuid"]]) for row in rows]
        else:
            import h5py

            with h5py.File(folder / f"images-{key}.h5", "r") as store:
                uuids = [u.decode() for u in store["uuid"][:]]
                assert uuids == sorted(r["uuid"] for r in rows)  # indexed by UUID
                images = {uuid: bytes(store["image"][i]) for i, uuid in enumerate(uuids)}
            found += [(row, images[row["uuid"]]) for row in rows]
    if output_format == "files":
        images_folder = folder / "images"
        files = images_folder.iterdir() if images_folder.is_dir() else []
        assert sorted(p.name for p in files) == sorted(f"{row['uuid']}.jpg" for row, _ in found)
    else:
        assert not (folder / "images").exists()
        assert len(list(folder.glob("images-*"))) == len(list(folder.glob("successes-*")))
    return found


async def settled() -> None:
    """Let every woken waiter run, and those it wakes (a chain of waiters passing the turn on
    moves one a turn of the event loop)."""
    for _ in range(600):
        await asyncio.sleep(0)


async def cancel(waiting: list[asyncio.Task]) -> None:
    """End a scenario's waiters still waiting."""
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
