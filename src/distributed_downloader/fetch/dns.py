"""Name resolution for the workers: one lookup per host and TTL, not one per request.

aiohttp's own cache forgets every host after a fixed time whatever the records say, and each
concurrent first request to a new host starts its own lookup in a thread; at millions of URLs a
flaky system resolver then turns into thousands of failed rows. Here lookups go through c-ares
(aiodns), concurrent ones for a host share one query, answers are kept for their TTL, a failed
refresh serves the last answer (stale-if-error), and failures are remembered for a few seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiodns
from aiohttp.abc import AbstractResolver, ResolveResult

from distributed_downloader.config import NetworkSettings

# The cache's limits are settings (NetworkSettings.dns_*); these are their defaults.
_DEFAULTS = NetworkSettings()
# The name has no address: an answer, not a failure to get one, so no stale answer is served.
NO_SUCH_NAME = frozenset(
    {aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA, aiodns.error.ARES_ENONAME}
)
_RESULT_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

Key = tuple[str, int]  # (host, address family)
Address = tuple[str, int]  # (IP address, address family)


class DNSLookupError(OSError):
    """A failed lookup; an OSError so that aiohttp reports it as a DNS error (`dns_error`)."""


@dataclass
class _Entry:
    addresses: list[Address]  # empty for a remembered failure
    error: str
    answered: float  # monotonic time of the answer (for a failure: of the failure)
    expires: float


class CachingResolver(AbstractResolver):
    """Resolves through c-ares with a per-host cache; `servers` empty: the system's resolv.conf.

    `lookups` counts the lookups really sent (all the rest came from the cache).
    """

    def __init__(
        self,
        servers: Sequence[str] = (),
        *,
        min_ttl: float = _DEFAULTS.dns_min_ttl,
        max_ttl: float = _DEFAULTS.dns_max_ttl,
        stale_for: float = _DEFAULTS.dns_stale_for,
        negative_ttl: float = _DEFAULTS.dns_negative_ttl,
        timeout: float = _DEFAULTS.dns_timeout,
        tries: int = _DEFAULTS.dns_tries,
    ) -> None:
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.stale_for, self.negative_ttl = stale_for, negative_ttl
        self.lookups = 0
        self._dns = aiodns.DNSResolver(
            list(servers) or None, loop=asyncio.get_running_loop(), timeout=timeout, tries=tries,
            ndots=1,  # a URL's host name is asked as written first, not with search suffixes
        )
        self._cache: dict[Key, _Entry] = {}
        self._pending: dict[Key, asyncio.Future[list[Address]]] = {}

    @classmethod
    def from_settings(cls, network: NetworkSettings) -> CachingResolver:
        return cls(network.dns_servers, min_ttl=network.dns_min_ttl,
                   max_ttl=network.dns_max_ttl, stale_for=network.dns_stale_for,
                   negative_ttl=network.dns_negative_ttl, timeout=network.dns_timeout,
                   tries=network.dns_tries)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self.addresses(host, family)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=address_family,
                          proto=0, flags=_RESULT_FLAGS)
            for address, address_family in addresses
        ]

    async def addresses(self, host: str, family: int = socket.AF_UNSPEC) -> list[Address]:
        try:  # aiohttp connects to IP literals without asking; answer them all the same
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return [(str(literal), socket.AF_INET6 if literal.version == 6 else socket.AF_INET)]
        key = (host.lower().rstrip("."), int(family))
        entry = self._cache.get(key)
        if entry is not None and time.monotonic() < entry.expires:
            if not entry.addresses:
                raise DNSLookupError(None, entry.error)
            return entry.addresses
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(key))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._forget(key, done))
        # One caller giving up (its request timed out) must not cancel the others' lookup.
        return await asyncio.shield(pending)

    def _forget(self, key: Key, done: asyncio.Future[list[Address]]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved, so a failure nobody awaits any more is not logged

    async def _lookup(self, key: Key) -> list[Address]:
        host, family = key
        self.lookups += 1
        try:
            result = await self._dns.getaddrinfo(host, family=socket.AddressFamily(family),
                                                 type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            reason = exc.args[1] if len(exc.args) > 1 else "lookup failed"
            return self._failed(key, f"DNS lookup of {host} failed: {reason}",
                                stale_ok=code not in NO_SUCH_NAME)
        except (ValueError, UnicodeError) as exc:  # a name c-ares cannot even ask for
            return self._failed(key, f"DNS lookup of {host} failed: {exc}", stale_ok=False)
        addresses: list[Address] = []
        for node in result.nodes:
            raw = node.addr[0]
            address = (raw.decode("ascii") if isinstance(raw, bytes) else str(raw), node.family)
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            return self._failed(key, f"DNS lookup of {host}: no address", stale_ok=False)
        ttls = [node.ttl for node in result.nodes] + [cname.ttl for cname in result.cnames]
        now = time.monotonic()
        ttl = min(max(min(ttls), self.min_ttl), self.max_ttl)
        self._cache[key] = _Entry(addresses, "", now, now + ttl)
        return addresses

    def _failed(self, key: Key, message: str, stale_ok: bool) -> list[Address]:
        now = time.monotonic()
        entry = self._cache.get(key)
        if stale_ok and entry is not None and entry.addresses \
                and now - entry.answered <= self.stale_for:
            entry.expires = now + self.negative_ttl  # ask again soon, not for every request
            return entry.addresses
        self._cache[key] = _Entry([], message, now, now + self.negative_ttl)
        raise DNSLookupError(None, message)

    async def close(self) -> None:
        for pending in list(self._pending.values()):
            pending.cancel()
        await self._dns.close()
