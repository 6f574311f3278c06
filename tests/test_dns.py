"""DNS: a host is looked up once per TTL, not once per URL, and DNS failures are retryable rows.

Every lookup here goes to a DNS server on 127.0.0.1 (tests/dns_server.py), never to the system's.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    FAST_FETCH,
    FAST_REQUESTS,
    read_errors,
    read_successes,
    run_cli,
    write_lines,
)
from distributed_downloader.config import NetworkSettings
from distributed_downloader.errors import ErrorCode, Failure, RETRYABLE
from distributed_downloader.testing.farm import Farm, FarmServer, ServerSpec, make_small_image
from distributed_downloader.fetch.client import HttpClient
from distributed_downloader.fetch.dns import CachingResolver
from dns_server import DnsServer

NAME = "images.test"


def run(story: Coroutine[Any, Any, None]) -> None:
    asyncio.run(story)


async def hosts(resolver: CachingResolver, name: str = NAME) -> list[str]:
    return [r["host"] for r in await resolver.resolve(name, 80, socket.AF_INET)]


# --- the resolver against a loopback DNS server -----------------------------------------------

def test_concurrent_lookups_share_one_query_and_the_answer_lives_for_its_ttl() -> None:
    async def story(dns: DnsServer) -> None:
        resolver = CachingResolver([dns.address], min_ttl=0)
        try:
            answers = await asyncio.gather(*(hosts(resolver) for _ in range(50)))
            assert answers == [["127.0.0.1"]] * 50
            assert dns.a_queries(NAME) == 1
            assert await hosts(resolver) == ["127.0.0.1"]  # within the TTL: from the cache
            assert dns.a_queries(NAME) == 1 and resolver.lookups == 1
            await asyncio.sleep(1.3)  # the record's TTL is 1 s
            assert await hosts(resolver) == ["127.0.0.1"]
            assert dns.a_queries(NAME) == 2 and resolver.lookups == 2
        finally:
            await resolver.close()

    with DnsServer({NAME: ["127.0.0.1"]}, ttl=1) as dns:
        run(story(dns))


def test_a_zero_ttl_is_kept_for_the_minimum() -> None:
    async def story(dns: DnsServer) -> None:
        resolver = CachingResolver([dns.address])  # min_ttl 10 s
        try:
            for _ in range(5):
                assert await hosts(resolver) == ["127.0.0.1"]
                await asyncio.sleep(0.1)
            assert dns.a_queries(NAME) == 1 and resolver.lookups == 1
        finally:
            await resolver.close()

    with DnsServer({NAME: ["127.0.0.1"]}, ttl=0) as dns:
        run(story(dns))


def test_a_failed_refresh_serves_the_last_answer_until_it_is_too_old() -> None:
    async def story(dns: DnsServer) -> None:
        lenient = CachingResolver([dns.address], min_ttl=0, negative_ttl=60)
        strict = CachingResolver([dns.address], min_ttl=0, stale_for=0.5)
        try:
            assert await hosts(lenient) == ["127.0.0.1"]
            assert await hosts(strict) == ["127.0.0.1"]
            await asyncio.sleep(1.3)
            dns.fail[NAME] = "SERVFAIL"
            before = dns.a_queries(NAME)
            assert await hosts(lenient) == ["127.0.0.1"]  # stale, and said so by no error
            asked = dns.a_queries(NAME)
            assert asked > before  # it did try to refresh
            assert await hosts(lenient) == ["127.0.0.1"]
            assert dns.a_queries(NAME) == asked  # and does not try again for every request
            with pytest.raises(OSError, match="images.test"):
                await hosts(strict)  # its answer is older than stale_for
        finally:
            await lenient.close()
            await strict.close()

    with DnsServer({NAME: ["127.0.0.1"]}, ttl=1) as dns:
        run(story(dns))


def test_an_unknown_name_fails_and_the_failure_is_remembered_briefly() -> None:
    async def story(dns: DnsServer) -> None:
        resolver = CachingResolver([dns.address], negative_ttl=0.5)
        try:
            for _ in range(3):
                with pytest.raises(OSError, match="nowhere.test"):
                    await hosts(resolver, "nowhere.test")
            assert dns.a_queries("nowhere.test") == 1
            await asyncio.sleep(0.7)
            with pytest.raises(OSError):
                await hosts(resolver, "nowhere.test")
            assert dns.a_queries("nowhere.test") == 2
        finally:
            await resolver.close()

    with DnsServer({NAME: ["127.0.0.1"]}) as dns:
        run(story(dns))


def test_a_dropped_query_is_asked_again() -> None:
    async def story(dns: DnsServer) -> None:
        resolver = CachingResolver([dns.address], timeout=0.3)
        try:
            assert await hosts(resolver) == ["127.0.0.1"]
            assert dns.a_queries(NAME) == 2
        finally:
            await resolver.close()

    with DnsServer({NAME: ["127.0.0.1"]}) as dns:
        dns.drop = 1
        run(story(dns))


def test_ip_literals_and_hosts_file_names_send_no_query() -> None:
    async def story(dns: DnsServer) -> None:
        resolver = CachingResolver([dns.address])
        try:
            assert await hosts(resolver, "127.0.0.9") == ["127.0.0.9"]
            assert "127.0.0.1" in await hosts(resolver, "localhost")  # from /etc/hosts
            assert not dns.log
        finally:
            await resolver.close()

    with DnsServer() as dns:
        run(story(dns))


def test_the_client_reports_dns_failures_as_dns_error_and_still_blocks_addresses() -> None:
    async def story(dns: DnsServer) -> None:
        client = HttpClient(NetworkSettings(dns_servers=[dns.address],
                                            allow_network=["127.0.0.0/25"]))
        try:
            unknown = await client.get("http://nowhere.test:9/a.jpg")
            assert isinstance(unknown, Failure) and unknown.code is ErrorCode.DNS_ERROR
            failing = await client.get(f"http://{NAME}:9/a.jpg")
            assert isinstance(failing, Failure) and failing.code is ErrorCode.DNS_ERROR
            private = await client.get("http://canary.test:9/a.jpg")  # 127.0.0.250
            assert isinstance(private, Failure)
            assert private.code is ErrorCode.BLOCKED_ADDRESS
        finally:
            await client.close()

    with DnsServer({NAME: ["127.0.0.1"], "canary.test": ["127.0.0.250"]}) as dns:
        dns.fail[NAME] = "SERVFAIL"
        run(story(dns))
    assert ErrorCode.DNS_ERROR in RETRYABLE


def test_a_redirect_to_a_numeric_host_form_is_checked_as_the_address_it_is() -> None:
    """0x7f0000fa, 2130706682 and 0177.0.0.250 are 127.0.0.250 to a browser, as in prep: a
    redirect there is refused as that address, with no DNS query and no request."""
    async def story(farm: Farm, dns: DnsServer) -> None:
        a, canary = farm["127.0.0.2"], farm["127.0.0.250"]
        client = HttpClient(NetworkSettings(dns_servers=[dns.address],
                                            allow_network=["127.0.0.0/25"]))
        try:
            for host in ("0x7f0000fa", "2130706682", "0177.0.0.250", "0x7f.0.0.0xfa"):
                target = f"http://{host}:{canary.port}/img/c.jpg"
                outcome = await client.get(a.url(f"/redirect-to?url={target}"))
                assert isinstance(outcome, Failure), host
                assert outcome.code is ErrorCode.BLOCKED_ADDRESS, (host, outcome)
                assert "127.0.0.250" in outcome.message
            # One that is allowed is fetched from the address it names.
            allowed = await client.get(a.url(f"/redirect-to?url=http://0x7f000002:{a.port}"
                                              "/img/a.jpg"))
            assert not isinstance(allowed, Failure), allowed
            assert allowed.final_url == a.url("/img/a.jpg")
            # A host no browser would read: refused as an invalid redirect, no query either.
            bad = await client.get(a.url(f"/redirect-to?url=http://1.2.3.256:{a.port}/x"))
            assert isinstance(bad, Failure) and bad.code is ErrorCode.INVALID_REDIRECT
        finally:
            await client.close()

    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.250")]) as farm, DnsServer() as dns:
        farm["127.0.0.2"].images["a.jpg"] = make_small_image(1)
        farm["127.0.0.250"].images["c.jpg"] = make_small_image(2)
        run(story(farm, dns))
        assert farm["127.0.0.250"].log == []  # the canary saw no request
        assert dns.log == []  # and nothing was looked up


def test_dns_servers_setting_is_checked() -> None:
    assert NetworkSettings(dns_servers="127.0.0.1:5353, ::1").dns_servers == \
        ["127.0.0.1:5353", "::1"]
    assert NetworkSettings(dns_servers=["[::1]:53"]).dns_servers == ["[::1]:53"]
    for bad in ("dns.example", "127.0.0.1:0", "127.0.0.1:x", "127.0.0.1:65536", "[::1]"):
        with pytest.raises(ValueError):
            NetworkSettings(dns_servers=[bad])


# --- end to end: the CLI on a loopback farm reached by name -----------------------------------

WORKERS = 2
# Processes with their own resolver: the profile stage, the robots.txt fetcher and each worker;
# each looks the name up once, as an A and an AAAA query.
MOST_QUERIES = 2 * (WORKERS + 2)


def named_urls(server: FarmServer, count: int) -> list[str]:
    urls = []
    for i in range(count):
        server.images[f"{i}.jpg"] = make_small_image(i)
        urls.append(f"http://{NAME}:{server.port}/img/{i}.jpg")
    return urls


def test_a_named_host_is_looked_up_a_few_times_for_a_hundred_urls(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm, DnsServer({NAME: ["127.0.0.2"]}) as dns:
        urls = named_urls(farm["127.0.0.2"], 100)
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 25, "--default-rate-limit", 50, "--workers", WORKERS,
                "--dns-servers", dns.address, *FAST_FETCH, timeout=300)
        assert sorted(read_successes(out).column("identifier").to_pylist()) == sorted(urls)
        assert read_errors(out).num_rows == 0
        assert 1 <= dns.queries[NAME] <= MOST_QUERIES
        assert set(dns.queries) == {NAME}


def test_dns_failures_are_retryable_error_rows(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm, DnsServer({NAME: ["127.0.0.2"]}) as dns:
        server = farm["127.0.0.2"]
        urls = named_urls(server, 20)
        out = tmp_path / "out"
        run_cli("prep", write_lines(tmp_path / "u.txt", urls), "--output", out)
        run_cli("profile", out, "--dns-servers", dns.address, *FAST_REQUESTS)
        # The name stops resolving between the profile (robots.txt known) and the fetch.
        dns.fail[NAME] = "SERVFAIL"
        requests_before = len(server.log)
        # One attempt per URL; the circuit breaker gives the server up after 5 s of failures.
        run_cli("fetch", out, "--max-retries", 1, "--server-down-after", 5, "--dns-servers",
                dns.address, *FAST_FETCH, timeout=300)
        errors = read_errors(out).to_pylist()
        assert read_successes(out).num_rows == 0
        assert sorted(r["identifier"] for r in errors) == sorted(urls)
        codes = Counter(r["error_code"] for r in errors)
        assert codes["dns_error"] >= 5  # the failures that opened the breaker
        assert set(codes) <= {"dns_error", "server_unavailable"}
        assert all(ErrorCode(code) in RETRYABLE for code in codes)
        assert len(server.log) == requests_before

        del dns.fail[NAME]  # the name resolves again
        run_cli("fetch", out, "--retry-errors", "--dns-servers", dns.address, *FAST_FETCH,
                timeout=300)
        assert sorted(read_successes(out).column("identifier").to_pylist()) == sorted(urls)
        assert read_errors(out).num_rows == 0
