"""One writer per run folder: a second command that would write is refused in one line naming
the holder; a lock whose holder is gone (kill -9 here, a lease run out on another host) is taken
over, by one contender only; commands that only read still work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import (
    FAST_FETCH,
    copy_run,
    read_batches,
    read_errors,
    read_successes,
    run_cli,
    write_lines,
)
from distributed_downloader.testing.farm import Farm, ServerSpec
from distributed_downloader.runlock import Holder, RunLocked, hold_run_lock

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
LEASE = 60


@pytest.fixture(scope="module")
def slow_farm():
    """Four servers of 100 images each: at 10/s a server, a fetch lasts about 10 s."""
    with Farm([ServerSpec(host) for host in HOSTS]) as farm:
        urls = []
        for server in farm.servers:
            urls += server.add_images(100, seed=len(urls))
        yield farm, urls


def fetch_command(out: Path, rate: float = 10, *more: str) -> list[str]:
    return [sys.executable, "-m", "distributed_downloader", "fetch", str(out), "--workers", "2",
            "--default-rate-limit", str(rate), *map(str, FAST_FETCH), *more]


@pytest.fixture(scope="module")
def prepared_once(slow_farm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The slow farm's URLs prepared once for the module; each test fetches a copy."""
    _, urls = slow_farm
    folder = tmp_path_factory.mktemp("lock")
    source = write_lines(folder / "urls.txt", urls)
    out = folder / "out"
    run_cli("prep", source, "--output", out, "--batch-size", 25)
    return source, out


@pytest.fixture
def prepared(prepared_once: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(input, run folder): a fresh copy of the prepared run, not fetched yet."""
    source, out = prepared_once
    return source, copy_run(out, tmp_path / "out")


def assert_every_uuid_once(out: Path) -> None:
    prepared_uuids = read_batches(out).column("uuid").to_pylist()
    finished = read_successes(out).column("uuid").to_pylist() + \
        read_errors(out).column("uuid").to_pylist()
    assert [u for u, n in Counter(finished).items() if n > 1] == []
    assert sorted(finished) == sorted(prepared_uuids)


def assert_refused_by(result_stderr: str, command: str, pid: int) -> None:
    """One line, naming the holder's command, host and PID."""
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, result_stderr
    assert f"`{command}` on host {socket.gethostname()} (PID {pid})" in lines[0]
    assert "Traceback" not in result_stderr


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def committed(out: Path) -> int:
    return len(list(out.glob("downloaded_images/*/*/successes-*.parquet")))


def plant_lock(out: Path, host: str, pid: int, heartbeat_age: float, lease: float = LEASE,
               boot_id: str | None = None) -> Holder:
    """A lock file as another holder would have left it, its heartbeat `heartbeat_age` old."""
    holder = Holder("fetch", host, pid, time.time() - heartbeat_age - 60, lease,
                    os.urandom(8).hex(), boot_id)
    lock = out / "run.lock"
    out.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({k: v for k, v in holder.__dict__.items() if k != "heartbeat"}))
    beat = time.time() - heartbeat_age
    os.utime(lock, (beat, beat))
    return holder


def this_boot() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def test_two_fetches_at_once_one_is_refused_and_the_other_completes(slow_farm,
                                                                    prepared) -> None:
    _, urls = slow_farm
    _, out = prepared
    first, second = (subprocess.Popen(fetch_command(out), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2))
    stderr = {child.pid: child.communicate(timeout=300)[1] for child in (first, second)}
    codes = {child.pid: child.returncode for child in (first, second)}
    assert sorted(codes.values()) == [0, 2], {pid: err[-2000:] for pid, err in stderr.items()}
    winner = next(pid for pid, code in codes.items() if code == 0)
    loser = next(pid for pid, code in codes.items() if code == 2)
    assert_refused_by(stderr[loser], "fetch", winner)
    assert_every_uuid_once(out)
    assert len(urls) == 400 and read_successes(out).num_rows == 400
    assert not (out / "run.lock").exists()  # released on the way out


def test_a_fetch_killed_hard_leaves_a_lock_the_next_fetch_takes_over(prepared) -> None:
    _, out = prepared
    child = subprocess.Popen(fetch_command(out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: committed(out) >= 2)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    left = json.loads((out / "run.lock").read_text())
    assert left["pid"] == child.pid  # the lock stayed behind, naming a dead process

    run_cli(*fetch_command(out)[3:], timeout=300)
    assert_every_uuid_once(out)
    assert not (out / "run.lock").exists()


STALE = ("dead process here", "other host, lease over")


def plant_stale_lock(out: Path, case: str) -> None:
    """A lock whose holder is gone: a process that ended on this host, or another host's lock
    not renewed for longer than its lease."""
    if case == "dead process here":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        plant_lock(out, socket.gethostname(), gone.pid, heartbeat_age=1, boot_id=this_boot())
    else:
        plant_lock(out, "node-17.cluster", 4242, heartbeat_age=LEASE + 5)


@pytest.mark.parametrize("case", ["dead process here", "other host, lease over",
                                  "other host, alive", "damaged file"])
def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path: Path, case: str) -> None:
    source = write_lines(tmp_path / "u.txt", [f"http://127.0.0.2:9/{i}.jpg" for i in range(5)])
    out = tmp_path / "out"
    if case in STALE:
        plant_stale_lock(out, case)
    elif case == "other host, alive":  # renewed a moment ago: whatever its PID means there
        plant_lock(out, "node-17.cluster", 4242, heartbeat_age=1)
    else:
        out.mkdir()
        (out / "run.lock").write_text("not a lock {")

    result = run_cli("prep", source, "--output", out, check=False)
    if case == "other host, alive":
        assert result.returncode == 2
        assert "`fetch` on host node-17.cluster (PID 4242)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (out / "prep").exists()  # refused before writing anything
    else:
        assert result.returncode == 0, result.stderr
        assert read_batches(out).num_rows == 5
        assert not list(out.glob("*run.lock*"))  # taken over, then released: nothing left


def test_a_holder_that_stopped_renewing_is_waited_for_until_its_lease_runs_out(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Lease 6 s, silent for 4 s: probably gone, but another host may not take it for 2 s more.
    plant_lock(out, "node-17.cluster", 4242, heartbeat_age=4, lease=6)
    started = time.monotonic()
    with hold_run_lock(out, "prep", LEASE) as lock:
        waited = time.monotonic() - started
        assert lock.still_held()
    assert 1.5 <= waited < 6


CONTENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import distributed_downloader.storage  # imported now: every contender starts at "go"
    from distributed_downloader.runlock import RunLocked, hold_run_lock

    out, me = Path(sys.argv[1]), sys.argv[2]
    (out.parent / f"ready-{me}").touch()
    while not (out.parent / "go").exists():
        time.sleep(0.001)
    try:
        with hold_run_lock(out, "fetch", 60):
            print("won", flush=True)
            time.sleep(3)  # still holding while the others look
    except RunLocked:
        print("refused")
""")


@pytest.mark.parametrize("case", ["free", "dead process here", "other host, lease over"])
def test_contenders_for_one_lock_have_one_winner(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if case in STALE:
        plant_stale_lock(out, case)
    contenders = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(out), str(i)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i in range(8)]
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == len(contenders))
    (tmp_path / "go").touch()
    outcomes = [child.communicate(timeout=60) for child in contenders]
    assert all(not err for _, err in outcomes), outcomes
    assert sorted(stdout.strip() for stdout, _ in outcomes) == ["refused"] * 7 + ["won"]
    assert not list(out.glob("*run.lock*"))


def test_writers_are_refused_while_a_fetch_runs_and_readers_are_not(prepared) -> None:
    source, out = prepared
    # Held at 2/s a server (no climb), the fetch lasts ~50 s: longer than the calls below on
    # any machine; the test stops it when done.
    fetching = subprocess.Popen(fetch_command(out, 2, "--max-rate-limit", "2"),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: committed(out) >= 1)
        for command in (["verify", out, "--fix"], ["prep", source, "--output", out, "--force"],
                        ["download", source, "--output", out],
                        ["export", out, "--to", "files"]):
            result = run_cli(*command, check=False)
            assert result.returncode == 2, (command, result.stderr)
            assert_refused_by(result.stderr, "fetch", fetching.pid)
        assert not (out / "verify").exists() and not (out / "export").exists()
        assert run_cli("status", out).returncode == 0
        assert "every finished batch is sound" in run_cli("verify", out).stdout
        assert fetching.poll() is None, "the fetch ended before the test was done with it"
    finally:
        fetching.send_signal(signal.SIGTERM)  # stops like Ctrl-C, and lets go of the lock
        _, stderr = fetching.communicate(timeout=120)
    assert fetching.returncode == 130, stderr
    assert not (out / "run.lock").exists()
    assert run_cli("verify", out, "--fix").returncode == 0  # the folder is free again


def test_a_refused_command_leaves_no_lock_behind(tmp_path: Path) -> None:
    out = tmp_path / "never-made"
    result = run_cli("download", tmp_path / "missing.txt", "--output", out, check=False)
    assert result.returncode == 2 and "missing.txt" in result.stderr
    assert not out.exists()  # the lock made the folder, and took it away again
    # A held lock refuses even its own process a second time.
    with pytest.raises(RunLocked), hold_run_lock(tmp_path / "x", "fetch", LEASE), \
            hold_run_lock(tmp_path / "x", "prep", LEASE):
        pass
