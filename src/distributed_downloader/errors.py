"""Every way a run or a row can go wrong, named once.

Exceptions are for faults that stop a command (reported in one line, never a traceback);
row-level outcomes are values from the enumerations below, written into the output tables.
"""

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
