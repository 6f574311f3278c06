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
import csv
import io
import itertools
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Settings, save_settings
from distributed_downloader.errors import InputError, UserError
from distributed_downloader.policy import LearnedRate, Signal, advertised_rate, signal_of
from distributed_downloader.storage import RunLayout, atomic_write_json, atomic_write_text, \
    batch_folder

if TYPE_CHECKING:  # fetch imports this module: its parts are imported where they are used
    from distributed_downloader.fetch.robots import RobotsFile

PROFILE_COLUMNS = ("server_name", "rate_limit", "max_connections", "latency_ms", "status", "notes",
                   "max_rate_limit", "rate_held", "rate_throttled", "throttled_at",
                   "throttle_wait", "paused_until", "failing_since", "last_request")
# Seconds between two probe requests to one server: never more than one a second, with a
# margin so that network jitter cannot bring two arrivals within the same second.
PROBE_INTERVAL = 1.05
PROBE_SERVERS_AT_ONCE = 256
# A server that throttles one request a second is given this share of that rate.
THROTTLED_PROBE_SHARE = 0.5
TRUE_WORDS = frozenset({"1", "true", "yes", "y", "x", "exclude", "excluded"})


class ProfileStatus(StrEnum):
    """What servers.csv says of a server (the `status` column)."""

    OK = "ok"  # answers; its rate may grow up to max_rate_limit
    PROBED = "probed"  # advertises a limit (RateLimit-Policy) or robots.txt caps it: a ceiling
    THROTTLED = "throttled"  # drew a 429 at `rate_throttled`; tried again after a quiet while
    DOWN = "down"  # did not answer the profile: fetch skips it (but --retry-errors)
    GAVE_UP = "gave_up"  # a fetch gave up on it; the next run tries again
    MANUAL = "manual"  # set by the rates file: `rate_limit` is a ceiling
    OPTED_OUT = "opted_out"  # every answer opted out (X-Robots-Tag): never asked again


@dataclass
class ServerProfile:
    server_name: str
    rate_limit: float  # where the next run starts
    max_connections: int
    latency_ms: float | None = None
    status: ProfileStatus = ProfileStatus.OK
    notes: str = ""
    # A hard ceiling: an advertised limit, robots.txt's Crawl-delay, a hand-set rate; None: the
    # run's max_rate_limit.
    max_rate_limit: float | None = None
    # What the server tolerated (policy.LearnedRate): the highest rate that held, the latest
    # rate that drew a 429 and when (unix time): evidence with an age, not a cap.
    rate_held: float | None = None
    rate_throttled: float | None = None
    throttled_at: float | None = None
    throttle_wait: float | None = None  # quiet seconds before rate_throttled is tried again
    paused_until: float | None = None  # a Retry-After pause still running (unix time)
    failing_since: float | None = None  # failing every request since then (unix time)
    last_request: float | None = None  # about when it was last asked (unix time)

    @property
    def learned(self) -> LearnedRate:
        return LearnedRate(self.rate_held, self.rate_throttled, self.throttled_at,
                           self.throttle_wait)


_OPTIONAL_FLOATS = ("latency_ms", "max_rate_limit", "rate_held", "rate_throttled",
                    "throttled_at", "throttle_wait", "paused_until", "failing_since",
                    "last_request")


@dataclass
class RateOverride:
    """One line of the user's rates file: what to force for one server."""

    server_name: str
    rate_limit: float | None = None
    max_connections: int | None = None
    exclude: bool = False


def read_profiles(path: Path) -> dict[str, ServerProfile]:
    if not path.exists():
        return {}
    profiles = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                profile = ServerProfile(
                    server_name=row["server_name"],
                    rate_limit=float(row["rate_limit"]),
                    max_connections=int(float(row.get("max_connections") or 0)) or 1,
                    status=ProfileStatus(row.get("status") or "ok"),
                    notes=row.get("notes") or "",
                    **{name: float(row[name]) if row.get(name) else None
                       for name in _OPTIONAL_FLOATS},
                )
            except (KeyError, ValueError):
                continue  # a damaged line: that server starts from the defaults
            rates = (profile.rate_limit, profile.max_rate_limit, profile.rate_held,
                     profile.rate_throttled)
            if not all(rate is None or rate > 0 for rate in rates):
                continue  # 0, negative or NaN (a hand edit): the defaults again
            if profile.status == ProfileStatus.THROTTLED and profile.rate_throttled is None \
                    and profile.max_rate_limit is not None:
                # Written before rates carried their evidence: its ceiling was 90% of the rate
                # that drew the 429, and when is unknown (so it is tried again soon).
                profile.rate_throttled = profile.max_rate_limit / 0.9
                profile.throttled_at, profile.max_rate_limit = 0.0, None
            profiles[profile.server_name] = profile
    return profiles


def write_profiles(path: Path, profiles: list[ServerProfile]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PROFILE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for profile in sorted(profiles, key=lambda p: p.server_name):
        row = asdict(profile)
        row["status"] = str(profile.status)
        row["rate_limit"] = f"{profile.rate_limit:.4g}"
        for name in _OPTIONAL_FLOATS:
            value = getattr(profile, name)
            whole = name not in ("max_rate_limit", "rate_held", "rate_throttled")  # ms, s, times
            row[name] = "" if value is None else f"{value:.0f}" if whole else f"{value:.4g}"
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


# --- hand-set rates ---------------------------------------------------------------------------


def parse_rate_overrides(text: str, where: str) -> dict[str, RateOverride]:
    """Read a rates CSV: ours (server_name, rate_limit, max_connections, exclude) or the
    original's servers_profiles.csv (server_name, total_batches, ..., rate_limit)."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in reader.fieldnames or []]
    if "server_name" not in columns:
        raise InputError(f"{where}: a rates file needs a server_name column (found: "
                         f"{', '.join(columns) or 'nothing'})")
    overrides: dict[str, RateOverride] = {}
    for line, raw in enumerate(reader, start=2):
        row = {(key or "").strip(): (value or "").strip() for key, value in raw.items()
               if isinstance(value, str)}
        name = row.get("server_name", "").lower()
        if not name:
            continue
        try:
            rate = float(row["rate_limit"]) if row.get("rate_limit") else None
            connections = int(row["max_connections"]) if row.get("max_connections") else None
        except ValueError:
            raise InputError(f"{where}:{line}: rate_limit and max_connections must be numbers "
                             f"(server {name})") from None
        if (rate is not None and rate <= 0) or (connections is not None and connections <= 0):
            raise InputError(f"{where}:{line}: rate_limit and max_connections must be positive "
                             f"(server {name}); use exclude to skip a server")
        exclude = row.get("exclude", "").lower() in TRUE_WORDS
        overrides[name] = RateOverride(name, rate, connections, exclude)
    return overrides


def load_rate_overrides(layout: RunLayout, settings: Settings,
                        keep: bool = True) -> dict[str, RateOverride]:
    """The run's hand-set rates: the `rates` file when given (with `keep`, copied into the run
    for the next commands), else the copy a previous command kept."""
    if settings.rates is not None:
        try:
            text = settings.rates.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            if not layout.rate_overrides.exists():
                raise InputError(f"{settings.rates}: rates file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{settings.rates}: cannot read rates file ({exc})") from None
        else:
            overrides = parse_rate_overrides(text, str(settings.rates))
            if keep:
                atomic_write_text(layout.rate_overrides, text)
            return overrides
    if layout.rate_overrides.exists():
        return parse_rate_overrides(layout.rate_overrides.read_text(encoding="utf-8-sig"),
                                    str(layout.rate_overrides))
    return {}


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


def sample_urls(layout: RunLayout, server_name: str, count: int,
                to_fetch_only: bool = True) -> list[str]:
    """The server's first `count` URLs (to fetch: rows an earlier download holds are not)."""
    urls: list[str] = []
    for partition in itertools.count():
        folder = batch_folder(layout.batches, server_name, partition)
        if not folder.is_dir():
            break
        for path in sorted(folder.glob("*.parquet")):
            wanted = [name for name in ("identifier", "reuse_from", "reuse_error_code")
                      if name in pq.read_schema(path).names]
            table = pq.read_table(path, columns=wanted)
            if to_fetch_only and "reuse_from" in table.column_names:
                table = table.filter(pc.and_(pc.is_null(table["reuse_from"]),
                                             pc.is_null(table["reuse_error_code"])))
            urls += table.column("identifier").to_pylist()[:count - len(urls)]
            if len(urls) >= count:
                return urls
    return urls


async def probe_server(client: Any, server_name: str, urls: list[str],
                       robots: RobotsFile | None = None, robots_url: str | None = None,
                       count: int | None = None,
                       learned_rate: float | None = None) -> ProbeResult:
    """GET each URL in turn, one request a second at most (redirect hops included), and no
    faster than a rate an earlier run learned (`learned_rate`).

    With `robots_url`, the server's robots.txt is asked for first (the first paced request);
    with it or a cached `robots`, only URLs it allows are probed, no faster than its
    Crawl-delay, and a server whose robots.txt is unreachable is not probed at all.
    """
    from distributed_downloader.fetch.client import Body
    from distributed_downloader.fetch.politeness import PACING_MARGIN
    from distributed_downloader.fetch.robots import fetch_robots

    result = ProbeResult(server_name, Counter(), [], robots=robots)
    interval = [PROBE_INTERVAL if not learned_rate else
                max(PROBE_INTERVAL, PACING_MARGIN / learned_rate)]
    last_request = [-interval[0]]

    async def pace() -> None:
        wait = last_request[0] + interval[0] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        last_request[0] = time.monotonic()
        result.requests += 1

    if robots_url is not None:
        await pace()
        result.robots = await fetch_robots(client, server_name, robots_url, robots, pace)
    if result.robots is not None:
        if result.robots.state == "unreachable":
            return result
        urls = [url for url in urls if result.robots.allows(url)]
        cap = result.robots.rate_cap()
        if cap:
            interval[0] = max(interval[0], PACING_MARGIN / cap)
    urls = urls[:count]
    permitted = result.robots.permits_redirect(server_name) \
        if result.robots is not None else None
    for url in urls:
        await pace()
        started = time.monotonic()
        outcome = await client.get(url, pace=pace, permitted=permitted)
        seconds = time.monotonic() - started
        if isinstance(outcome, Body):
            result.statuses[str(outcome.status)] += 1
            client.budget.release(outcome.reserved)
        else:
            result.statuses[str(outcome.http_status or outcome.code)] += 1
        signal = signal_of(None, None) if isinstance(outcome, Body) else \
            signal_of(outcome.code, outcome.retry_after)
        if signal is Signal.THROTTLED:
            result.throttled += 1
            if outcome.retry_after is not None:  # type: ignore[union-attr]
                result.retry_after = outcome.retry_after
            break  # told to slow down: that is all the probe needs to know
        elif signal is Signal.FAILED:
            result.failures += 1
        elif signal is Signal.ANSWERED:
            result.latencies.append(seconds)
        headers = outcome.headers
        result.advertised = advertised_rate(headers) or result.advertised
        if headers and headers.get("Connection", "").lower() == "close":
            result.closes_connection += 1
        if result.failures >= 2 and not result.latencies:
            break  # two failures and no answer: down, no need to insist
    return result


def profile_from_probe(result: ProbeResult, settings: Settings) -> ServerProfile:
    """The probe's profile, within what the server's robots.txt allows."""
    robots = result.robots
    if robots is not None and robots.state == "unreachable":
        # RFC 9309: an unreachable robots.txt disallows everything, for now: not probed.
        # A server that cannot be reached at all is down; one that answers, but not with its
        # robots.txt (5xx, 429), is left to fetch, which asks again and pauses it meanwhile.
        from distributed_downloader.fetch.robots import NETWORK_FAILURES

        status = ProfileStatus.DOWN if robots.failure in NETWORK_FAILURES else ProfileStatus.OK
        return ServerProfile(result.server_name, settings.default_rate_limit,
                             settings.max_connections_per_server, None, status,
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
    default = settings.default_rate_limit
    connections = settings.max_connections_per_server
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
        throttled = 1.0 / PROBE_INTERVAL  # the probes' pace drew it
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
    from distributed_downloader.fetch.client import HttpClient
    from distributed_downloader.fetch.robots import load_robots, robots_url, save_robots

    client = HttpClient(settings)
    gate = asyncio.Semaphore(PROBE_SERVERS_AT_ONCE)
    earlier = read_profiles(layout.server_profiles)  # probes never go faster than it learned

    async def one(name: str) -> ProbeResult:
        learned = earlier[name].rate_limit if name in earlier else None
        async with gate:
            # More URLs than needed, in case robots.txt disallows some.
            urls = sample_urls(layout, name, settings.profile_requests * 4)
            if not settings.respect_robots or not urls:
                return await probe_server(client, name, urls[:settings.profile_requests],
                                          learned_rate=learned)
            cached = load_robots(layout, name)
            fresh = cached is not None and cached.usable(time.time())
            result = await probe_server(client, name, urls, cached,
                                        None if fresh else robots_url(urls[0]),
                                        settings.profile_requests, learned)
            if result.robots is not None and not fresh:
                save_robots(layout, result.robots)
            return result

    try:
        return list(await asyncio.gather(*(one(name) for name in servers)))
    finally:
        await client.close()


def apply_overrides(profiles: dict[str, ServerProfile],
                    overrides: dict[str, RateOverride], settings: Settings) -> None:
    """Hand-set rates win: the profile of an overridden server says so."""
    for name, override in overrides.items():
        if override.exclude or (override.rate_limit is None and override.max_connections is None):
            continue
        current = profiles.get(name)
        rate = override.rate_limit or (current.rate_limit if current else
                                       settings.default_rate_limit)
        connections = override.max_connections or (
            current.max_connections if current else settings.max_connections_per_server)
        profiles[name] = ServerProfile(name, rate, connections,
                                       current.latency_ms if current else None,
                                       ProfileStatus.MANUAL,
                                       "set by the rates file", rate)


def run_profile(settings: Settings) -> dict[str, Any]:
    """Probe every prepared server; write `OUT/profiles/servers.csv` and a summary."""
    if settings.output is None:
        raise UserError("profile needs the run's folder OUT")
    layout = RunLayout(settings.output)
    if not layout.prep_summary.exists():
        raise UserError(f"{layout.root} has no finished prep; run `distributed-downloader prep` "
                        "(or `download`) first")
    layout.check_writable()
    started = time.monotonic()
    overrides = load_rate_overrides(layout, settings)
    save_settings(settings)
    servers = [name for name in
               pq.read_table(layout.servers, columns=["server_name"]).column(0).to_pylist()
               if not (name in overrides and overrides[name].exclude)]
    results = asyncio.run(_probe_all(layout, settings, servers))
    probed = [profile_from_probe(result, settings) for result in results]
    profiles = read_profiles(layout.server_profiles)
    profiles.update({profile.server_name: profile for profile in probed})
    apply_overrides(profiles, overrides, settings)
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
