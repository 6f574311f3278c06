"""Batches: sizes and numbering, the Hive layout, refusing to overwrite, surviving a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from conftest import prep_summary, read_batches, read_parquet, run_cli
from distributed_downloader.prep.partition import _read_ahead


def write_url_list(path: Path, counts: dict[str, int]) -> list[str]:
    """A TXT list with `counts[host]` distinct URLs per host, interleaved as real lists are."""
    urls = []
    remaining = dict(counts)
    number = 0
    while any(remaining.values()):
        for host in counts:
            if remaining[host]:
                urls.append(f"http://{host}/img/{number}.jpg")
                remaining[host] -= 1
                number += 1
    path.write_text("\n".join(urls) + "\n")
    return urls


def test_batches_hold_at_most_batch_size_rows_numbered_from_zero(tmp_path: Path) -> None:
    source = tmp_path / "list.txt"
    counts = {"127.0.0.2:9001": 25, "127.0.0.3:9002": 10, "127.0.0.4:9003": 1}
    urls = write_url_list(source, counts)
    out = tmp_path / "out"
    run_cli("prep", source, "--output", out, "--batch-size", "10")

    sizes = duckdb.sql(
        f"SELECT server_name, partition_id, count(*) AS n FROM read_parquet("
        f"'{out}/prep/batches/*/*/*.parquet', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert sizes == [
        ("127.0.0.2:9001", 0, 10), ("127.0.0.2:9001", 1, 10), ("127.0.0.2:9001", 2, 5),
        ("127.0.0.3:9002", 0, 10),
        ("127.0.0.4:9003", 0, 1),
    ]
    rows = read_batches(out).to_pylist()
    assert sorted(r["identifier"] for r in rows) == sorted(urls)
    # Within a server, batches keep the input's order.
    first_server = [r["identifier"] for r in rows if r["server_name"] == "127.0.0.2:9001"]
    assert first_server == [u for u in urls if "127.0.0.2:9001" in u]
    servers = read_parquet(out / "prep" / "servers.parquet").to_pylist()
    assert servers == [
        {"server_name": "127.0.0.2:9001", "rows": 25, "batches": 3, "reused_rows": 0},
        {"server_name": "127.0.0.3:9002", "rows": 10, "batches": 1, "reused_rows": 0},
        {"server_name": "127.0.0.4:9003", "rows": 1, "batches": 1, "reused_rows": 0},
    ]
    assert prep_summary(out)["batches"] == 5


def test_refuses_to_overwrite_a_finished_prep_unless_forced(tmp_path: Path) -> None:
    source = tmp_path / "list.txt"
    write_url_list(source, {"127.0.0.2:9001": 3})
    out = tmp_path / "out"
    run_cli("prep", source, "--output", out)
    (out / "my-notes.txt").write_text("keep me")
    first = prep_summary(out)["finished_at"]

    refused = run_cli("prep", source, "--output", out, check=False)
    assert refused.returncode == 2
    assert "finished prep" in refused.stderr and "--force" in refused.stderr

    write_url_list(source, {"127.0.0.2:9001": 5})
    run_cli("prep", source, "--output", out, "--force")
    assert read_batches(out).num_rows == 5
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert prep_summary(out)["finished_at"] >= first


def modified(path: Path) -> int | None:
    """When `path` was last written (ns), None when it is not there."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def test_a_killed_prep_leaves_nothing_half_written(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    with open(source, "w") as handle:
        for i in range(400_000):
            handle.write(f"http://127.0.0.{2 + i % 50}:9000/a/{i}.jpg\n")
    out = tmp_path / "out"
    finished_kills = 0
    # Kill while it starts, as soon as it stages rows, as soon as it cuts batches: moments
    # seen in its work folder, so that they land mid-prep on a machine of any speed.
    work = out / "prep" / ".work"
    for moment in (None, work / "staging-0.parquet", work / "batches"):
        left = None if moment is None else modified(moment)  # by the prep killed before
        child = subprocess.Popen(
            [sys.executable, "-m", "distributed_downloader", "prep", str(source), "--output",
             str(out), "--batch-size", "1000", "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + (0.5 if moment is None else 60)
        while time.monotonic() < deadline and child.poll() is None and not (
                moment is not None and modified(moment) not in (None, left)):
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if (out / "prep" / "summary.json").exists():
            finished_kills += 1  # it finished before the kill: then it must be whole
            assert read_batches(out).num_rows == 400_000
        else:
            assert not (out / "prep" / "batches").exists()
    run_cli("prep", source, "--output", out, "--batch-size", "1000", "--force")
    rows = read_batches(out)
    assert rows.num_rows == 400_000
    assert len(set(rows.column("uuid").to_pylist())) == 400_000
    assert Counter(rows.column("server_name").to_pylist())["127.0.0.2:9000"] == 8000
    assert not (out / "prep" / ".work").exists()
    assert finished_kills < 3, "prep finished before every kill; the test proved nothing"


def test_sorted_rows_read_ahead_in_order_errors_raised_and_the_pull_stopped() -> None:
    """The sorted batches are pulled on a thread of their own: the cutter still gets them in
    order, an error of the pull is raised in the cutter's thread, and stopping early ends it."""
    assert list(_read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("the sort ran out of disk")

    with pytest.raises(ValueError, match="out of disk"):
        list(_read_ahead(failing(), depth=2))

    pulled = []

    def endless():
        while True:
            pulled.append(len(pulled))
            yield pulled[-1]

    ahead = _read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert not any(t.name == "prep-read-ahead" for t in threading.enumerate())
    assert len(pulled) <= 3 + 2 + 1
