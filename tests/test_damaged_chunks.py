"""Damage inside an unfinished batch never stops a run: an unreadable chunk is set aside (kept
under OUT/quarantine/) and its rows fetched again; a UUID committed twice keeps one row.

Each story downloads a small run, then puts a batch back into the state a crash or a second
writer leaves: its `_completed` marker gone, and a chunk truncated or rows written twice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    FAST_FETCH,
    copy_run,
    read_batches,
    read_errors,
    read_successes,
    run_cli,
    stored_images,
    write_lines,
)
from distributed_downloader.chunks import read_uuids
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.schema import ERRORS
from distributed_downloader.formats import WebDatasetSink
from distributed_downloader.storage import BatchFiles, RunLayout, chunk_images

IMAGES_PER_SERVER = 20


@pytest.fixture(scope="module")
def downloaded_once(tmp_path_factory: pytest.TempPathFactory):
    """A finished run of two servers (20 images and one 404 each, batches of 10), downloaded
    once for the module; each story damages a server of its own in a copy of it."""
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = []
        for server in farm.servers:
            for i in range(IMAGES_PER_SERVER):
                server.images[f"{i}.jpg"] = make_small_image(i + 50 * len(urls))
                urls.append(server.url(f"/img/{i}.jpg"))
            urls.append(server.url("/missing/1"))
        folder = tmp_path_factory.mktemp("damaged")
        out = folder / "out"
        run_cli("download", write_lines(folder / "urls.txt", urls), "--output", out,
                "--batch-size", 10, "--no-profile", *FAST_FETCH, timeout=300)
        yield farm, out


@pytest.fixture
def downloaded(downloaded_once, tmp_path: Path):
    """The module's finished run, copied: this test's damage stays its own."""
    farm, original = downloaded_once
    return farm, copy_run(original, tmp_path / "out")


def unfinish(out: Path, server: str, partition: int) -> BatchFiles:
    """The batch as a kill before its marker leaves it."""
    batch = RunLayout(out).batch_files(server, partition)
    batch.marker.unlink()
    return batch


def truncate(path: Path) -> int:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def garble_uuids(path: Path) -> None:
    """Garble the bytes of the `uuid` column, leaving the footer whole: the file opens and
    counts its rows (what fetch's first look reads), but its rows do not read."""
    row_group = pq.read_metadata(path).row_group(0)
    [column] = [row_group.column(i) for i in range(row_group.num_columns)
                if row_group.column(i).path_in_schema == "uuid"]
    start = min(offset for offset in (column.dictionary_page_offset, column.data_page_offset)
                if offset is not None)
    data = bytearray(path.read_bytes())
    for index in range(start, start + column.total_compressed_size):
        data[index] ^= 0x5A
    path.write_bytes(bytes(data))
    rows = pq.read_metadata(path).num_rows
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall() == [(rows,)]
    with pytest.raises(OSError):
        pq.read_table(path, columns=["uuid"])


def assert_each_prepared_uuid_once(out: Path) -> None:
    prepared = sorted(read_batches(out).column("uuid").to_pylist())
    stored = read_successes(out).column("uuid").to_pylist() + \
        read_errors(out).column("uuid").to_pylist()
    assert sorted(stored) == prepared
    assert len(prepared) == 2 * (IMAGES_PER_SERVER + 1)


def requests_for(server, uuids: set[str], out: Path) -> list[int]:
    """How often the farm served each of these rows' URLs."""
    urls = {row["identifier"] for row in read_batches(out).to_pylist() if row["uuid"] in uuids}
    paths = {url.split(server.address, 1)[1] for url in urls}
    counts = Counter(record.path for record in server.log if record.path in paths)
    return sorted(counts[path] for path in paths)


def test_a_truncated_chunk_in_an_unfinished_batch_is_set_aside_and_fetched_again(
        downloaded) -> None:
    farm, out = downloaded
    server = farm.servers[0]
    batch = unfinish(out, server.address, 0)
    [chunk] = batch.success_chunks()
    lost = set(pq.read_table(chunk, columns=["uuid"]).column(0).to_pylist())
    size = truncate(chunk)

    found = run_cli("verify", out, check=False)
    assert found.returncode == 1, found.stdout
    summary = json.loads((out / "verify" / "summary.json").read_text())
    [broken] = summary["broken"]
    assert broken["batch"] == f"server_name={server.address}/partition_id=0"
    assert broken["finished"] is False
    assert broken["problems"][0].startswith(f"{chunk.name} is unreadable")
    assert summary["unfinished_chunks_checked"] == len(batch.chunks())

    fetched = run_cli("fetch", out, *FAST_FETCH, timeout=300)
    assert "Traceback" not in fetched.stderr
    assert_each_prepared_uuid_once(out)
    aside = out / "quarantine" / chunk.relative_to(out)
    assert aside.stat().st_size == size  # kept as it was, under its own name
    assert f"{chunk}: unreadable" in fetched.stderr and str(aside) in fetched.stderr
    assert requests_for(server, lost, out) == [2] * len(lost)  # each fetched once more
    assert "every finished batch is sound" in run_cli("verify", out).stdout

    # Damage the footer does not show: fetch finds it when the batch starts.
    batch = unfinish(out, server.address, 1)
    [chunk] = batch.success_chunks()
    lost = set(pq.read_table(chunk, columns=["uuid"]).column(0).to_pylist())
    garble_uuids(chunk)
    fetched = run_cli("fetch", out, *FAST_FETCH, timeout=300)
    assert_each_prepared_uuid_once(out)
    assert (out / "quarantine" / chunk.relative_to(out)).exists()
    assert f"{chunk}: unreadable" in fetched.stderr
    assert requests_for(server, lost, out) == [2] * len(lost)

    # `verify --fix` sets such a chunk aside too (an error chunk this time); fetch redoes it.
    [chunk] = out.glob(f"download_errors/server_name={server.address}/*/errors-*.parquet")
    batch = unfinish(out, server.address, int(chunk.parent.name.split("=")[1]))
    truncate(chunk)
    fixed = run_cli("verify", out, "--fix")
    assert "set 1 chunks of unfinished batches aside" in fixed.stdout
    assert not chunk.exists() and (out / "quarantine" / chunk.relative_to(out)).exists()
    run_cli("fetch", out, *FAST_FETCH, timeout=300)
    assert_each_prepared_uuid_once(out)
    assert "every finished batch is sound" in run_cli("verify", out).stdout


def test_a_uuid_written_twice_in_a_batch_keeps_one_row(downloaded) -> None:
    farm, out = downloaded
    server = farm.servers[1]
    batch = unfinish(out, server.address, 0)
    [chunk] = batch.success_chunks()
    table = pq.read_table(chunk)
    assert table.num_rows == 10
    uuids = table.column("uuid").to_pylist()
    # As two writers of one batch leave it: rows 4 and 5 in both chunks; row 0 also an error.
    pq.write_table(table.slice(0, 6), chunk)
    second = chunk.with_name("successes-x9.copy-00000.parquet")  # sorts after the first
    pq.write_table(table.slice(4), second)
    error = batch.errors / "errors-x9.copy-00000.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "uuid": uuids[0], "identifier": table.column("identifier")[0].as_py(), "retry_count": 1,
        "error_code": "timeout", "error_msg": "written by a second writer",
        "http_status": None}], schema=ERRORS), error)
    requests_before = len(server.log)

    found = run_cli("verify", out, check=False)
    assert found.returncode == 1
    assert "3 UUIDs written more than once" in found.stdout  # rows 0, 4 and 5
    fetched = run_cli("fetch", out, *FAST_FETCH, timeout=300)

    assert_each_prepared_uuid_once(out)
    assert len(server.log) == requests_before  # nothing was fetched again
    assert pq.read_table(second).column("uuid").to_pylist() == uuids[6:]
    assert (out / "quarantine" / error.relative_to(out)).exists()  # the error lost to the success
    assert f"{second}: 2 of its 6 rows are also in {chunk.name} (e.g. uuid {uuids[4]}): " \
        "kept there (the first chunk by name), dropped here" in fetched.stderr
    assert f"{error}: 1 of its 1 rows are also in {chunk.name} (e.g. uuid {uuids[0]}): " \
        "kept there (a success over an error), dropped here" in fetched.stderr
    marker = json.loads(batch.marker.read_text())
    assert (marker["successes"], marker["errors"]) == (10, 0)
    assert "every finished batch is sound" in run_cli("verify", out).stdout


def test_a_uuid_written_twice_in_webdataset_keeps_one_row_and_one_image(tmp_path: Path) -> None:
    """The chunk that loses rows loses their images too: its shard is written again without
    them (before the chunk), so each UUID is in one shard, once."""
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        urls = []
        for i in range(10):
            server.images[f"{i}.jpg"] = make_small_image(i + 7)
            urls.append(server.url(f"/img/{i}.jpg"))
        out = tmp_path / "out"
        command = ["--output", out, "--batch-size", 10, "--no-profile", "--output-format",
                   "webdataset", *FAST_FETCH]
        run_cli("download", write_lines(tmp_path / "urls.txt", urls), *command, timeout=300)
        batch = unfinish(out, server.address, 0)
        [chunk] = batch.success_chunks()
        rows = dict((row["uuid"], image) for row, image in stored_images(batch.successes,
                                                                          "webdataset"))
        index = pq.read_table(chunk)
        # A second writer's chunk and shard: rows 4 to 9, of which 4 and 5 the first kept too.
        pq.write_table(index.slice(0, 6), chunk)
        WebDatasetSink().write(chunk_images(chunk, ".tar"), index.slice(0, 6),
                               [rows[u] for u in index.column("uuid").to_pylist()[:6]])
        second = chunk.with_name("successes-x9.copy-00000.parquet")
        WebDatasetSink().commit(second, index.slice(4),
                                [rows[u] for u in index.column("uuid").to_pylist()[4:]])
        fetched = run_cli("fetch", out, *FAST_FETCH, timeout=300)
        assert "2 of its 6 rows are also in" in fetched.stderr
        found = stored_images(batch.successes, "webdataset")  # asserts shard == chunk rows
        assert sorted(row["uuid"] for row, _ in found) == sorted(rows)
        assert all(rows[row["uuid"]] == image for row, image in found)
        assert "every finished batch is sound" in run_cli("verify", out).stdout


def test_a_parquet_file_without_the_columns_read_is_unreadable(tmp_path: Path) -> None:
    """A file that is Parquet but not a chunk (no `uuid`, or no `error_code` where one is
    read) is set aside like a damaged one, not read as a chunk without rows."""
    stray = tmp_path / "successes-stray.parquet"
    pq.write_table(pa.table({"x": [1]}), stray)
    assert read_uuids(stray)[1].startswith("unreadable (ArrowInvalid: ")
    errors = tmp_path / "errors-x.parquet"
    pq.write_table(pa.table({"uuid": ["a"]}), errors)
    assert read_uuids(errors)[1] is None
    assert read_uuids(errors, ("error_code",))[1].startswith("unreadable (ArrowInvalid: ")

