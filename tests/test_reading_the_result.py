"""A user's story: the download is done; every success, and every error, loads in one line
with the tools they already use (the README's "Reading the result" one-liners)."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest

from conftest import FAST_FETCH, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image

GOOD, MISSING = 9, 3
ORIGINAL_COLUMNS = {"uuid", "source_id", "identifier", "hashsum_original", "hashsum_resized",
                    "original_size", "resized_size", "image"}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reading")
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = []
        for index in range(GOOD):
            server = farm.servers[index % 2]
            server.images[f"{index}.jpg"] = make_small_image(index)
            urls.append(server.url(f"/img/{index}.jpg"))
        urls += [farm.servers[0].url(f"/missing/{index}") for index in range(MISSING)]
        result = folder / "out"
        run_cli("download", write_lines(folder / "urls.txt", urls), "--output", result,
                "--batch-size", 4, "--no-profile", *FAST_FETCH, timeout=300)
    # The guard: the run must have both kinds of rows, in several batches, for the test to mean
    # anything.
    assert len(list(result.glob("downloaded_images/*/*/_completed"))) >= 3
    return result


def test_pandas_reads_successes_and_errors_as_two_tables(out: Path) -> None:
    import pandas as pd

    successes = pd.read_parquet(out / "downloaded_images")
    errors = pd.read_parquet(out / "download_errors")
    assert len(successes) == GOOD and successes["uuid"].is_unique
    assert ORIGINAL_COLUMNS <= set(successes.columns)
    assert "error_code" not in successes.columns
    assert {name.split(":")[0] for name in successes["server_name"].astype(str)} == \
        {"127.0.0.2", "127.0.0.3"}
    assert len(errors) == MISSING and set(errors["error_code"]) == {"http_404"}
    assert not set(successes["uuid"]) & set(errors["uuid"])


def test_pyarrow_dataset_keeps_the_errors_columns_out(out: Path) -> None:
    import pyarrow.dataset as ds

    successes = ds.dataset(out / "downloaded_images", partitioning="hive").to_table()
    assert successes.num_rows == GOOD
    assert "error_code" not in successes.column_names


def test_duckdb_polars_and_hugging_face_read_the_same_rows(out: Path) -> None:
    import datasets
    import polars as pl

    in_duckdb = duckdb.sql(f"SELECT uuid FROM '{out}/downloaded_images/*/*/*.parquet'").fetchall()
    errors_in_duckdb = duckdb.sql(
        f"SELECT error_code FROM '{out}/download_errors/*/*/*.parquet'").fetchall()
    in_polars = pl.read_parquet(f"{out}/downloaded_images/**/*.parquet")
    errors_in_polars = pl.read_parquet(f"{out}/download_errors/**/*.parquet")
    in_hf = datasets.load_dataset("parquet", data_files=f"{out}/downloaded_images/**/*.parquet",
                                  split="train", cache_dir=str(out.parent / "hf-cache"))
    uuids = {row[0] for row in in_duckdb}
    assert len(uuids) == GOOD
    assert set(in_polars["uuid"]) == uuids == set(in_hf["uuid"])
    assert in_hf.num_rows == GOOD and "image" in in_hf.column_names
    assert len(errors_in_duckdb) == len(errors_in_polars) == MISSING


def test_a_run_in_the_earlier_layout_is_moved_into_this_one(out: Path, tmp_path: Path) -> None:
    """Errors used to sit beside the successes with a `completed` marker: a run begun by an
    earlier version resumes (nothing fetched again) and ends in today's layout."""
    import json
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    for chunk in legacy.glob("download_errors/*/*/errors-*.parquet"):
        os.replace(chunk, legacy / "downloaded_images" / chunk.parent.parent.name
                   / chunk.parent.name / chunk.name)
    for marker in legacy.glob("downloaded_images/*/*/_completed"):
        os.replace(marker, marker.with_name("completed"))
    assert not list(legacy.glob("download_errors/*/*/*.parquet"))  # the guard

    status = json.loads(run_cli("status", legacy, "--json").stdout)
    assert (status["successes"], status["errors"]) == (GOOD, MISSING)
    run_cli("fetch", legacy, *FAST_FETCH, timeout=120)  # the farm is gone: nothing to fetch
    summary = json.loads((legacy / "fetch_summary.json").read_text())
    assert summary["finished"] and summary["requests_this_run"] == summary["fetched_this_run"] == 0
    assert not list(legacy.glob("downloaded_images/*/*/completed"))
    assert len(list(legacy.glob("download_errors/*/*/errors-*.parquet"))) >= 1
    import pandas as pd

    assert len(pd.read_parquet(legacy / "downloaded_images")) == GOOD
    assert len(pd.read_parquet(legacy / "download_errors")) == MISSING
