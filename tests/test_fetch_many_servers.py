"""Many small servers at once (GBIF's long tail): a worker takes on more servers while its
cores have room, instead of one batch at a time."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST_FETCH, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec

SERVERS = 48  # twice the 24 batches a worker used to hold at most
IMAGES_PER_SERVER = 4


def most_servers_at_once(spans: list[tuple[float, float]]) -> int:
    """The most servers whose first-to-last request spans overlap at one moment."""
    return max(sum(1 for start, end in spans if start <= moment <= end)
               for moment, _ in spans)


def test_one_worker_fetches_many_small_servers_at_once(tmp_path: Path) -> None:
    hosts = [f"127.0.0.{10 + index}" for index in range(SERVERS)]
    # Slow answers keep each server in flight for a few seconds: long enough to see overlap.
    with Farm([ServerSpec(host, latency=0.5) for host in hosts]) as farm:
        urls = []
        for index, server in enumerate(farm.servers):
            urls += server.add_images(IMAGES_PER_SERVER, seed=100 * index)
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--no-profile", "--no-respect-robots", "--workers", "1", *FAST_FETCH,
                timeout=300)

        assert len(read_successes(out)) == len(urls)
        spans = []
        for server in farm.servers:
            times = [record.time for record in server.image_requests()]
            assert len(times) == IMAGES_PER_SERVER  # no server asked twice for one image
            spans.append((min(times), max(times)))
    # First contact asks each server slowly (1 request/s, then faster), so one worker has
    # room for all of them at once: it took them on together, not a few at a time.
    assert most_servers_at_once(spans) >= SERVERS - 4
