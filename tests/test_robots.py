"""robots.txt (RFC 9309): disallowed URLs are never requested, Crawl-delay caps the rate, an
unreachable robots.txt pauses the server, and the file is fetched once per run."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.config import NetworkSettings
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.fetch.client import HttpClient
from distributed_downloader.fetch.robots import (
    MAX_AGE,
    UNREACHABLE_GIVES_NONE_AFTER,
    RobotsFile,
    cache_seconds,
    fetch_robots,
)

# Our own group wins over "*": /img/secret is closed to us, everything else open, 1 s apart.
OWN_GROUP = """User-agent: *
Disallow: /

User-agent: distributed-downloader
Disallow: /img/secret
Crawl-delay: 1
"""
# No group of ours: "*" holds (longest match wins: /img/private/ok is allowed again).
STAR_GROUP = """User-agent: otherbot
Disallow: /

User-agent: *
Disallow: /img/private/
Allow: /img/private/ok
"""


def add(server, names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        server.images[name] = make_small_image(hash(name) % 1000 + i)
    return [server.url(f"/img/{name}") for name in names]


def test_disallowed_urls_are_never_requested_and_crawl_delay_caps_the_rate(
        tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2", robots_txt=OWN_GROUP),
             ServerSpec("127.0.0.3", robots_txt=STAR_GROUP,
                        robots_headers={"Cache-Control": "no-cache"}),
             ServerSpec("127.0.0.4")]  # no robots.txt (404): no restriction
    with Farm(specs) as farm:
        own, star, absent = farm.servers
        own_open = add(own, [f"{i}.jpg" for i in range(6)])
        own_closed = add(own, [f"secret{i}.jpg" for i in range(4)])
        star_open = add(star, [f"{i}.jpg" for i in range(5)] + ["private/ok1.jpg"])
        star_closed = add(star, [f"private/{i}.jpg" for i in range(4)])
        # Allowed itself, but redirects into a disallowed path: that hop is not taken.
        redirect = star.url("/redirect-to?url=/img/private/0.jpg")
        absent_open = add(absent, [f"{i}.jpg" for i in range(5)])
        urls = own_open + own_closed + star_open + star_closed + [redirect] + absent_open
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--contact", "robots-test@example.org", *FAST_FETCH, timeout=300)

        errors = {row["identifier"]: row for row in read_errors(out).to_pylist()}
        assert set(errors) == set(own_closed + star_closed + [redirect])
        assert {row["error_code"] for row in errors.values()} == {"robots_disallowed"}
        assert {row["identifier"] for row in read_successes(out).to_pylist()} == \
            set(own_open + star_open + absent_open)
        # Never requested, neither by the profile's probes nor by fetch (nor through redirects).
        assert not [r for r in own.log if r.path.startswith("/img/secret")]
        assert not [r for r in star.log if r.path.startswith("/img/private/")
                    and not r.path.startswith("/img/private/ok")]
        # Fetched once for the whole download (profile, then fetch from the cache).
        assert [server.requests_to("/robots.txt") for server in farm.servers] == [1, 1, 1]
        # Crawl-delay: 1 s: no two requests to that server (robots.txt included) within 1 s.
        times = sorted(record.time for record in own.log)
        assert min(b - a for a, b in zip(times, times[1:])) >= 0.95
        cached = json.loads(next((out / "profiles" / "robots").glob("127.0.0.2*")).read_text())
        assert cached["state"] == "rules" and "Crawl-delay: 1" in cached["body"]

        # Retrying errors re-checks the disallowed rows against robots.txt, without a request:
        # a cached file within its cache time is not asked for again, a no-cache one is.
        run_cli("fetch", out, "--retry-errors", *FAST_FETCH, timeout=300)
        assert read_errors(out).num_rows == len(errors)
        assert not [r for r in own.log if r.path.startswith("/img/secret")]
        assert [server.requests_to("/robots.txt") for server in (own, star)] == [1, 2]


def test_an_unreachable_robots_txt_pauses_the_server(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2", robots_txt="", robots_status=503),  # Retry-After: 1
             ServerSpec("127.0.0.3", robots_txt="", robots_status=429),
             ServerSpec("127.0.0.4")]
    with Farm(specs) as farm:
        failing, throttling, fine = farm.servers
        failing_urls = add(failing, [f"{i}.jpg" for i in range(5)])
        throttling_urls = add(throttling, [f"{i}.jpg" for i in range(5)])
        fine_urls = add(fine, [f"{i}.jpg" for i in range(5)])
        out = tmp_path / "out"
        # profile first: it does not probe them, and leaves the pausing to fetch.
        run_cli("download", write_lines(tmp_path / "u.txt",
                                        failing_urls + throttling_urls + fine_urls),
                "--output", out, "--profile", "--server-down-after", 3, *FAST_FETCH,
                timeout=300)
        with open(out / "profiles" / "servers.csv") as handle:
            notes = {row["server_name"]: (row["status"], row["notes"])
                     for row in csv.DictReader(handle)}
        assert notes[failing.address][0] == "ok" and "not probed" in notes[failing.address][1]
        # Complete disallow while unreachable: robots.txt asked again after each pause,
        # no image ever asked for; the rows are retryable errors for a later run.
        for server in (failing, throttling):
            assert server.image_requests() == []
            assert 2 <= server.requests_to("/robots.txt") <= 8  # profile's, then fetch's
        errors = read_errors(out).to_pylist()
        assert {row["identifier"] for row in errors} == set(failing_urls + throttling_urls)
        assert {row["error_code"] for row in errors} == {"robots_unreachable"}
        assert read_successes(out).num_rows == 5

        # The files come back (one missing, one allowing everything): the retry fetches all.
        failing.spec.robots_txt = None
        throttling.spec.robots_status = 200
        run_cli("fetch", out, "--retry-errors", *FAST_FETCH, timeout=300)
        assert read_errors(out).num_rows == 0
        assert read_successes(out).num_rows == 15
        assert len(failing.image_requests()) == len(throttling.image_requests()) == 5


def test_respect_robots_off_asks_nothing(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2", robots_txt="User-agent: *\nDisallow: /\n")]) as farm:
        server = farm.servers[0]
        urls = add(server, [f"{i}.jpg" for i in range(3)])
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--no-profile", "--no-respect-robots", *FAST_FETCH)
        assert server.requests_to("/robots.txt") == 0
        assert read_successes(out).num_rows == 3


def test_cache_rules_and_unreachable_fallbacks() -> None:
    assert cache_seconds({}) == MAX_AGE  # RFC 9309: at most a day
    assert cache_seconds({"Cache-Control": "public, max-age=600"}) == 600
    assert cache_seconds({"Cache-Control": "max-age=9999999"}) == MAX_AGE
    assert cache_seconds({"Cache-Control": "no-store"}) == 0
    assert cache_seconds({"Expires": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0
    assert cache_seconds({"Expires": "not a date"}) == 0

    # "Retry-After: 0" still means a pause before asking again.
    with Farm([ServerSpec("127.0.0.2", robots_txt="", robots_status=503,
                          retry_after=0)]) as farm:
        server = farm.servers[0]
        url = server.url("/robots.txt")
        now = time.time()
        earlier = RobotsFile(server.address, url, "rules", 200,
                             "User-agent: *\nDisallow: /old\n", now - 2 * MAX_AGE, now - MAX_AGE)

        async def ask(previous: RobotsFile | None) -> RobotsFile:
            client = HttpClient(NetworkSettings(allow_network=["127.0.0.0/8"]))
            try:
                return await fetch_robots(client, server.address, url, previous)
            finally:
                await client.close()

        # Unreachable, with an expired copy: the copy is used (RFC 9309 §2.4).
        kept = asyncio.run(ask(earlier))
        assert kept.state == "rules" and not kept.allows(server.url("/old/1.jpg"))
        assert kept.allows(server.url("/new/1.jpg")) and kept.expires_at > now
        # Unreachable with nothing to fall back on: complete disallow, asked again later.
        first = asyncio.run(ask(None))
        assert first.state == "unreachable" and first.attempts == 1
        assert not first.usable(time.time()) and first.retry_at >= first.fetched_at + 1
        # Unreachable for 30 days: as if there were none.
        first.unreachable_since = now - UNREACHABLE_GIVES_NONE_AFTER - 1
        assert asyncio.run(ask(first)).state == "none"
