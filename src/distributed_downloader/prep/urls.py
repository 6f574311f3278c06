"""URL validation and normalisation, as a browser does it (WHATWG URL standard, via ada), less
the fragment, which a browser never sends.

Most URLs in real inputs are already in the form a browser would send, so a vectorised check
keeps those as they are and only the rest go through the parser one by one. The fast path is
an optimisation only: tests check that it gives exactly what the parser gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ada_url
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.errors import RejectReason

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
# Lower-case DNS names whose last label starts with a letter (so never a number a browser
# would read as an IPv4 address), no port, no user info, no punycode to re-check.
_HOSTNAME = r"(?:[a-z0-9_-]+\.)*[a-z][a-z0-9-]*"
# Characters a browser leaves alone in both path and query.
_SAFE = r"[A-Za-z0-9\-._~!$&()*+,;=:@/%]"
ALREADY_NORMAL = re.compile(rf"^https?://(?:{_HOSTNAME}|{_IPV4})/{_SAFE}*(?:\?(?:{_SAFE}|\?)*)?$")
# Dot segments ("/./", "/../", also percent-encoded) and punycode labels need the parser.
NEEDS_PARSER = re.compile(r"/(?:\.|%2[eE]){1,2}(?:/|\?|$)|xn--")
HOST_OF_NORMAL = r"^https?://(?P<host>[^/]+)/"
SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.\-]*):")
ALLOWED_PROTOCOLS = ("http:", "https:")


@dataclass
class NormalisedUrls:
    """Per input value: the URL to download and its server, or why it was rejected."""

    identifier: pa.Array  # string, null where rejected
    server_name: pa.Array  # string, null where rejected
    reject_reason: pa.Array  # string, null where accepted


def normalise_one(raw: str | None) -> tuple[str | None, str | None, RejectReason | None]:
    """(identifier, server_name, None), or (None, None, reason)."""
    if raw is None or not raw.strip():
        return None, None, RejectReason.EMPTY_URL
    try:
        parsed = ada_url.parse_url(raw, attributes=("href", "host", "protocol"))
    except ValueError:
        scheme = SCHEME.match(raw)
        if scheme and scheme.group(1).lower() not in ("http", "https"):
            return None, None, RejectReason.UNSUPPORTED_SCHEME
        return None, None, RejectReason.INVALID_URL
    if parsed["protocol"] not in ALLOWED_PROTOCOLS:
        return None, None, RejectReason.UNSUPPORTED_SCHEME
    if not parsed["host"]:
        return None, None, RejectReason.INVALID_URL
    # A fragment is never sent: URLs differing only after "#" are one resource. In a serialised
    # URL the first "#" is the fragment's (one in the path or query would be percent-encoded).
    return parsed["href"].partition("#")[0], parsed["host"], None


def normalise_urls(raw: pa.Array) -> NormalisedUrls:
    """Normalise a column of URLs; `server_name` is the host, with the port when not default."""
    raw = raw.cast(pa.string())
    fast = pc.and_(
        pc.match_substring_regex(raw, ALREADY_NORMAL.pattern),
        pc.invert(pc.match_substring_regex(raw, NEEDS_PARSER.pattern)),
    )
    fast = pc.fill_null(fast, False)
    slow_positions = pc.indices_nonzero(pc.invert(fast)).to_pylist()

    identifier = pc.if_else(fast, raw, pa.scalar(None, pa.string()))
    server_name = pc.if_else(
        fast,
        pc.struct_field(pc.extract_regex(raw, HOST_OF_NORMAL), [0]),
        pa.scalar(None, pa.string()),
    )
    reason = pa.nulls(len(raw), pa.string())
    if slow_positions:
        slow_raw = raw.take(pa.array(slow_positions, pa.int64())).to_pylist()
        results = [normalise_one(value) for value in slow_raw]
        mask = pc.invert(fast)
        identifier = pc.replace_with_mask(
            identifier, mask, pa.array([r[0] for r in results], pa.string())
        )
        server_name = pc.replace_with_mask(
            server_name, mask, pa.array([r[1] for r in results], pa.string())
        )
        reason = pc.replace_with_mask(
            reason, mask, pa.array([r[2] and str(r[2]) for r in results], pa.string())
        )
    return NormalisedUrls(identifier=identifier, server_name=server_name, reject_reason=reason)
