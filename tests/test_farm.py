"""The loopback farm itself: the faults the benchmarks and tests count on behave as documented."""

from __future__ import annotations

import http.client
import threading
import time

from distributed_downloader.testing.farm import Farm, FarmServer, ServerSpec, make_small_image


def get(server: FarmServer, path: str) -> tuple[int, http.client.HTTPMessage]:
    """One GET on a fresh connection, redirects not followed."""
    connection = http.client.HTTPConnection(server.spec.host, server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        connection.close()


def statuses(server: FarmServer, path: str, count: int) -> list[int]:
    """COUNT requests as fast as one client can send them; a guard that they fit in 1 s."""
    started = time.monotonic()
    answers = [get(server, path)[0] for _ in range(count)]
    assert time.monotonic() - started < 0.9, "too slow to test a 1-second window"
    return answers


def test_a_failing_server_answers_its_status_to_everything_but_robots_txt() -> None:
    with Farm([ServerSpec("127.0.0.2", fail_status=500)]) as farm:
        server = farm["127.0.0.2"]
        server.images["0.jpg"] = make_small_image(0)
        for path in ("/img/0.jpg", "/flaky/0.jpg", "/redirect/0.jpg", "/anything"):
            status, headers = get(server, path)
            assert status == 500 and "Retry-After" not in headers, path
        assert get(server, "/robots.txt")[0] == 404  # no robots.txt: everything allowed
        assert [record.status for record in server.log] == [500, 500, 500, 500, 404]
        assert all(record.retry_after is None for record in server.log)


def test_flaky_urls_fail_as_often_as_their_query_says() -> None:
    specs = [ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3", flaky_retry_after=None)]
    with Farm(specs) as farm:
        default, bare = farm.servers
        for server in farm.servers:
            for name in ("a.jpg", "b.jpg", "c.jpg"):
                server.images[name] = make_small_image(len(name))
        # Default: two 503s with "Retry-After: 0", then the image.
        assert [get(default, "/flaky/a.jpg")[0] for _ in range(3)] == [503, 503, 200]
        assert [record.retry_after for record in default.log] == ["0", "0", None]
        # ?fails=K overrides the count per URL; without Retry-After when the spec says None.
        assert [get(bare, "/flaky/b.jpg?fails=1")[0] for _ in range(2)] == [503, 200]
        answers = [get(bare, "/flaky/c.jpg?fails=3") for _ in range(5)]
        assert [status for status, _ in answers] == [503, 503, 503, 200, 200]
        assert all("Retry-After" not in headers for _, headers in answers)
        assert bare.requests_to("/flaky/") == 7


def test_the_rate_limit_can_change_while_the_farm_runs() -> None:
    with Farm([ServerSpec("127.0.0.2", rate_limit=10)]) as farm:
        server = farm["127.0.0.2"]
        server.images["0.jpg"] = make_small_image(0)
        assert statuses(server, "/img/0.jpg", 15).count(200) == 10
        assert server.log[-1].status == 429 and server.log[-1].retry_after == "1"

        def set_limit(limit: float | None) -> None:  # as the benchmark does: another thread
            thread = threading.Thread(target=setattr, args=(server.spec, "rate_limit", limit))
            thread.start()
            thread.join()

        time.sleep(1.05)
        assert statuses(server, "/img/0.jpg", 6).count(200) == 6
        set_limit(5)  # halved mid-window: the 6 already accepted count against the new limit
        assert statuses(server, "/img/0.jpg", 3) == [429, 429, 429]
        time.sleep(1.05)
        assert statuses(server, "/img/0.jpg", 8).count(200) == 5
        set_limit(20)  # doubled back (and more)
        time.sleep(1.05)
        assert statuses(server, "/img/0.jpg", 25).count(200) == 20
        set_limit(None)
        assert statuses(server, "/img/0.jpg", 25).count(200) == 25
        set_limit(0.5)  # below 1/s: one request per 2 s, counted from when the limit was set
        assert statuses(server, "/img/0.jpg", 3) == [200, 429, 429]


def test_redirects_are_logged_and_count_against_the_limit() -> None:
    with Farm([ServerSpec("127.0.0.2", rate_limit=4)]) as farm:
        server = farm["127.0.0.2"]
        server.images["0.jpg"] = make_small_image(0)
        status, headers = get(server, "/redirect/0.jpg")
        assert status == 302 and headers["Location"] == "/img/0.jpg"
        assert statuses(server, "/img/0.jpg", 4) == [200, 200, 200, 429]
        assert [record.status for record in server.log] == [302, 200, 200, 200, 429]
