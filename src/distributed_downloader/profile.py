"""The profile stage: a safe starting rate for every server, in `OUT/profiles/servers.csv`.

Each server is probed politely (a handful of GETs of its own URLs, at most one a second, all
servers at once): latency, status codes, throttling (429/503 with `Retry-After`), an advertised
limit (`RateLimit-Policy`), keep-alive. A server's starting rate is the lower of
`default_rate_limit` and what the probe showed it tolerates; a server that never answers is
marked `down` and fetch writes its rows as retryable errors instead of requesting them.

Fetch writes what it learned to the same file, so a profile can come from probing, from a
previous download, or from a person. Hand-set rates and exclusions (`--rates`) live beside it in
`OUT/profiles/rates.csv` and win over both, re-profiling included.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from distributed_downloader.config import PolitenessSettings, Settings, save_settings
from distributed_downloader.errors import Failure, UserError
from distributed_downloader.fetch.client import Body, HttpClient
from distributed_downloader.fetch.politeness import PACING_MARGIN
from distributed_downloader.fetch.robots import (
    NETWORK_FAILURES,
    RobotsFile,
    fetch_robots,
    load_robots,
    robots_url,
    save_robots,
)
from distributed_downloader.policy import Signal, advertised_rate, signal_of
from distributed_downloader.profiles import (
    ProfileStatus,
    ServerProfile,
    apply_overrides,
    load_rate_overrides,
    read_profiles,
    write_profiles,
)
from distributed_downloader.storage import RunLayout, atomic_write_json, sample_urls

# A server that throttles one request a second is given this share of that rate.
THROTTLED_PROBE_SHARE = 0.5


# --- probing ----------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    server_name: str
    statuses: Counter
    latencies: list[float]
    throttled: int = 0
    failures: int = 0
    retry_after: float | None = None
    advertised: float | None = None
    closes_connection: int = 0
    requests: int = 0
    robots: RobotsFile | None = None


class ProbePace:
    """One request at a time, `interval` seconds apart at least (redirect hops included)."""

    def __init__(self, result: ProbeResult, interval: float) -> None:
        self.result, self.interval = result, interval
        self.last_request = -interval

    async def __call__(self) -> None:
        wait = self.last_request + self.interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.last_request = time.monotonic()
        self.result.requests += 1


async def probe_server(client: Any, server_name: str, urls: list[str],
                       robots: RobotsFile | None = None, robots_url: str | None = None,
                       count: int | None = None, learned_rate: float | None = None,
                       interval: float = PolitenessSettings().profile_interval) -> ProbeResult:
    """GET each URL in turn, one request a second at most (redirect hops included), and no
    faster than a rate an earlier run learned (`learned_rate`).

    With `robots_url`, the server's robots.txt is asked for first (the first paced request);
    with it or a cached `robots`, only URLs it allows are probed, no faster than its
    Crawl-delay, and a server whose robots.txt is unreachable is not probed at all.
    """
    result = ProbeResult(server_name, Counter(), [], robots=robots)
    pace = ProbePace(result, interval if not learned_rate else
                     max(interval, PACING_MARGIN / learned_rate))
    if robots_url is not None:
        await pace()
        result.robots = await fetch_robots(client, server_name, robots_url, robots, pace)
    if result.robots is not None:
        if result.robots.state == "unreachable":
            return result
        urls = [url for url in urls if result.robots.allows(url)]
        cap = result.robots.rate_cap()
        if cap:
            pace.interval = max(pace.interval, PACING_MARGIN / cap)
    permitted = result.robots.permits_redirect(server_name) \
        if result.robots is not None else None
    for url in urls[:count]:
        await pace()
        started = time.monotonic()
        outcome = await client.get(url, pace=pace, permitted=permitted)
        if not _note_answer(result, client, outcome, time.monotonic() - started):
            break
    return result


def _note_answer(result: ProbeResult, client: Any, outcome: Body | Failure,
                 seconds: float) -> bool:
    """What one probe answer says of the server; False when probing it further is pointless
    (told to slow down, or failing without a single answer)."""
    if isinstance(outcome, Body):
        result.statuses[str(outcome.status)] += 1
        client.budget.release(outcome.reserved)
        signal = signal_of(None, None)
    else:
        result.statuses[str(outcome.http_status or outcome.code)] += 1
        signal = signal_of(outcome.code, outcome.retry_after)
    if signal is Signal.THROTTLED:
        result.throttled += 1
        if outcome.retry_after is not None:
            result.retry_after = outcome.retry_after
        return False  # told to slow down: that is all the probe needs to know
    if signal is Signal.FAILED:
        result.failures += 1
    elif signal is Signal.ANSWERED:
        result.latencies.append(seconds)
    headers = outcome.headers
    result.advertised = advertised_rate(headers) or result.advertised
    if headers and headers.get("Connection", "").lower() == "close":
        result.closes_connection += 1
    return not (result.failures >= 2 and not result.latencies)  # down: no need to insist


def profile_from_probe(result: ProbeResult, settings: Settings) -> ServerProfile:
    """The probe's profile, within what the server's robots.txt allows."""
    robots = result.robots
    if robots is not None and robots.state == "unreachable":
        # RFC 9309: an unreachable robots.txt disallows everything, for now: not probed.
        # A server that cannot be reached at all is down; one that answers, but not with its
        # robots.txt (5xx, 429), is left to fetch, which asks again and pauses it meanwhile.
        status = ProfileStatus.DOWN if robots.failure in NETWORK_FAILURES else ProfileStatus.OK
        return ServerProfile(result.server_name, settings.politeness.default_rate_limit,
                             settings.politeness.max_connections_per_server, None, status,
                             f"{robots.message}: not probed")
    profile = _profile_from_answers(result, settings)
    cap = robots.rate_cap() if robots is not None else None
    if cap is not None and profile.status != ProfileStatus.DOWN:
        profile.rate_limit = min(profile.rate_limit, cap)
        profile.max_rate_limit = min(profile.max_rate_limit or cap, cap)
        if profile.status == ProfileStatus.OK:
            profile.status = ProfileStatus.PROBED
        profile.notes += f"; robots.txt: at most {cap:g} requests/s"
    return profile


def _profile_from_answers(result: ProbeResult, settings: Settings) -> ServerProfile:
    default = settings.politeness.default_rate_limit
    connections = settings.politeness.max_connections_per_server
    latency = statistics.median(result.latencies) * 1000 if result.latencies else None
    seen = ", ".join(f"{code}×{count}" for code, count in sorted(result.statuses.items()))
    notes = [f"probe: {seen}"] if seen else ["probe: no URL"]
    if result.closes_connection:
        notes.append("no keep-alive")
        connections = max(1, connections // 2)
    if not result.latencies and not result.throttled and result.failures:
        return ServerProfile(result.server_name, default, connections, None,
                             ProfileStatus.DOWN, "; ".join(notes))
    if result.throttled:
        throttled = 1.0 / settings.politeness.profile_interval  # the probes' pace drew it
        rate = throttled * THROTTLED_PROBE_SHARE
        if result.retry_after:
            rate = min(rate, 1.0 / result.retry_after)
            notes.append(f"Retry-After {result.retry_after:g} s")
        return ServerProfile(result.server_name, min(default, rate), 1, latency,
                             ProfileStatus.THROTTLED, "; ".join(notes),
                             rate_throttled=throttled, throttled_at=time.time())
    if result.advertised is not None:
        # Start at the lower of the default and the advertised limit; grow up to the latter.
        notes.append(f"advertises {result.advertised:g} requests/s")
        return ServerProfile(result.server_name, min(default, result.advertised),
                             connections, latency, ProfileStatus.PROBED, "; ".join(notes),
                             result.advertised)
    return ServerProfile(result.server_name, default, connections, latency, ProfileStatus.OK,
                         "; ".join(notes))


async def _probe_all(layout: RunLayout, settings: Settings,
                     servers: list[str]) -> list[ProbeResult]:

    client = HttpClient(settings.network)
    politeness = settings.politeness
    gate = asyncio.Semaphore(politeness.profile_servers_at_once)
    earlier = read_profiles(layout.server_profiles)  # probes never go faster than it learned

    async def one(name: str) -> ProbeResult:
        learned = earlier[name].rate_limit if name in earlier else None
        async with gate:
            # More URLs than needed, in case robots.txt disallows some.
            urls = sample_urls(layout, name, politeness.profile_requests * 4)
            if not politeness.respect_robots or not urls:
                return await probe_server(client, name, urls[:politeness.profile_requests],
                                          learned_rate=learned,
                                          interval=politeness.profile_interval)
            cached = load_robots(layout, name)
            fresh = cached is not None and cached.usable(time.time())
            result = await probe_server(client, name, urls, cached,
                                        None if fresh else robots_url(urls[0]),
                                        politeness.profile_requests, learned,
                                        politeness.profile_interval)
            if result.robots is not None and not fresh:
                save_robots(layout, result.robots)
            return result

    try:
        return list(await asyncio.gather(*(one(name) for name in servers)))
    finally:
        await client.close()


def run_profile(settings: Settings) -> dict[str, Any]:
    """Probe every prepared server; write `OUT/profiles/servers.csv` and a summary."""
    layout = RunLayout(settings.paths.run_folder("profile"))
    if not layout.prep_summary.exists():
        raise UserError(f"{layout.root} has no finished prep; run `distributed-downloader prep` "
                        "(or `download`) first")
    layout.check_writable()
    started = time.monotonic()
    overrides = load_rate_overrides(layout, settings.politeness)
    save_settings(settings)
    servers = [name for name in
               pq.read_table(layout.servers, columns=["server_name"]).column(0).to_pylist()
               if not (name in overrides and overrides[name].exclude)]
    results = asyncio.run(_probe_all(layout, settings, servers))
    probed = [profile_from_probe(result, settings) for result in results]
    profiles = read_profiles(layout.server_profiles)
    profiles.update({profile.server_name: profile for profile in probed})
    apply_overrides(profiles, overrides, settings.politeness)
    write_profiles(layout.server_profiles, list(profiles.values()))
    by_status = Counter(profile.status for profile in probed)
    summary = {
        "servers": len(servers),
        "excluded": sum(1 for o in overrides.values() if o.exclude),
        "overridden": sum(1 for o in overrides.values()
                          if not o.exclude and (o.rate_limit or o.max_connections)),
        "by_status": dict(by_status),
        "requests": sum(result.requests for result in results),
        "seconds": round(time.monotonic() - started, 3),
    }
    atomic_write_json(layout.profile_summary, summary)
    return summary
