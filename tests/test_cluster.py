"""Across a cluster: real OpenMPI (`mpirun`) and a real single-node Slurm on a loopback farm.

scripts/test.sh installs and starts both (scripts/setup-cluster.sh); without them these tests
are skipped, unless DD_REQUIRE_CLUSTER=1 (as in CI), where a missing piece is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.runlock import hold_run_lock

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def cluster_piece(command: str) -> None:
    if shutil.which(command) is None:
        if os.environ.get("DD_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"{command} is missing: scripts/setup-cluster.sh should have set it up")
        pytest.skip(f"{command} is not installed (run scripts/setup-cluster.sh)")


def run_mpi(ranks: int, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cluster_piece("mpirun")
    command = ["mpirun", "--oversubscribe", "-n", str(ranks), sys.executable, "-m",
               "distributed_downloader", *map(str, args)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, **MPI_ENV, "COLUMNS": "200"})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def add_images(server, count: int, prefix: str = "") -> list[str]:
    urls = []
    for i in range(count):
        name = f"{prefix}{i}.jpg"
        server.images[name] = make_small_image(hash((server.spec.host, i)) % 100_000)
        urls.append(server.url(f"/img/{name}"))
    return urls


def outcome(out: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    successes = [(r["uuid"], r["hashsum_original"]) for r in read_successes(out).to_pylist()]
    errors = [(r["uuid"], r["error_code"]) for r in read_errors(out).to_pylist()]
    return successes, errors


def test_mpi_gives_the_same_results_as_local(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2", rate_limit=40), ServerSpec("127.0.0.3", rate_limit=40),
             ServerSpec("127.0.0.4", rate_limit=40)]
    with Farm(specs) as farm:
        urls = []
        for server in farm.servers:
            urls += add_images(server, 40)
            urls += [server.url(f"/missing/{i}.jpg") for i in range(3)]
        source = write_lines(tmp_path / "u.txt", urls)
        local, mpi = tmp_path / "local", tmp_path / "mpi"
        run_cli("download", source, "--output", local, "--batch-size", 10, "--workers", 2,
                "--default-rate-limit", 40, *FAST_FETCH, timeout=300)
        run_mpi(3, "download", source, "--output", mpi, "--batch-size", 10, "--executor",
                "mpi", "--default-rate-limit", 40, *FAST_FETCH)

        local_successes, local_errors = outcome(local)
        mpi_successes, mpi_errors = outcome(mpi)
        assert len(mpi_successes) == len(set(mpi_successes)) == 120  # no row twice
        assert set(mpi_successes) == set(local_successes)
        assert set(mpi_errors) == set(local_errors)
        assert {code for _, code in mpi_errors} == {"http_404"}
        expected = {hashlib.md5(image).hexdigest() for s in farm.servers
                    for image in s.images.values()}
        assert {md5 for _, md5 in mpi_successes} == expected
        # Chunks were written by the fetching ranks (1 and 2), not by the scheduler (rank 0).
        writers = {p.name.split("-")[1].split(".")[0]
                   for p in mpi.glob("downloaded_images/*/*/successes-*.parquet")}
        assert writers <= {"w1", "w2"} and writers


def test_three_ranks_on_one_server_share_its_budget(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2", rate_limit=5)]) as farm:
        server = farm["127.0.0.2"]
        urls = add_images(server, 90)
        out = tmp_path / "out"
        # min_worker_rate 1: the 5/s budget (no climb above it) is split over all three
        # fetching ranks.
        run_mpi(4, "download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 10, "--executor", "mpi", "--default-rate-limit", 5,
                "--max-rate-limit", 5, "--min-worker-rate", 1, "--no-profile", *FAST_FETCH)
        assert read_successes(out).num_rows == 90
        writers = {p.name.split("-")[1].split(".")[0]
                   for p in out.glob("downloaded_images/*/*/successes-*.parquet")}
        assert writers == {"w1", "w2", "w3"}  # every fetching rank worked on this server
        assert server.peak_per_second() <= 6
        # Three uncoordinated pacers can meet in one second now and then; never more.
        assert server.status_count(429) <= 0.03 * len(server.log)


def wait_for_chain(out: Path, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        status = json.loads(run_cli("slurm", "status", out, "--json").stdout)
        if status["state"] != "running" or time.monotonic() > deadline:
            return status
        time.sleep(5)


def test_slurm_chain_of_one_minute_periods_finishes_the_download(tmp_path: Path) -> None:
    cluster_piece("sbatch")
    cluster_piece("mpirun")
    with Farm([ServerSpec("127.0.0.2", rate_limit=2)]) as farm:
        server = farm["127.0.0.2"]
        # 100 s at the server's 2 requests/s: Slurm signals each 1-minute period 0-30 s in
        # (it checks limits every 30 s), so the download takes several periods.
        urls = add_images(server, 200)
        source = write_lines(tmp_path / "urls.txt", urls)
        out = tmp_path / "out"
        config = tmp_path / "hpc.yaml"
        config.write_text(
            f"path_to_input: {source}\npath_to_output_folder: {out}\naccount: tests\n"
            "downloader_parameters:\n  max_nodes: 1\n  workers_per_node: 2\n"
            "  cpu_per_worker: 1\n  default_rate_limit: 2\n  batch_size: 40\n"
            "time_limit: '1'\nstop_margin: 30\nallow_network: [127.0.0.0/25]\n")
        submitted = run_cli("slurm", "submit", "--config", config)
        assert "download period 1" in submitted.stdout
        try:
            status = wait_for_chain(out, 600)
        finally:
            run_cli("slurm", "cancel", out, check=False)

    assert status["state"] == "finished", status
    assert status["rows_done"] == status["rows"] == len(urls)
    successes = read_successes(out).to_pylist()
    assert len(successes) == len({r["uuid"] for r in successes}) == len(urls)
    assert read_errors(out).num_rows == 0
    by_url = {url: hashlib.md5(server.images[url.rsplit("/", 1)[1]]).hexdigest() for url in urls}
    assert all(r["hashsum_original"] == by_url[r["identifier"]] for r in successes)
    periods = [job for job in status["jobs"] if job["kind"] == "download" and job["started"]]
    assert len(periods) >= 3  # the time limit cut the download into several periods
    # Each period resumed where the last stopped: progress at each start only grows.
    progress = [job["rows_at_start"] for job in periods]
    assert progress == sorted(progress) and progress[0] == 0
    assert [job["kind"] for job in status["jobs"][:2]] == ["prep", "download"]  # no profile
    logs = list((out / "slurm" / "logs").glob("dd-download-*.out"))
    assert len(logs) >= len(periods)
    text = run_cli("slurm", "status", out).stdout
    assert "finished" in text and periods[0]["id"] in text


def test_slurm_cancel_stops_the_chain_and_keeps_what_was_committed(tmp_path: Path) -> None:
    cluster_piece("sbatch")
    cluster_piece("mpirun")
    with Farm([ServerSpec("127.0.0.3", rate_limit=2)]) as farm:
        urls = add_images(farm["127.0.0.3"], 200)
        out = tmp_path / "out"
        run_cli("slurm", "submit", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--time-limit", "10", "--batch-size", 10, "--default-rate-limit", 2,
                "--allow-network", "127.0.0.0/25", "--workers-per-node", 1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(run_cli("slurm", "status", out, "--json").stdout)
            if status["rows_done"] >= 20:  # period 1 is fetching and has committed batches
                break
            time.sleep(2)
        cancelled = run_cli("slurm", "cancel", out).stdout
        time.sleep(3)
        status = json.loads(run_cli("slurm", "status", out, "--json").stdout)
    assert "cancelled jobs:" in cancelled
    assert status["state"] == "cancelled"
    assert not [job for job in status["jobs"]
                if job["slurm_state"] in ("PENDING", "RUNNING", "CONFIGURING")]
    assert 20 <= status["rows_done"] < 200
    successes = read_successes(out).to_pylist()
    assert len(successes) == len({r["uuid"] for r in successes}) == status["rows_done"]


def test_tools_on_mpi_ranks_give_the_local_result(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = []
        for server in farm.servers:
            for i in range(12):
                server.images[f"{i}.png"] = make_small_image(i, (120, 90), image_format="PNG")
                urls.append(server.url(f"/img/{i}.png"))
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 4, "--no-profile", *FAST_FETCH, timeout=300)
    run_mpi(3, "tools", "resize", out, "--image-size", 40, "--executor", "mpi")
    local = tmp_path / "local"
    shutil.copytree(out, local)
    shutil.rmtree(local / "tools")
    run_cli("tools", "resize", local, "--image-size", 40)

    def resized(root: Path) -> set[tuple[str, str]]:
        rows = []
        for path in root.glob("tools/resize/*/*/successes-*.parquet"):
            rows += pq.read_table(path, columns=["uuid", "hashsum_resized"]).to_pylist()
        return {(r["uuid"], r["hashsum_resized"]) for r in rows}

    assert len(resized(out)) == 24
    assert resized(out) == resized(local)
    summary = json.loads((out / "tools" / "resize" / "summary.json").read_text())
    assert summary["batches_done"] == 6 and summary["resized"] == 24


def test_an_error_on_rank_0_ends_every_rank(tmp_path: Path) -> None:
    cluster_piece("mpirun")
    started = time.monotonic()
    completed = subprocess.run(
        ["mpirun", "--oversubscribe", "-n", "3", sys.executable, "-m", "distributed_downloader",
         "download", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "out"),
         "--executor", "mpi"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **MPI_ENV})
    assert completed.returncode != 0
    assert "missing.txt" in completed.stderr + completed.stdout
    assert time.monotonic() - started < 60  # the waiting ranks did not hang


def test_slurm_tool_job_runs_a_tool_on_mpi_ranks(tmp_path: Path) -> None:
    cluster_piece("sbatch")
    cluster_piece("mpirun")
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        urls = add_images(farm["127.0.0.2"], 12)
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 4, "--no-profile", *FAST_FETCH, timeout=300)
    (out / "config.yaml").write_text((out / "config.yaml").read_text() +
                                     "tools_workers_per_node: 2\n")
    submitted = run_cli("slurm", "tool", "image_verification", out)
    assert "submitted tools image_verification: job" in submitted.stdout
    summary_path = out / "tools" / "image_verification" / "summary.json"
    deadline = time.monotonic() + 180
    while not summary_path.exists() and time.monotonic() < deadline:
        time.sleep(2)
    summary = json.loads(summary_path.read_text())
    assert (summary["images"], summary["failed"], summary["batches_done"]) == (12, 0, 3)
    log = next((out / "slurm" / "logs").glob("dd-tool-image_verification-*.out")).read_text()
    assert "tools image_verification" in log


def test_under_mpi_rank_0_holds_the_run_for_every_rank(tmp_path: Path) -> None:
    cluster_piece("mpirun")
    out = tmp_path / "out"
    source = write_lines(tmp_path / "u.txt", ["http://127.0.0.2:9/a.jpg"])
    run_cli("prep", source, "--output", out)
    with hold_run_lock(out, "fetch", 60):  # a fetch by hand, on this host
        for command in (["fetch", out], ["download", source, "--output", out],
                        ["tools", "resize", out]):
            completed = subprocess.run(
                ["mpirun", "--oversubscribe", "-n", "3", sys.executable, "-m",
                 "distributed_downloader", *map(str, command), "--executor", "mpi"],
                capture_output=True, text=True, timeout=120, check=False,
                env={**os.environ, **MPI_ENV, "COLUMNS": "200"})
            output = completed.stdout + completed.stderr
            assert completed.returncode == 2, output
            assert output.count(f"is being written by `fetch` on host "
                                f"{socket.gethostname()} (PID {os.getpid()})") == 1, output
            assert "MPI_ABORT" not in output  # every rank ended on its own
    # Free again: one mpirun is one writer, its ranks are not refused by rank 0's lock.
    run_mpi(3, "tools", "image_verification", out, "--executor", "mpi")
    assert not (out / "run.lock").exists()
