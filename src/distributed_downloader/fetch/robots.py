"""robots.txt (RFC 9309): what each server allows this tool to fetch, and how fast.

A server's robots.txt is fetched once per run (by `profile`, or by fetch's coordinator before
the server's first batch), kept in `OUT/profiles/robots/` for as long as its cache rules and the
RFC's 24 hours allow, and matched with Protego for the tool's product token, falling back to `*`.
What the answer means (RFC 9309 §2.3.1):

- 2xx: the rules hold; a `Crawl-delay` (or `Request-rate`) caps the server's rate.
- 4xx (429 aside): no robots.txt, no restriction.
- 5xx, 429, no answer: "unreachable", a complete disallow: the server is paused and asked again
  later (a previous copy of the rules, if any, is used meanwhile); if it stays unreachable, its
  rows become retryable errors for a later run. After 30 days unreachable, it counts as none.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from protego import Protego

from distributed_downloader.config import Settings
from distributed_downloader.errors import ErrorCode, Failure, OutOfSpace
from distributed_downloader.fetch.opt_out import PRODUCT_TOKEN
from distributed_downloader.prep.urls import normalise_one
from distributed_downloader.protocol import DiskFull
from distributed_downloader.storage import RunLayout, atomic_write_json

log = logging.getLogger(__name__)

MAX_AGE = 24 * 3600.0  # RFC 9309 §2.4: a cached robots.txt is used for 24 hours at most
UNREACHABLE_GIVES_NONE_AFTER = 30 * 24 * 3600.0  # §2.3.1.4: "for example, 30 days"
PARSED_BYTES = 500 * 1024  # §2.5: parse at least the first 500 KiB
# Before asking an unreachable robots.txt again (without Retry-After): seconds first, as a
# passing fault is the common case, then minutes. The server is held meanwhile, and says so.
RETRY_PAUSES = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MIN_PAUSE = 1.0  # even after "Retry-After: 0"
FETCHES_AT_ONCE = 128  # robots.txt files asked at once, each from another server: bounds sockets
NETWORK_FAILURES = frozenset({ErrorCode.TIMEOUT, ErrorCode.CONNECTION_ERROR,
                              ErrorCode.DNS_ERROR})
UNREACHABLE_CODES = NETWORK_FAILURES | {ErrorCode.HTTP_429}

State = Literal["rules", "none", "unreachable"]


@dataclass
class RobotsFile:
    """One server's robots.txt as last asked for."""

    server_name: str
    url: str
    state: State  # rules: 2xx | none: unavailable, no restriction | unreachable: disallow all
    http_status: int | None
    body: str
    fetched_at: float
    expires_at: float
    message: str = ""
    retry_at: float = 0.0  # unreachable: when to ask again
    attempts: int = 0  # unreachable answers in a row
    unreachable_since: float | None = None
    failure: str | None = None  # unreachable: the ErrorCode of the last answer (or its lack)

    def usable(self, now: float) -> bool:
        """Rules (or their absence) that may be used without asking the server again."""
        return self.state != "unreachable" and now < self.expires_at

    @cached_property
    def rules(self) -> Protego:
        """Parsed once, when first asked (not a field: never saved, never copied)."""
        return Protego.parse(self.body if self.state == "rules" else "")

    def allows(self, url: str) -> bool:
        if self.state == "unreachable":
            return False  # RFC 9309 §2.3.1.4: a complete disallow
        return self.state == "none" or self.rules.can_fetch(url, PRODUCT_TOKEN)

    def permits_redirect(self, server_name: str) -> Callable[[str], bool]:
        """For redirect hops: a hop within this server must be allowed here; a hop to another
        server is taken (its robots.txt is not known to this run)."""
        return lambda url: normalise_one(url)[1] != server_name or self.allows(url)

    def rate_cap(self) -> float | None:
        """Requests/s the file allows this tool: from Crawl-delay or Request-rate, else None."""
        if self.state != "rules":
            return None
        caps = []
        delay = self.rules.crawl_delay(PRODUCT_TOKEN)
        if delay:
            caps.append(1.0 / delay)
        rate = self.rules.request_rate(PRODUCT_TOKEN)
        if rate is not None and rate.seconds > 0:
            caps.append(rate.requests / rate.seconds)
        return min(caps) if caps else None

    def describe(self) -> str:
        cap = self.rate_cap()
        return self.message + (f"; at most {cap:g} requests/s" if cap else "")


def _cache_path(layout: RunLayout, server_name: str) -> Path:
    return layout.robots / f"{quote(server_name, safe='')}.json"


def load_robots(layout: RunLayout, server_name: str) -> RobotsFile | None:
    try:
        data = json.loads(_cache_path(layout, server_name).read_text(encoding="utf-8"))
        return RobotsFile(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def save_robots(layout: RunLayout, robots: RobotsFile) -> None:
    atomic_write_json(_cache_path(layout, robots.server_name), asdict(robots))


def robots_url(sample_url: str) -> str:
    parts = urlsplit(sample_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/robots.txt"


def cache_seconds(headers: Any) -> float:
    """How long the answer may be kept: its Cache-Control or Expires, at most 24 hours."""
    control = (headers.get("Cache-Control") or "").lower() if headers else ""
    if "no-store" in control or "no-cache" in control:
        return 0.0
    age = re.search(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", control)
    if age:
        return min(MAX_AGE, float(age.group(1)))
    expires = headers.get("Expires") if headers else None
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires).timestamp()
        except (TypeError, ValueError):
            return 0.0  # RFC 9111: an invalid Expires means "already expired"
        return max(0.0, min(MAX_AGE, when - time.time()))
    return MAX_AGE


async def fetch_robots(client: Any, server_name: str, url: str, previous: RobotsFile | None,
                       pace: Any = None, longest_pause: float = RETRY_PAUSES[-1]) -> RobotsFile:
    """Ask one server for its robots.txt (redirects followed, each hop paced). An unreachable
    one is asked again after its Retry-After, within [MIN_PAUSE, longest_pause] seconds."""
    from distributed_downloader.fetch.client import Body

    now = time.time()
    outcome = await client.get(url, pace=pace)
    if isinstance(outcome, Body):
        client.budget.release(outcome.reserved)
        body = outcome.data[:PARSED_BYTES].decode("utf-8", errors="replace")
        return RobotsFile(server_name, url, "rules", outcome.status, body, now,
                          now + cache_seconds(outcome.headers),
                          f"robots.txt: HTTP {outcome.status}")
    status = outcome.http_status
    unreachable = outcome.code in UNREACHABLE_CODES or (status is not None and status >= 500)
    if not unreachable:
        # 4xx (or a redirect loop, a blocked target, a huge file): unavailable, no restriction.
        return RobotsFile(server_name, url, "none", status, "", now,
                          now + cache_seconds(outcome.headers),
                          f"robots.txt unavailable ({outcome.message}): no restriction")
    since = previous.unreachable_since if previous is not None and \
        previous.unreachable_since is not None else now
    if now - since >= UNREACHABLE_GIVES_NONE_AFTER:
        return RobotsFile(server_name, url, "none", status, "", now, now + MAX_AGE,
                          "robots.txt unreachable for 30 days: treated as absent",
                          unreachable_since=since)
    attempts = (previous.attempts if previous is not None and previous.state == "unreachable"
                else 0) + 1
    pause = RETRY_PAUSES[min(attempts, len(RETRY_PAUSES)) - 1]
    if outcome.retry_after is not None:
        pause = outcome.retry_after
    pause = max(MIN_PAUSE, min(pause, longest_pause))
    message = f"robots.txt unreachable ({outcome.message})"
    if previous is not None and previous.state == "rules":
        # §2.4: a cached copy may be used beyond 24 hours while the file is unreachable.
        return RobotsFile(server_name, url, "rules", previous.http_status, previous.body,
                          previous.fetched_at, now + pause,
                          message + "; using the copy fetched earlier",
                          unreachable_since=since)
    return RobotsFile(server_name, url, "unreachable", status, "", now, now, message,
                      now + pause, attempts, since, str(outcome.code))


class RobotsGate:
    """Fetch's coordinator side: no server is asked for images before its robots.txt is known.

    Servers whose cached file is still fresh go at once. The others are held while a thread
    fetches their robots.txt (all servers at once, the largest first, many at a time); each
    answer comes back as news that `apply` hands to the scheduler: a rate cap, and a pause for
    the request just made (it counts against the server's budget). A server held for
    `server_down_after` seconds without a usable answer is given up for the run, like a server
    that keeps failing: its rows become retryable errors, never requested. A run uses the
    robots.txt it started with; the next run (or Slurm period) reads it again once expired.
    """

    def __init__(self, layout: RunLayout, settings: Settings,
                 sample_url: Callable[[str], str | None]) -> None:
        self.layout = layout
        self.settings = settings
        self.sample_url = sample_url
        self.news: queue.SimpleQueue[tuple[RobotsFile, float]] = queue.SimpleQueue()
        self.held: dict[str, tuple[float, RobotsFile | None]] = {}  # since, latest answer
        self.given_up: set[str] = set()  # read by the fetching thread too
        self.out_of_space: OutOfSpace | None = None  # set by the fetching thread
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, scheduler: Any, now: float, fetched_since: float | None = None) -> None:
        """Release the servers whose cached file is fresh (or was fetched since
        `fetched_since`: earlier in the same command); fetch the others' in a thread."""
        to_fetch = []
        by_size = sorted(scheduler.servers.items(), key=lambda item: -item[1].remaining_rows)
        for name, server in by_size:
            if server.dead or not server.pending:
                continue
            cached = load_robots(self.layout, name)
            if cached is not None and (cached.usable(now) or (
                    fetched_since is not None and cached.state != "unreachable"
                    and cached.fetched_at >= fetched_since)):
                # Its last request (a profile's, an earlier run's) may have been just now.
                scheduler.release(name, cached.rate_cap(), now)
                continue
            sample = self.sample_url(name)
            if sample is None:  # no URL at all: nothing will be requested
                continue
            scheduler.hold(name, "waiting for robots.txt")
            self.held[name] = (now, cached)
            to_fetch.append((name, robots_url(sample), cached))
        if to_fetch:
            self._thread = threading.Thread(target=self._fetch_all, args=(to_fetch,),
                                            name="robots", daemon=True)
            self._thread.start()

    def apply(self, scheduler: Any, now: float) -> None:
        """Hand the answers that came in to the scheduler; give up the servers held too long
        (or all of them, should the fetching thread have died). A robots.txt that could not
        be saved for want of space stops the run: the workers read it from the disk."""
        full = self.out_of_space
        if full is not None:
            scheduler.out_of_space(DiskFull(None, str(full.folder), full.needed, full.free))
        while True:
            try:
                robots, asked_at = self.news.get_nowait()
            except queue.Empty:
                break
            name = robots.server_name
            if name in self.given_up or name not in self.held:
                continue
            if robots.state == "unreachable":
                self.held[name] = (self.held[name][0], robots)
                scheduler.hold(name, robots.message, robots.retry_at)
                continue
            del self.held[name]
            scheduler.release(name, robots.rate_cap(), asked_at)
            log.info("%s: %s", name, robots.describe())
        thread_gone = self._thread is not None and not self._thread.is_alive()
        for name, (since, robots) in list(self.held.items()):
            if thread_gone or now - since >= self.settings.politeness.server_down_after:
                del self.held[name]
                self.given_up.add(name)
                scheduler.give_up_held(name, self._give_up_reason(robots, now - since))

    @staticmethod
    def _give_up_reason(robots: RobotsFile | None, seconds: float) -> Failure:
        # A server that cannot be reached at all says so (dns_error, timeout, ...); one that
        # answers, but not with its robots.txt, is robots_unreachable.
        if robots is None:
            return Failure(ErrorCode.ROBOTS_UNREACHABLE,
                          f"no answer for robots.txt in {seconds:.0f} s; not asked this run")
        code = robots.failure if robots.failure in NETWORK_FAILURES \
            else ErrorCode.ROBOTS_UNREACHABLE
        return Failure(code, f"{robots.message} for {seconds:.0f} s; not asked this run")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the fetching thread ------------------------------------------------------------------

    def _fetch_all(self, servers: list[tuple[str, str, RobotsFile | None]]) -> None:
        try:
            asyncio.run(self._fetch_servers(servers))
        except Exception:  # the servers still held are given up by `apply`
            log.exception("fetching robots.txt failed")

    async def _fetch_servers(self, servers: list[tuple[str, str, RobotsFile | None]]) -> None:
        from distributed_downloader.fetch.client import HttpClient

        client = HttpClient(self.settings.network)
        gate = asyncio.Semaphore(FETCHES_AT_ONCE)
        try:
            await asyncio.gather(*(self._keep_asking(client, gate, name, url, cached)
                                   for name, url, cached in servers))
        finally:
            await client.close()

    async def _keep_asking(self, client: Any, gate: asyncio.Semaphore, name: str, url: str,
                           cached: RobotsFile | None) -> None:
        previous = cached
        while not self._stop.is_set() and name not in self.given_up:
            if previous is not None and previous.state == "unreachable":
                await self._sleep_until(previous.retry_at, name)
                if self._stop.is_set() or name in self.given_up:
                    return
            async with gate:
                asked_at = time.time()
                try:
                    robots = await fetch_robots(client, name, url, previous,
                                                longest_pause=self.settings.politeness.server_down_after)
                    save_robots(self.layout, robots)
                except OutOfSpace as exc:  # the server stays held; `apply` stops the run
                    self.out_of_space = exc
                    return
                except Exception:  # noqa: BLE001 - this server is given up, not the others
                    log.exception("%s: fetching robots.txt failed", name)
                    return
            self.news.put((robots, asked_at))
            if robots.state != "unreachable":
                return
            previous = robots

    async def _sleep_until(self, when: float, name: str) -> None:
        while not self._stop.is_set() and name not in self.given_up and time.time() < when:
            await asyncio.sleep(min(1.0, max(0.0, when - time.time())))
