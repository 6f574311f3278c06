"""Every way a run or a row can go wrong, named once.

Exceptions are for faults that stop a command (reported in one line, never a traceback);
row-level outcomes are values from the enumerations below, written into the output tables.
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

# Exit codes of the command line (besides 0, and 1 for `verify` finding damage).
EXIT_USER_ERROR = 2
# ENOSPC's own number: a script (or a Slurm job's exit code) tells a full disk from other
# errors at a glance, and knows the same command resumes once space is freed.
EXIT_OUT_OF_SPACE = 28
EXIT_INTERRUPTED = 130
# A full disk, or a full quota (common on cluster scratch and home folders): the same remedy.
OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UserError(Exception):
    """A problem with the user's input, settings or output folder; the CLI prints it in one line."""

    exit_code = EXIT_USER_ERROR


class OutOfSpace(UserError):
    """No room left where the run writes. Whatever was being written was removed (readers never
    see half a file); the same command resumes once space is freed."""

    exit_code = EXIT_OUT_OF_SPACE

    def __init__(self, folder: Path | str, needed: int, free: int | None = None) -> None:
        super().__init__(str(folder), needed, free)
        self.folder, self.needed, self.free = Path(folder), needed, free
        self.rows_left: int | None = None  # set by fetch: what the rest of the run needs
        self.rows_in_write = 0  # rows of results in the write that failed (a chunk's)
        self.bytes_per_row: float | None = None

    def __str__(self) -> str:
        free = "" if self.free is None else f" ({_size(self.free)} free)"
        text = f"out of space in {self.folder}{free}: writing {_size(self.needed)} failed"
        if self.rows_left and self.bytes_per_row:
            text += (f"; the {self.rows_left:,} rows left take about "
                     f"{_size(self.rows_left * self.bytes_per_row)} "
                     f"({_size(self.bytes_per_row)} per row so far)")
        return text + (". Nothing was half-written: free space (or raise the quota), then run "
                       "the same command again")


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:,.0f} bytes"
    unit = "KiB"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:,.1f} {unit}"


class ConfigError(UserError):
    """A settings file or flag that cannot be used as given."""


class InputError(UserError):
    """An input that cannot be read at all (as opposed to single bad rows, which are rejected)."""


def require_module(module: str, extra: str, purpose: str) -> None:
    """Fail before any work when an optional dependency is missing (not after a batch)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module}, which is not installed: "
                        f"pip install 'distributed-downloader[{extra}]'") from None


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


@dataclass(frozen=True)
class Failure:
    """Why one row was not stored, whatever found it (the request, the image check, or the
    scheduler giving a server up): the row's `error_code` and message, and what the server
    said when it answered."""

    code: ErrorCode
    message: str
    http_status: int | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict, compare=False)
