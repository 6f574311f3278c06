"""HTTP GET of one URL: redirects checked hop by hop, bodies capped while they stream.

A redirect target is read as a browser reads it, with the parser prep reads every URL with
(WHATWG, ada): `http://0x7f000001/` is 127.0.0.1, so the address check at each hop sees the
address a numeric host names, as it does for a prepared URL, and no DNS lookup is made for it.

Every outcome is a value: a `Body`, or a `Failure` whose `ErrorCode` maps straight to the
errors table. Nothing here decides whether to retry (see retry.py) or how fast to go
(see politeness.py); `pace` is awaited before every hop so redirects count against the budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import ada_url
import aiohttp
from aiohttp.http_exceptions import LineTooLong
from yarl import URL

from distributed_downloader.config import NetworkSettings
from distributed_downloader.errors import ErrorCode, Failure
from distributed_downloader.fetch.dns import CachingResolver
from distributed_downloader.fetch.retry import parse_retry_after
from distributed_downloader.fetch.safety import AddressPolicy, BlockedAddress, SafeResolver
from distributed_downloader.fetch.wait_line import WaitLine

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.9,*/*;q=0.5"


@dataclass
class Body:
    data: bytes
    status: int
    final_url: str
    content_type: str
    reserved: int = 0  # bytes held in the worker's body budget until the body is let go
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Claim:
    """Bytes of the body budget that a request holds until its body, if any, takes them over."""

    amount: int = 0


class BodyBudget:
    """Bytes of response bodies a worker holds at once: expected from requests sent, being read,
    or waiting to be decoded.

    A request reserves what its body is expected to take before it is sent (`admit`), so a
    worker sends no more requests than it has room for the answers of: answers that came while
    the budget was full used to wait in their connections' read buffers, outside any budget
    (43 MiB with 240 servers in flight). When the headers come, the reservation becomes the
    Content-Length, all at once (`settle`), so partly read bodies never wait on each other; a
    body that needs more than it reserved waits for room holding nothing (in the order such
    bodies came), ahead of any request not yet sent; so does a request marked `ahead` (a first
    contact's, whose answers raise its server's pace) ahead of the others. One larger than the
    whole budget still goes through when nothing else holds any. Waiters are woken one per
    freed place (fetch/wait_line.py).
    """

    UNKNOWN_LENGTH_ESTIMATE = 1 << 20
    # What a request expects before any body is seen: a web image of a few hundred KB. Then the
    # running mean of the bodies, each moving it by this share of the difference.
    FIRST_EXPECTED = 256 << 10
    MEAN_WEIGHT = 1 / 16
    # Whatever its body, an answer can fill aiohttp's read buffer (64 KiB) before it is read, so
    # a request reserves at least that: a worker's requests in flight are at most its budget
    # over this (768 with the default 48 MiB).
    LEAST_EXPECTED = 64 << 10

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.expected = float(self.FIRST_EXPECTED)
        # Waiting for room, each line ahead of the next: bodies that need more than they
        # reserved, requests marked `ahead`, the other requests.
        self._bodies = WaitLine()
        self._ahead = WaitLine()
        self._requests = WaitLine()

    def try_admit(self, ahead: bool = False) -> int | None:
        """Reserve a request's expected body when there is room now (and no request `ahead` of
        it waits); the bytes reserved."""
        amount = max(round(self.expected), self.LEAST_EXPECTED)
        if self._bodies or (self._ahead and not ahead) or not self._fits(amount):
            return None
        self.used += amount
        return amount

    async def admit(self, ahead: bool = False) -> int:
        """Reserve a request's expected body, waiting for room in line (a request `ahead` holds
        the others back meanwhile); the bytes reserved."""
        line, front = self._ahead if ahead else self._requests, False
        while (amount := self.try_admit(ahead)) is None:
            await self._wait_in(line, front)
            front = True  # woken, but no room: first again at the next wake
        self._pass_turn_on()
        return amount

    async def settle(self, claim: Claim, size: int | None) -> None:
        """Make a request's claim (none yet: 0) its body's Content-Length, or an estimate when
        that is unknown."""
        amount = size if size is not None else self.UNKNOWN_LENGTH_ESTIMATE
        if size is not None:
            self.expected += (size - self.expected) * self.MEAN_WEIGHT
        if amount <= claim.amount:
            self.release(claim.amount - amount)
            claim.amount = amount
            return
        self.used -= claim.amount  # it waits holding nothing
        claim.amount = 0
        if self._fits(amount):
            self.used += amount
            claim.amount = amount
            return
        self._bodies.wake_one()  # what it gave back may let an earlier body in
        front = False
        while not self._fits(amount):
            await self._wait_in(self._bodies, front)
            front = True
        self.used += amount
        claim.amount = amount
        self._pass_turn_on()

    def release(self, amount: int) -> None:
        if amount:
            self.used -= amount
            self._wake_one()

    def _fits(self, amount: int) -> bool:
        return not self.used or self.used + amount <= self.limit

    async def _wait_in(self, line: WaitLine, front: bool) -> None:
        """Wait for a turn; cancelled, pass on the wake this waiter may have been given."""
        try:
            await line.wait(front)
        except asyncio.CancelledError:
            self._wake_one()
            raise

    def _pass_turn_on(self) -> None:
        """After taking room: the next waiter tries while some remains."""
        if self.used < self.limit:
            self._wake_one()

    def _wake_one(self) -> None:
        """The first waiter of the first line with one asleep tries for room (one that finds
        none waits again, first in its line, and wakes nobody: nobody behind it fits either)."""
        for line in (self._bodies, self._ahead, self._requests):
            if line.wake_one():
                return


Pace = Callable[[], Awaitable[None]]
E = TypeVar("E", bound=BaseException)


def browser_form(url: URL) -> URL | None:
    """The URL as a browser would request it (less the fragment); None when a browser would
    refuse it (e.g. a host like 1.2.3.256)."""
    try:
        href = ada_url.parse_url(str(url), attributes=("href",))["href"]
    except ValueError:
        return None
    return URL(href.partition("#")[0], encoded=True)


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The exception of that kind behind `exc` (aiohttp wraps what went wrong)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


def _blocked_cause(exc: BaseException) -> BlockedAddress | None:
    return _cause(exc, BlockedAddress)


class HttpClient:
    """One keep-alive session per worker; per-server limits are the slots' job, not aiohttp's."""

    def __init__(self, network: NetworkSettings, budget: BodyBudget | None = None) -> None:
        self.policy = AddressPolicy(network.allow_network)
        self.budget = budget or BodyBudget(1 << 62)
        self.max_body_size = network.max_body_size
        self.max_redirects = network.max_redirects
        # The resolver caches by the records' TTL itself, so aiohttp's fixed-time cache is off.
        self.resolver = SafeResolver(self.policy, CachingResolver.from_settings(network))
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, use_dns_cache=False, resolver=self.resolver
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=network.timeout, sock_connect=network.connect_timeout
            ),
            headers={"User-Agent": network.effective_user_agent, "Accept": ACCEPT},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        # aiohttp silently re-sends a request whose pooled connection was closed; that request
        # would bypass the server's pacing and attempt count, so our own retry policy does it.
        if hasattr(self.session, "_retry_connection"):
            self.session._retry_connection = False

    async def close(self) -> None:
        await self.session.close()
        await self.resolver.close()  # not the connector's to close: it did not make it

    async def get(self, url: str, pace: Pace | None = None,
                  permitted: Callable[[str], bool] | None = None,
                  reserved: int = 0) -> Body | Failure:
        """GET `url`; `permitted` (robots.txt) is asked about every redirect target. `reserved`:
        bytes the caller reserved in the body budget for the answer (`BodyBudget.admit`), handed
        over: they become the body's reservation, or are given back."""
        claim = Claim(reserved)
        try:
            return await self._follow(url, pace, permitted, claim)
        finally:
            self.budget.release(claim.amount)

    async def _follow(self, url: str, pace: Pace | None,
                      permitted: Callable[[str], bool] | None, claim: Claim) -> Body | Failure:
        """The request and each redirect it is sent to, until an answer that is not one."""
        try:
            current = URL(url, encoded=True)
        except ValueError as exc:
            return Failure(ErrorCode.INVALID_REDIRECT, f"unusable URL: {exc}")
        for hop in range(self.max_redirects + 1):
            if hop > 0:  # prepared URLs were read this way already
                readable = browser_form(current)
                if readable is None:
                    return Failure(ErrorCode.INVALID_REDIRECT,
                                        f"redirected to {current}, not a valid URL")
                current = readable
            if current.scheme not in ("http", "https") or not current.host:
                return Failure(ErrorCode.INVALID_REDIRECT, f"redirected to {current}")
            try:
                self.policy.check_literal(current.host)
            except BlockedAddress as exc:
                return Failure(ErrorCode.BLOCKED_ADDRESS, str(exc))
            if hop > 0 and permitted is not None and not permitted(str(current)):
                return Failure(ErrorCode.ROBOTS_DISALLOWED,
                                    f"redirected to {current}, which robots.txt disallows")
            if pace is not None and hop > 0:
                await pace()
            outcome = await self._one_hop(current, claim)
            if isinstance(outcome, URL):
                current = outcome
                continue
            return outcome
        return Failure(ErrorCode.TOO_MANY_REDIRECTS, f"more than {self.max_redirects} redirects")

    async def _one_hop(self, url: URL, claim: Claim) -> Body | Failure | URL:
        """One request, no redirect followed: the body, the URL to go to next, or why neither."""
        try:
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    return _redirect_target(url, response)
                if not 200 <= response.status < 300:
                    return _status_failure(response)
                return await self._take_body(response, claim)
        except asyncio.TimeoutError:  # before OSError, of which it is one
            return Failure(ErrorCode.TIMEOUT, "no complete answer in time")
        except (aiohttp.ClientError, OSError) as exc:
            return _connection_failure(exc)

    async def _take_body(self, response: aiohttp.ClientResponse,
                         claim: Claim) -> Body | Failure:
        """A 2xx answer's body, held in the body budget until the caller lets it go."""
        status, length = response.status, response.content_length
        if (length or 0) > self.max_body_size:
            return Failure(ErrorCode.TOO_LARGE, f"Content-Length {length:,} over max_body_size "
                           f"{self.max_body_size:,}", status)
        await self.budget.settle(claim, length)
        data = await self._read_body(response)
        if data is None:
            return Failure(ErrorCode.TOO_LARGE, f"body over max_body_size {self.max_body_size:,}",
                           status)
        body = Body(data, status, str(response.url), response.headers.get("Content-Type", ""),
                    claim.amount, response.headers)
        claim.amount = 0  # the body's now
        return body

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The whole body, or None as soon as it passes max_body_size.

        Read as the chunks arrive (not re-cut to a fixed size) and copied once, into a bytes
        object of the exact size; a body that arrived in one chunk is not copied at all.
        Not a bytearray sized from Content-Length: everything downstream (BytesIO for Pillow,
        Arrow) would copy it once more, and hold both while the image waits to be decoded.
        """
        chunks = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > self.max_body_size:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _redirect_target(url: URL, response: aiohttp.ClientResponse) -> URL | Failure:
    """Where a redirect points, resolved against the URL that answered."""
    status, location = response.status, response.headers.get("Location")
    if not location:
        return Failure(ErrorCode.HTTP_ERROR, f"{status} without Location", status)
    try:
        return url.join(URL(location))
    except ValueError:
        return Failure(ErrorCode.INVALID_REDIRECT, f"unusable Location {location!r}", status)


def _status_failure(response: aiohttp.ClientResponse) -> Failure:
    """A status that is neither a redirect nor a success, with what it says about retrying."""
    status = response.status
    return Failure(
        ErrorCode.for_status(status) if status >= 400 else ErrorCode.HTTP_ERROR,
        f"HTTP {status} {response.reason or ''}".strip(),
        status,
        parse_retry_after(response.headers.get("Retry-After")),
        response.headers,
    )


def _connection_failure(exc: BaseException) -> Failure:
    """What went wrong on the way to an answer, as the error code it maps to."""
    blocked = _blocked_cause(exc)
    if blocked is not None:
        return Failure(ErrorCode.BLOCKED_ADDRESS, str(blocked))
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Failure(ErrorCode.DNS_ERROR, str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Failure(ErrorCode.CONNECTION_ERROR, str(exc))
    if isinstance(exc, aiohttp.InvalidURL):
        return Failure(ErrorCode.INVALID_REDIRECT, f"invalid URL {exc}")
    too_long = _cause(exc, LineTooLong)
    if too_long is not None:  # the same answer next time: final, not retried
        return Failure(ErrorCode.HEADERS_TOO_LARGE, f"a header line over {too_long.args[1]} bytes")
    return Failure(ErrorCode.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")
