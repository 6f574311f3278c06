"""`status`: counts, speed, ETA and servers, while a fetch runs and after; the HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image


def status_json(out: Path) -> dict:
    return json.loads(run_cli("status", out, "--json").stdout)


def test_status_during_and_after_a_run_matches_the_parquet(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2", rate_limit=4), ServerSpec("127.0.0.3", rate_limit=50)]
    with Farm(specs) as farm:
        slow, fast = farm.servers
        urls = []
        # The slow server needs 30 s at 4/s: time for status to catch the fetch at work even
        # on a loaded machine.
        for server, count in ((slow, 120), (fast, 40)):
            for i in range(count):
                server.images[f"{i}.jpg"] = make_small_image(i)
                urls.append(server.url(f"/img/{i}.jpg"))
        urls += [fast.url(f"/missing/{i}") for i in range(5)] + [fast.url("/html/x")]
        out = tmp_path / "out"
        source = write_lines(tmp_path / "u.txt", urls)
        command = [sys.executable, "-m", "distributed_downloader", "download", str(source),
                   "--output", str(out), "--batch-size", 10, "--default-rate-limit", 4,
                   "--no-profile", *FAST_FETCH]
        rates = tmp_path / "rates.csv"
        rates.write_text(f"server_name,rate_limit\n{fast.address},50\n")
        running = subprocess.Popen([*map(str, command), "--rates", str(rates)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            during = None
            while time.monotonic() < deadline:
                if (out / "fetch_state.json").exists():
                    during = status_json(out)
                    if during["done"] >= 50 and during["images_per_second"] > 0:
                        break
                time.sleep(1)
            assert during is not None and during["phase"] == "fetching"
            assert 0 < during["done"] < 166
            assert during["bound_by"] == slow.address  # 120 images at 4/s
            assert during["eta_seconds"] and during["eta_seconds"] > 1
            rows = {row["server"]: row for row in during["busiest"]}
            assert rows[slow.address]["rate"] <= 4 and rows[slow.address]["state"] in (
                "fetching", "paused")
            assert running.wait(timeout=120) == 0
        finally:
            running.kill()

    after = status_json(out)
    successes, errors = read_successes(out), read_errors(out)
    assert after["phase"] == "finished"
    assert after["successes"] == successes.num_rows == 160
    assert after["errors"] == errors.num_rows == 6
    assert after["errors_by_code"] == dict(Counter(errors.column("error_code").to_pylist()))
    assert after["done"] == after["rows"] == 166
    assert after["batches_done"] == after["batches"]
    assert after["eta_seconds"] is None

    report = tmp_path / "report" / "run.html"
    printed = run_cli("status", out, "--report", report)
    assert "finished" in printed.stdout
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 4 and "166" in page
    pngs = sorted(report.parent.glob("run-*.png"))
    assert [p.name for p in pngs] == ["run-bound.png", "run-errors.png", "run-servers.png",
                                      "run-speed.png"]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200


def test_status_speed_counts_images_stored_and_throttles_match_the_fetch(tmp_path: Path) -> None:
    from distributed_downloader.status import recent_speed

    history = [{"time": 0.0, "rows_done": 0, "successes": 0, "running": True},
               {"time": 10.0, "rows_done": 100, "successes": 40, "running": True}]
    assert recent_speed(history, 10.0, running=True) == 4.0  # images stored, not rows
    assert recent_speed(history, 10.0, running=True, count="rows_done") == 10.0

    with Farm([ServerSpec("127.0.0.2", rate_limit=2)]) as farm:
        server = farm.servers[0]
        urls = []
        for i in range(24):
            server.images[f"{i}.jpg"] = make_small_image(i)
            urls.append(server.url(f"/img/{i}.jpg"))
        urls += [server.url(f"/missing/{i}") for i in range(3)]
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "-o", out, "--no-profile",
                "--default-rate-limit", 10, *FAST_FETCH, timeout=120)
        assert server.status_count(429) > 0  # the guard: the run met the server's limit
    summary = json.loads((out / "fetch_summary.json").read_text())
    after = status_json(out)
    assert after["throttled_last_fetch"] == summary["throttled_this_run"] > 0
    assert sum(row["throttled"] for row in after["all_servers"]) == summary["throttled_this_run"]


def test_the_report_of_a_run_not_fetched_yet_says_why_its_plots_are_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", write_lines(tmp_path / "u.txt", ["http://127.0.0.2:9/a.jpg"]), "-o", out)
    report = tmp_path / "r.html"
    run_cli("status", out, "--report", report)
    page = report.read_text()
    assert "no speed yet" in page and "no error so far" in page
    assert "no server rate known yet" in page
    assert page.count("data:image/png;base64,") == 4
    narrow = run_cli("status", out, env={"COLUMNS": "40"})  # piped: lines are not cut
    line = next(line for line in narrow.stdout.splitlines() if line.startswith("rows:"))
    assert "0 / 1 done" in line and line.endswith("servers done 0 / 1")


def test_the_progress_bar_keeps_its_numbers_in_80_columns() -> None:
    import io

    from rich.console import Console

    from distributed_downloader.progress import FetchProgress

    class Run:  # what the bar reads of the scheduler
        successes, errors, throttled = 5_000, 123, 45

        def waits(self, now: float) -> list[str]:
            return ["127.0.0.2:8000 paused by the server (Retry-After) for 30 s", "another"]

        def busiest(self, count: int) -> list:
            return []

    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    progress = FetchProgress(console, total_rows=106_000, done_before=60_000)
    progress(Run())
    progress.stop()
    last = screen.getvalue().split("\r")[-1].replace("\x1b[2K", "").split("\n")[0]
    assert len(last) <= 80
    assert "65123/106000" in last and "img/s" in last and "errors 123" in last


def test_status_says_stopped_when_the_fetch_was_killed(tmp_path: Path) -> None:
    """A fetch killed with -9 leaves fetch_state.json saying "running" behind: status looks
    whether its process still runs instead of believing the file until it is old."""
    import os
    import signal

    with Farm([ServerSpec("127.0.0.2")]) as farm:
        urls = farm["127.0.0.2"].add_images(60)  # 30 s at 2/s
        out = tmp_path / "out"
        run_cli("prep", write_lines(tmp_path / "u.txt", urls), "--output", out)
        running = subprocess.Popen(
            [sys.executable, "-m", "distributed_downloader", "fetch", str(out), "--workers", "1",
             "--default-rate-limit", "2", *map(str, FAST_FETCH)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (out / "fetch_state.json").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status_json(out)["phase"] == "fetching"  # alive: believed
            os.killpg(running.pid, signal.SIGKILL)
            running.wait(timeout=30)
        finally:
            running.kill()
        state = json.loads((out / "fetch_state.json").read_text())
        assert state["running"] and time.time() - state["updated"] < 20  # left as it was
        after = status_json(out)
        assert after["phase"] == "stopped"
        assert all(row["state"] != "fetching" for row in after["all_servers"])
        assert "stopped" in run_cli("status", out).stdout
