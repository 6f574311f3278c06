"""A fetch cut short: a stop signal at any moment, even while its workers are still starting,
stops handing out work at once and ends the run within the grace period, and the next fetch
finishes with every prepared row exactly once; a killed worker's rows are counted once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import FAST_FETCH, read_batches, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.config import Settings
from distributed_downloader.testing.farm import Farm, ServerSpec

HOSTS = ("127.0.0.2", "127.0.0.3")
PER_SERVER = 30
RATE = 3  # requests/s per server: the whole fetch takes about PER_SERVER / RATE = 10 s
# Seconds after the fetch starts: during the imports and planning (to ~0.7 s here), while the
# workers are spawned and import (to ~2 s), and as their first requests go out.
MOMENTS = (0.3, 0.6, 0.7, 0.85, 1.0, 1.5, 2.5)
# And seconds after the executor is seen running (its first progress line), whatever the
# machine's speed: as the workers start and as their first requests go out.
AFTER_EXECUTOR_STARTS = (0.0, 0.5)


def fetch_command(out: Path, rate: float = RATE) -> list[str]:
    return [sys.executable, "-m", "distributed_downloader", "fetch", str(out), "--workers", "2",
            "--default-rate-limit", str(rate), "--no-respect-robots", *FAST_FETCH]


def live_in_group(group: int) -> list[str]:
    """Command lines of the processes of a process group that still run (zombies do not)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(cmdline)
    return found


def image_requests(farm: Farm) -> int:
    return sum(len(server.image_requests()) for server in farm.servers)


def progress_lines(out: Path) -> int:
    """Lines in fetch_progress.jsonl: the local executor writes one as soon as it runs."""
    path = out / "fetch_progress.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("target", ["process group", "coordinator"])
def test_a_stop_signal_while_the_fetch_starts_ends_it(target: str, tmp_path: Path) -> None:
    with Farm([ServerSpec(host, generate_images=True, generated_size=(64, 48))
               for host in HOSTS]) as farm:
        urls = [server.url(f"/img/{i}.jpg") for server in farm.servers
                for i in range(PER_SERVER)]
        out = tmp_path / "out"
        run_cli("prep", write_lines(tmp_path / "urls.txt", urls), "--output", out,
                "--batch-size", 5)
        prepared = sorted(read_batches(out).column("uuid").to_pylist())
        assert len(prepared) == len(urls)
        executor_reached = 0
        for moment, after_executor in [(m, False) for m in MOMENTS] + \
                [(m, True) for m in AFTER_EXECUTOR_STARTS]:
            before, history = image_requests(farm), progress_lines(out)
            child = subprocess.Popen(fetch_command(out), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
            started = time.monotonic()
            if after_executor:
                while progress_lines(out) == history and time.monotonic() < started + 60:
                    time.sleep(0.02)
            time.sleep(moment)
            if target == "process group":
                os.killpg(child.pid, signal.SIGTERM)
            else:
                os.kill(child.pid, signal.SIGTERM)
            try:
                _, stderr = child.communicate(timeout=Settings().cluster.stop_grace + 10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                pytest.fail(f"SIGTERM at {moment} s: the fetch did not end within the grace "
                            f"period ({Settings().cluster.stop_grace:.0f} s)")
            took = time.monotonic() - started
            # Ended by the signal: stopped cleanly, or killed while Python was still starting.
            assert child.returncode in (130, -signal.SIGTERM), (moment, child.returncode, stderr)
            assert "Traceback" not in stderr, stderr
            asked = image_requests(farm) - before
            # The whole run would ask for every image over ~10 s; stopped, it asks a few.
            assert asked < len(urls) // 3, f"SIGTERM at {moment} s: {asked} images requested " \
                f"in {took:.1f} s"
            executor_reached += progress_lines(out) > history
            # Nothing of the run outlives it (multiprocessing's resource tracker, which ends on
            # its own when the run's end closes its pipe, gets a moment).
            deadline = time.monotonic() + 5
            while live_in_group(child.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not live_in_group(child.pid), f"left running: {live_in_group(child.pid)}"
        # Guard: some signals landed while the workers started or ran, not all before.
        assert executor_reached >= 2, executor_reached
        assert image_requests(farm) < len(urls)
        run_cli(*fetch_command(out, rate=10 * RATE)[3:], timeout=300)  # what is left, sooner
        finished = read_successes(out).column("uuid").to_pylist() + \
            read_errors(out).column("uuid").to_pylist()
        assert sorted(finished) == prepared
        assert max(Counter(finished).values()) == 1


def worker_processes(coordinator: int) -> list[int]:
    """The fetch workers of a coordinator: the children of its fork server (the one child of
    it that multiprocessing's forkserver runs; not its resource tracker)."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, bytes] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parents[pid], cmdlines[pid] = int(fields[1]), cmdline
    servers = {pid for pid, parent in parents.items()
               if parent == coordinator and b"multiprocessing.forkserver" in cmdlines[pid]}
    return [pid for pid, parent in parents.items() if parent in servers]


def sockets_of(pid: int) -> list[str]:
    """Inodes of the sockets a process has open (from /proc/PID/fd)."""
    inodes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.append(link[len("socket:["):-1])
    return inodes


def busiest_worker(workers: list[int], farm: Farm) -> int:
    """The worker with the most connections open to the farm: one that is fetching now (the
    scheduler may have given the other worker only batches still waiting for the server's rate)."""
    ports = {urlsplit(server.url("/")).port for server in farm.servers}
    to_farm = set()  # inodes of TCP sockets whose remote port is one of the farm's
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) in ports:
            to_farm.add(fields[9])
    return max(workers, key=lambda pid: len(to_farm.intersection(sockets_of(pid))))


def test_progress_ends_at_the_prepared_rows_after_a_worker_is_killed(tmp_path: Path) -> None:
    """A killed worker's batch is fetched again by another: the run's progress counts its rows
    once, ending at exactly the prepared rows (not 451/400)."""
    with Farm([ServerSpec(host, generate_images=True, generated_size=(64, 48))
               for host in HOSTS]) as farm:
        urls = [server.url(f"/img/{i}.jpg") for server in farm.servers for i in range(60)]
        out = tmp_path / "out"
        run_cli("prep", write_lines(tmp_path / "urls.txt", urls), "--output", out,
                "--batch-size", 30)
        command = [*fetch_command(out), "--default-rate-limit", "10"]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while image_requests(farm) < 30 and time.monotonic() < deadline:
                time.sleep(0.05)  # each worker is about half-way through its first batch
            workers = worker_processes(child.pid)
            assert len(workers) == 2, workers
            os.kill(busiest_worker(workers, farm), signal.SIGKILL)
            _, stderr = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
        assert child.returncode == 0, stderr
        # Guard: the killed worker's unwritten rows were fetched again by the other.
        asked = Counter((server.spec.host, r.path) for server in farm.servers
                        for r in server.image_requests())
        assert max(asked.values()) >= 2, "the kill came after its worker's rows were written"
        summary = json.loads((out / "fetch_summary.json").read_text())
        assert summary["finished"] and summary["successes"] + summary["errors"] == len(urls)
        progress = [json.loads(line)["rows_done"]
                    for line in (out / "fetch_progress.jsonl").read_text().splitlines()]
        assert max(progress) <= len(urls) and progress[-1] == len(urls), progress
