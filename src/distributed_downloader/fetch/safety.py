"""Which addresses may be contacted: public ones, plus the networks the run allows.

Checked on the address the connection is actually made to: hostnames through the resolver
(so a DNS answer cannot smuggle in a private address), IP literals before every request and
every redirect hop (aiohttp connects to those without asking the resolver).
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(OSError):
    """A host that resolves only to addresses the run may not contact."""


class AddressPolicy:
    def __init__(self, allow_network: list[str]) -> None:
        self.allowed = [ipaddress.ip_network(network, strict=False) for network in allow_network]

    def is_allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return True
        # Loopback, private, link-local (169.254.169.254 included), shared, reserved, unspecified
        # and documentation ranges are all "not global"; multicast is refused too.
        return address.is_global and not address.is_multicast

    def check_literal(self, host: str) -> None:
        """Refuse a URL whose host is a non-allowed IP literal; hostnames pass (see resolver)."""
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.is_allowed(address):
            raise BlockedAddress(f"{address} is not a public address and not in allow_network")


class SafeResolver(AbstractResolver):
    """Resolves through the default resolver and keeps only the addresses the policy allows."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.is_allowed(ipaddress.ip_address(r["host"]))]
        if not allowed:
            addresses = ", ".join(sorted({r["host"] for r in results}))
            raise BlockedAddress(f"{host} resolves to {addresses}: not public, "
                                 "not in allow_network")
        return allowed

    async def close(self) -> None:
        await self.inner.close()
