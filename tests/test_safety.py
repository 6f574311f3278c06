"""Which addresses may be contacted (pure checks: no connection is made here)."""

from __future__ import annotations

import ipaddress

import pytest

from distributed_downloader.fetch.safety import AddressPolicy, BlockedAddress


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
     "198.18.0.1"],
)
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    assert not AddressPolicy([]).is_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy([]).is_allowed(ipaddress.ip_address(address))


def test_allow_network_opens_exactly_its_range() -> None:
    policy = AddressPolicy(["127.0.0.0/25"])
    assert policy.is_allowed(ipaddress.ip_address("127.0.0.2"))
    assert policy.is_allowed(ipaddress.ip_address("::ffff:127.0.0.2"))
    assert not policy.is_allowed(ipaddress.ip_address("127.0.0.250"))
    with pytest.raises(BlockedAddress):
        policy.check_literal("127.0.0.250")
    with pytest.raises(BlockedAddress):
        policy.check_literal("[::1]")
    policy.check_literal("127.0.0.3")
    policy.check_literal("images.museum.localhost")  # names are checked by the resolver
