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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ada_url.ada_adapter import ffi as _ffi
from ada_url.ada_adapter import lib as _ada

from distributed_downloader.errors import RejectReason

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
# Lower-case DNS names whose last label starts with a letter (so never a number a browser
# would read as an IPv4 address), no port, no user info, and no "--" in a label (so no
# punycode "xn--" label, which the parser checks).
_LABEL = r"[a-z0-9_]+(?:-[a-z0-9_]+)*"
_HOSTNAME = rf"(?:{_LABEL}\.)*[a-z][a-z0-9]*(?:-[a-z0-9]+)*"
# A path segment a browser leaves alone: characters it never changes, and a first one that is
# neither "." nor the start of "%2e" (so never a dot segment, "/./" or "/../", which the
# parser removes).
_FIRST = r"(?:[A-Za-z0-9\-_~!$&()*+,;=:@]|%(?:[013-9A-Fa-f]|2[0-9A-DFa-df]))"
_SEGMENT = rf"(?:{_FIRST}[A-Za-z0-9\-._~!$&()*+,;=:@%]*)?"
# Characters a browser leaves alone in a query.
_SAFE = r"[A-Za-z0-9\-._~!$&()*+,;=:@/%]"
# URLs already in the form a browser sends, checked in one pass; the rest go to the parser.
ALREADY_NORMAL = re.compile(
    rf"^https?://(?:{_HOSTNAME}|{_IPV4})/{_SEGMENT}(?:/{_SEGMENT})*(?:\?(?:{_SAFE}|\?)*)?$")
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


def _normalise_many(raws: list[str | None]) -> tuple[list, list, list]:
    """`normalise_one` over a list: (identifiers, servers, reasons), through ada's C API
    directly (half the cost of `parse_url`, which builds a dict per URL)."""
    identifiers: list[str | None] = []
    servers: list[str | None] = []
    reasons: list[str | None] = []
    for raw in raws:
        identifier = server = reason = None
        if raw is None or not raw.strip():
            reason = RejectReason.EMPTY_URL
        else:
            data = raw.encode()
            url = _ada.ada_parse(data, len(data))
            try:
                if not _ada.ada_is_valid(url):
                    scheme = SCHEME.match(raw)
                    reason = (RejectReason.UNSUPPORTED_SCHEME if scheme and
                              scheme.group(1).lower() not in ("http", "https")
                              else RejectReason.INVALID_URL)
                else:
                    href = _text(_ada.ada_get_href(url))
                    server = _host_of_href(href)
                    if server is None:
                        reason = RejectReason.UNSUPPORTED_SCHEME
                    elif server:
                        identifier = href.partition("#")[0]
                    else:
                        server, reason = None, RejectReason.INVALID_URL
            finally:
                _ada.ada_free(url)
        identifiers.append(identifier)
        servers.append(server)
        reasons.append(reason and str(reason))
    return identifiers, servers, reasons


def _host_of_href(href: str) -> str | None:
    """The host (with its port) of a serialised http(s) URL, read from its text: after "//",
    up to the path's "/", less any user info, whose own "@" and "/" are percent-encoded; None
    for another scheme. One call into ada per URL instead of three."""
    start = 8 if href.startswith("https://") else 7 if href.startswith("http://") else 0
    if not start:
        return None
    end = href.find("/", start)
    return (href[start:end] if end >= 0 else href[start:]).rpartition("@")[2]


def _text(value: object) -> str:
    return _ffi.unpack(value.data, value.length).decode()  # type: ignore[attr-defined]


def _hosts_of_normal(raw: pa.Array) -> pa.Array:
    """The host of each URL in normal form ("scheme://host/..."): the third of its pieces
    split at "/", taken by position (cheaper than a regex capture); other rows get a piece of
    no meaning, to be replaced."""
    pieces = pc.split_pattern(raw, "/", max_splits=3)
    starts = np.frombuffer(pieces.buffers()[1], np.int32)[pieces.offset:][: len(pieces)]
    values = pieces.values
    return values.take(np.minimum(starts + 2, len(values) - 1))


def normalise_urls(raw: pa.Array) -> NormalisedUrls:
    """Normalise a column of URLs; `server_name` is the host, with the port when not default."""
    raw = raw.cast(pa.string())
    fast = pc.fill_null(pc.match_substring_regex(raw, ALREADY_NORMAL.pattern), False)
    reason = pa.nulls(len(raw), pa.string())
    if pc.all(fast).as_py() is not False:
        return NormalisedUrls(identifier=raw, server_name=_hosts_of_normal(raw),
                              reject_reason=reason)
    slow = pc.invert(fast)
    identifiers, servers, reasons = _normalise_many(raw.filter(slow).to_pylist())
    server_name = (_hosts_of_normal(raw) if pc.any(fast).as_py()
                   else pa.nulls(len(raw), pa.string()))
    return NormalisedUrls(
        identifier=pc.replace_with_mask(raw, slow, pa.array(identifiers, pa.string())),
        server_name=pc.replace_with_mask(server_name, slow, pa.array(servers, pa.string())),
        reject_reason=pc.replace_with_mask(reason, slow, pa.array(reasons, pa.string())),
    )
