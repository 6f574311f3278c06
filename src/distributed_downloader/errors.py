"""Every way a run or a row can go wrong, named once.

Exceptions are for faults that stop a command (reported in one line, never a traceback);
row-level outcomes are values from the enumerations below, written into the output tables.
"""

from __future__ import annotations

from enum import StrEnum


class UserError(Exception):
    """A problem with the user's input, settings or output folder; the CLI prints it in one line."""


class ConfigError(UserError):
    """A settings file or flag that cannot be used as given."""


class InputError(UserError):
    """An input that cannot be read at all (as opposed to single bad rows, which are rejected)."""


class DropReason(StrEnum):
    """Why prep left out a well-formed row on purpose (counted, not stored)."""

    MISSING_GBIF_ID = "missing_gbif_id"
    NOT_STILL_IMAGE = "not_still_image"
    NOT_IMAGE_FORMAT = "not_image_format"


class RejectReason(StrEnum):
    """Why prep could not use a row; each becomes a line of `prep/rejected.parquet`."""

    MALFORMED_ROW = "malformed_row"  # too few or too many fields
    INVALID_UTF8 = "invalid_utf8"
    EMPTY_URL = "empty_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"  # javascript:, file:, ftp:, data:, ...
    INVALID_URL = "invalid_url"  # relative, no host, unparseable


class ErrorCode(StrEnum):
    """Why a URL has no image: the `error_code` column of the errors tables."""

    HTTP_400 = "http_400"
    HTTP_401 = "http_401"
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_410 = "http_410"
    HTTP_429 = "http_429"  # still throttled after every attempt
    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    HTTP_ERROR = "http_error"  # any other status >= 400; `http_status` has it
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"  # refused, reset, closed mid-body
    DNS_ERROR = "dns_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    INVALID_REDIRECT = "invalid_redirect"  # a Location that is not an http(s) URL
    BLOCKED_ADDRESS = "blocked_address"  # private, loopback, link-local, ... not allowed
    SERVER_UNAVAILABLE = "server_unavailable"  # the server stayed down; not requested again
    SERVER_EXCLUDED = "server_excluded"  # excluded by the user's rates file; never requested
    OPTED_OUT = "opted_out"  # X-Robots-Tag asked not to be used (noai, ...); nothing stored
    OPTED_OUT_SERVER = "opted_out_server"  # the server opted out of everything; not requested
    ROBOTS_DISALLOWED = "robots_disallowed"  # the server's robots.txt disallows it; not requested
    ROBOTS_UNREACHABLE = "robots_unreachable"  # robots.txt stayed unreachable: not requested
    TOO_LARGE = "too_large"  # body over max_body_size
    HEADERS_TOO_LARGE = "headers_too_large"  # a header line longer than HTTP clients read
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than max_image_pixels
    IMAGE_ERROR = "image_error"  # decodes, but cannot be converted or encoded

    @classmethod
    def for_status(cls, status: int) -> ErrorCode:
        try:
            return cls(f"http_{status}")
        except ValueError:
            return cls.HTTP_ERROR


# What may succeed if asked again later: retried within a run, and by `fetch --retry-errors`.
RETRYABLE = frozenset(
    {
        ErrorCode.HTTP_429,
        ErrorCode.HTTP_500,
        ErrorCode.HTTP_502,
        ErrorCode.HTTP_503,
        ErrorCode.HTTP_504,
        ErrorCode.TIMEOUT,
        ErrorCode.CONNECTION_ERROR,
        ErrorCode.DNS_ERROR,
        ErrorCode.SERVER_UNAVAILABLE,
        ErrorCode.SERVER_EXCLUDED,  # once the user lifts the exclusion
        ErrorCode.ROBOTS_DISALLOWED,  # checked against the robots.txt of the day, no request
        ErrorCode.ROBOTS_UNREACHABLE,
        ErrorCode.BLOCKED_ADDRESS,  # once `allow_network` admits the address
    }
)
# Retryable by a later run only: within a run the answer cannot change.
RETRYABLE_LATER = frozenset({ErrorCode.ROBOTS_DISALLOWED, ErrorCode.BLOCKED_ADDRESS})
# Failures of the server, not of the URL: retried later, counted by the circuit breaker (a 503
# with Retry-After is a throttle instead: see policy.signal_of).
SERVER_FAILURES = frozenset(
    {
        ErrorCode.TIMEOUT,
        ErrorCode.CONNECTION_ERROR,
        ErrorCode.DNS_ERROR,
        ErrorCode.HTTP_500,
        ErrorCode.HTTP_502,
        ErrorCode.HTTP_503,
        ErrorCode.HTTP_504,
    }
)
