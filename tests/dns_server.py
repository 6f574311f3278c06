"""A loopback DNS server for tests: names we choose, TTLs we choose, failures on demand.

Tests must never ask the system's resolver (it may be off this machine), so every test that
resolves a name points the downloader here with `--dns-servers 127.0.0.1:PORT`.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from types import TracebackType

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord


class DnsServer:
    """UDP on 127.0.0.1 (a free port), answered from a thread.

    `records` maps a name to its addresses (IPv4 as A, IPv6 as AAAA records); a known name asked
    for the other type gets an empty answer, an unknown name NXDOMAIN. `fail` maps a name to
    the rcode it gets instead (SERVFAIL, NXDOMAIN, ...); `drop` is how many queries to ignore
    before answering (a flaky server). `queries` counts the queries per name, of every type.
    """

    def __init__(self, records: dict[str, list[str]] | None = None, ttl: int = 300) -> None:
        self.records = {_name(name): list(addresses)
                        for name, addresses in (records or {}).items()}
        self.ttl = ttl
        self.fail: dict[str, str] = {}
        self.drop = 0
        self.queries: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []  # (name, query type) in order of arrival
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.port: int = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)

    @property
    def address(self) -> str:
        """The value for `--dns-servers`."""
        return f"127.0.0.1:{self.port}"

    def a_queries(self, name: str) -> int:
        return sum(1 for asked, kind in self.log if asked == _name(name) and kind == "A")

    def _answer(self, packet: bytes) -> bytes | None:
        request = DNSRecord.parse(packet)
        name = _name(str(request.q.qname))
        kind = QTYPE.get(request.q.qtype)
        self.queries[name] += 1
        self.log.append((name, kind))
        if self.drop > 0:
            self.drop -= 1
            return None
        reply = request.reply()
        if name in self.fail:
            reply.header.rcode = getattr(RCODE, self.fail[name])
        elif name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for address in self.records[name]:
                record = AAAA(address) if ":" in address else A(address)
                if (kind == "AAAA") == isinstance(record, AAAA):
                    reply.add_answer(RR(request.q.qname, getattr(QTYPE, kind), rdata=record,
                                        ttl=self.ttl))
        return reply.pack()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                answer = self._answer(packet)
            except (DNSError, ValueError):  # a packet we cannot read: no answer at all
                continue
            if answer is not None:
                self._socket.sendto(answer, peer)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def _name(name: str) -> str:
    return name.lower().rstrip(".")
