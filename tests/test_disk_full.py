"""A full disk ends the run at once, in one line, with nothing half-written; once space is
freed, the same command finishes the run exactly.

The run folder lives on a small tmpfs of its own; a ballast file the test writes there takes
the space away and gives it back.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import FAST_FETCH, read_batches, read_errors, read_successes, run_cli, write_lines
from test_cluster import MPI_ENV, cluster_piece
from distributed_downloader.errors import EXIT_OUT_OF_SPACE
from distributed_downloader.testing.farm import Farm, ServerSpec, make_photo

HOSTS = ("127.0.0.2", "127.0.0.3")
IMAGES_PER_SERVER = 24
DISK_BYTES = 4 << 20
# Room for the fetch's own small files and a few chunks (8 photos of ~17 KiB each), not for
# the ~850 KiB of images the run stores: under MPI two ranks write their first chunks at once,
# and both must find room for the disk to fill up mid-run rather than at the first write.
FREE_MID_RUN = 500 << 10


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                              str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def fill(ballast: Path) -> None:
    """Write until the disk refuses another byte."""
    with open(ballast, "ab", buffering=0) as handle:
        for block in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError:
                pass
    assert free_bytes(ballast.parent) == 0


def run_fetch(executor: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    """The same fetch command each time: local worker processes, or MPI ranks under mpirun."""
    command = [sys.executable, "-m", "distributed_downloader", "fetch", str(out),
               "--default-rate-limit", "50", *map(str, FAST_FETCH)]
    env = {**os.environ, "COLUMNS": "200"}
    if executor == "mpi":
        command = ["mpirun", "--oversubscribe", "-n", "3", *command, "--executor", "mpi"]
        env.update(MPI_ENV)
    else:
        command += ["--workers", "2"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def leftovers(out: Path) -> list[Path]:
    """Temporary files, anywhere in the run folder."""
    return [path for path in out.rglob("*") if ".tmp" in path.name]


def the_one_error_line(stderr: str, executor: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    if executor == "local":  # (mpirun adds its own banner after it, saying it ended the job)
        assert errors[0] == lines[-1], stderr
    return errors[0]


@pytest.mark.parametrize("executor", ["local", "mpi"])
def test_full_disk_ends_the_run_in_one_line_and_the_same_command_finishes(
        executor: str, small_disk: Path, tmp_path: Path) -> None:
    if executor == "mpi":
        cluster_piece("mpirun")
    with Farm([ServerSpec(host) for host in HOSTS]) as farm:
        expected = {}
        for number, server in enumerate(farm.servers):
            for i in range(IMAGES_PER_SERVER):
                server.images[f"{i}.jpg"] = make_photo(240, 180, seed=number * 1000 + i)
                expected[server.url(f"/img/{i}.jpg")] = hashlib.md5(
                    server.images[f"{i}.jpg"]).hexdigest()
            expected[server.url("/missing/1")] = None
        out = small_disk / "out"
        run_cli("prep", write_lines(tmp_path / "urls.txt", list(expected)), "--output", out,
                "--batch-size", 8)
        ballast = small_disk / "ballast"

        # A disk full before the fetch starts: one line, exit 28, nothing left behind.
        fill(ballast)
        at_start = run_fetch(executor, out, timeout=60)
        assert at_start.returncode == EXIT_OUT_OF_SPACE, at_start.stderr
        line = the_one_error_line(at_start.stderr, executor)
        assert line.startswith(f"error: out of space in {out}") and "(0 bytes free)" in line
        assert "run the same command again" in line
        assert leftovers(out) == []
        assert not list(out.glob("downloaded_images/*/*/*"))

        # Room for a few chunks only: the disk fills up while the workers write.
        os.truncate(ballast, ballast.stat().st_size - FREE_MID_RUN)
        started = time.monotonic()
        mid_run = run_fetch(executor, out, timeout=120)
        seconds = time.monotonic() - started
        assert mid_run.returncode == EXIT_OUT_OF_SPACE, mid_run.stderr
        line = the_one_error_line(mid_run.stderr, executor)
        assert line.startswith(f"error: out of space in {out}")
        assert re.search(r"writing [0-9.]+ [KMG]?i?B failed", line)  # the write that failed
        if read_successes(out).num_rows:
            # What the rest needs, at the size per row of what was stored (or of the chunk that
            # failed); a run that stored no image yet (only 404s) has no size per row to go by.
            assert "rows left take about" in line
        assert seconds < 60, f"the run took {seconds:.0f} s to end"
        assert leftovers(out) == []
        chunks = list(out.glob("download*/*/*/*.parquet"))
        for chunk in chunks:  # every chunk whole: nothing half-written
            pq.read_table(chunk)
        committed = read_successes(out).column("uuid").to_pylist() + \
            read_errors(out).column("uuid").to_pylist()
        assert 0 < len(committed) < len(expected), "the disk did not fill up mid-run"
        assert max(Counter(committed).values()) == 1

        # Space freed: the same command finishes, each prepared UUID exactly once.
        ballast.unlink()
        finished = run_fetch(executor, out, timeout=300)
        assert finished.returncode == 0, finished.stderr

    prepared = sorted(read_batches(out).column("uuid").to_pylist())
    successes = read_successes(out).to_pylist()
    errors = read_errors(out).to_pylist()
    assert sorted([row["uuid"] for row in successes] + [row["uuid"] for row in errors]) == \
        prepared
    assert {row["identifier"]: row["hashsum_original"] for row in successes} == \
        {url: md5 for url, md5 in expected.items() if md5 is not None}
    assert {row["identifier"] for row in errors} == \
        {url for url, md5 in expected.items() if md5 is None}
    assert leftovers(out) == []
