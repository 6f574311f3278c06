"""Many small batches of many servers in flight at once: every image stored, and the worker's
memory bounded all the same (issue 14).

A worker holds hundreds of batches at once when they are small and their servers slow; each
consumer of each batch used to keep the last body it fetched until its batch ended, and answers
arriving while the body budget was full waited in their connections' read buffers: with camera
photos a worker went over 400 MiB.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST_FETCH, read_batches, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_photo

WORKER_MEMORY_MIB = 400
SERVERS = 48
IMAGES_PER_SERVER = 8
BATCH_SIZE = 2  # four batches a server: 192 batches, all of them in one worker at once


def test_a_worker_with_many_small_batches_of_many_servers_stays_under_400_mib(
        tmp_path: Path) -> None:
    photos = [make_photo(3000, 2000, seed=seed) for seed in range(4)]  # ~2.4 MB each
    hosts = [f"127.0.0.{10 + index}" for index in range(SERVERS)]
    # Slow answers keep every server's batches in flight together.
    with Farm([ServerSpec(host, latency=0.3) for host in hosts]) as farm:
        urls = []
        for index, server in enumerate(farm.servers):
            for image in range(IMAGES_PER_SERVER):
                server.images[f"{image}.jpg"] = photos[(index + image) % len(photos)]
                urls.append(server.url(f"/img/{image}.jpg"))
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", BATCH_SIZE, "--workers", 1, "--cpu-per-worker", 2,
                "--no-profile", "--no-respect-robots", *FAST_FETCH, timeout=600)
        spans = [(min(times), max(times)) for times in
                 ([record.time for record in server.image_requests()]
                  for server in farm.servers)]

    rows = read_successes(out)
    assert sorted(rows["uuid"].to_pylist()) == sorted(read_batches(out)["uuid"].to_pylist())
    assert read_errors(out).num_rows == 0
    summary = json.loads((out / "fetch_summary.json").read_text())
    assert summary["worker_peak_rss_mib"] <= WORKER_MEMORY_MIB
    # Guard: the worker did hold many servers' batches at once (what used to cost memory).
    most_at_once = max(sum(1 for start, end in spans if start <= moment <= end)
                       for moment, _ in spans)
    assert most_at_once >= SERVERS // 2
