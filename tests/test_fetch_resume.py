"""A run cut off at any moment (kill -9, Ctrl-C) resumes with nothing lost or duplicated."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (
    FAST_FETCH,
    read_batches,
    read_errors,
    read_successes,
    run_cli,
    stored_images,
    write_lines,
)
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PER_SERVER = 60
RATE = 10
BATCH_SIZE = 20


@pytest.fixture
def farm_and_urls():
    with Farm([ServerSpec(host) for host in HOSTS]) as farm:
        expected = {}
        for host in HOSTS:
            server = farm[host]
            for i in range(PER_SERVER):
                server.images[f"{i}.jpg"] = make_small_image(i * 7 + len(host))
                expected[server.url(f"/img/{i}.jpg")] = hashlib.md5(
                    server.images[f"{i}.jpg"]).hexdigest()
        # A few that end as errors, so errors must survive the kills too.
        for host in HOSTS:
            expected[farm[host].url("/missing/1")] = None
        yield farm, expected


def download_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "distributed_downloader", "download", str(source),
            "--output", str(out), "--batch-size", str(BATCH_SIZE),
            "--default-rate-limit", str(RATE), "--workers", "2", *map(str, FAST_FETCH)]


def assert_nothing_duplicated(out: Path) -> None:
    finished = read_successes(out).column("uuid").to_pylist() + \
        read_errors(out).column("uuid").to_pylist()
    duplicated = [uuid for uuid, count in Counter(finished).items() if count > 1]
    assert not duplicated


def assert_complete(out: Path, expected: dict) -> None:
    prepared = sorted(read_batches(out).column("uuid").to_pylist())
    successes = read_successes(out).to_pylist()
    errors = read_errors(out).to_pylist()
    assert sorted([r["uuid"] for r in successes] + [r["uuid"] for r in errors]) == prepared
    for row in successes:
        assert row["hashsum_original"] == expected[row["identifier"]]
    assert {r["identifier"] for r in errors} == {u for u, h in expected.items() if h is None}
    assert not list(out.glob("downloaded_images/*/*/.*"))  # no temporary file left


def test_kill_9_at_several_moments_then_resume(farm_and_urls, tmp_path: Path) -> None:
    farm, expected = farm_and_urls
    source = write_lines(tmp_path / "urls.txt", list(expected))
    out = tmp_path / "out"
    committed_after_kills = []
    # Kill during prep, as soon as the first batches are committed, and later in the fetch.
    for rows_before_kill in (None, 20, 80):
        child = subprocess.Popen(download_command(source, out), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        if rows_before_kill is None:
            time.sleep(0.5)
        else:
            deadline = time.monotonic() + 60
            while read_count(out) < rows_before_kill and time.monotonic() < deadline:
                time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if (out / "prep" / "summary.json").exists():
            assert_nothing_duplicated(out)
            committed_after_kills.append(read_successes(out).num_rows)
    assert any(0 < count < len(expected) - len(HOSTS) for count in committed_after_kills), \
        f"no kill landed in the middle of the fetch: {committed_after_kills}"
    run_cli(*download_command(source, out)[3:], timeout=300)
    assert_complete(out, expected)
    # No URL was downloaded twice: each batch's rows are fetched until committed, never after.
    requests = Counter((host, r.path) for host in HOSTS for r in farm[host].log
                       if r.status == 200)
    assert max(requests.values()) <= 4  # one per run at most, in the worst case


def test_ctrl_c_stops_cleanly_and_resumes(farm_and_urls, tmp_path: Path) -> None:
    farm, expected = farm_and_urls
    source = write_lines(tmp_path / "urls.txt", list(expected))
    out = tmp_path / "out"
    child = subprocess.Popen(download_command(source, out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while read_count(out) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "run the same command again" in stderr
    committed = read_successes(out).num_rows
    assert committed >= 20  # finished rows were flushed, even in unfinished batches
    assert_nothing_duplicated(out)
    done_before = committed + read_errors(out).num_rows
    resumed = run_cli(*download_command(source, out)[3:], timeout=300)
    assert_complete(out, expected)
    # The progress counts the whole run: what was done before, then to 100%.
    total = len(expected)
    assert f"resuming: {done_before:,} of {total:,} rows were done before" in resumed.stderr
    assert f"fetch: {total:,}/{total:,} (100.0%)" in resumed.stderr


def second_batch_started(farm: Farm) -> bool:
    """Some server has served a few rows beyond its first batch (and its one-row batch of a
    missing image): a batch that a stop now finds unfinished, however fast the machine."""
    return max(len(server.image_requests()) for server in farm.servers) >= BATCH_SIZE + 4


def read_count(out: Path) -> int:
    try:
        return read_successes(out).num_rows
    except Exception:  # a chunk appearing while DuckDB lists the folder
        return 0


def committed_files(out: Path) -> dict[Path, tuple[int, int, int]]:
    """(inode, mtime, size) of every committed file of the download: chunks, the images their
    output format keeps beside them (only those of committed rows), markers."""
    files = {}
    for folder in out.glob("download*/*/*"):
        chunks = sorted(folder.glob("*-*.parquet"))
        committed = set(chunks) | set(folder.glob("_completed"))
        for chunk in chunks:
            key = chunk.name.removeprefix("successes-").removesuffix(".parquet")
            committed |= set(folder.glob(f"images-{key}.*"))
            if chunk.name.startswith("successes-") and (folder / "images").is_dir():
                committed |= {folder / "images" / f"{uuid}.jpg" for uuid in
                              pq.read_table(chunk, columns=["uuid"]).column(0).to_pylist()}
        for path in committed:
            stat = path.stat()
            files[path] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return files


@pytest.mark.parametrize("output_format", ["webdataset", "files", "hdf5"])
def test_kill_9_then_resume_writes_each_image_once(output_format: str, farm_and_urls,
                                                   tmp_path: Path) -> None:
    """Each output format's sink writes a chunk's images once, before the chunk: a kill at any
    point loses nothing, leaves nothing twice, and nothing committed is ever written again
    (not when its batch completes, not by the resumed run)."""
    farm, expected = farm_and_urls
    source = write_lines(tmp_path / "urls.txt", list(expected))
    out = tmp_path / "out"
    command = [*download_command(source, out), "--output-format", output_format]
    before: dict[Path, tuple[int, int, int]] = {}
    # Ctrl-C first: it commits the rows of unfinished batches, which later runs complete.
    for stop, rows_before_stop in ((signal.SIGINT, 30), (signal.SIGKILL, 110)):
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                read_count(out) >= rows_before_stop and second_batch_started(farm)):
            time.sleep(0.05)
        os.killpg(child.pid, stop)
        child.wait(timeout=60)
        assert_nothing_duplicated(out)
        now = committed_files(out)
        assert {path: now.get(path) for path in before} == before  # never written again
        before.update(now)
        if stop == signal.SIGINT:
            assert any(not (path.parent / "_completed").exists() for path in before
                       if path.name.startswith("successes-")), \
                "Ctrl-C left no committed chunk in an unfinished batch"
    run_cli(*command[3:], timeout=300)
    assert_complete(out, expected)
    after = committed_files(out)
    assert {path: after.get(path) for path in before} == before  # never written again
    images = {}
    for marker in out.glob("downloaded_images/*/*/_completed"):
        for row, image in stored_images(marker.parent, output_format):
            assert row["uuid"] not in images
            images[row["uuid"]] = hashlib.md5(image).hexdigest() == row["hashsum_resized"]
    assert len(images) == len(expected) - len(HOSTS) and all(images.values())
