"""From rows as read to rows to download: column roles, the GBIF filter, URL checks.

Everything here works on a chunk at a time with vectorised Arrow compute; only URLs that are not
already in normal form are looked at one by one (see `urls.py`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.config import Settings
from distributed_downloader.errors import DropReason, InputError, RejectReason
from distributed_downloader.prep.readers import RawChunk
from distributed_downloader.prep.sources import URL_COLUMN_CANDIDATES, Source
from distributed_downloader.prep.urls import NormalisedUrls, normalise_urls
from distributed_downloader.schema import BATCH, DROPPED

ID_COLUMN_CANDIDATES = ("gbifID", "source_id", "id")
GBIF_FORMATS = ("gbif", "dwca")
STILL_IMAGE = r"(?i)^\s*(.*/)?stillimage\s*$"  # "StillImage" or the DCMI type URI
IMAGE_MIME_TYPE = r"(?i)^\s*image/"
# What real GBIF files also put in `format` on image rows: nothing, or a bare image type.
LOOSE_IMAGE_FORMAT = r"(?i)^\s*(image/.*|jpe?g|png|gif|tiff?|webp|bmp|jp2|heic|heif)?\s*$"


def _find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {}
    for name in columns:
        by_lower.setdefault(name.lower(), name)
    for candidate in candidates:
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
    return None


def _require_column(columns: list[str], name: str, label: str, flag: str) -> str:
    found = _find_column(columns, (name,))
    if found is None:
        raise InputError(
            f"{label}: no column '{name}' (given by {flag}); its columns: {', '.join(columns)}"
        )
    return found


@dataclass
class ColumnRoles:
    """Which input column plays which part, for one source."""

    url: str
    source_id: str | None  # None: the row's line number is its id
    license: str | None
    source: str | None
    title: str | None
    keep: list[str]
    gbif_filter: bool
    type: str | None = None
    format: str | None = None

    @property
    def wanted(self) -> list[str]:
        names = [self.url, self.source_id, self.license, self.source, self.title, self.type,
                 self.format, *self.keep]
        return list(dict.fromkeys(name for name in names if name is not None))


def resolve_roles(columns: list[str], source: Source, settings: Settings) -> ColumnRoles:
    label = source.label
    columns = [*columns, *(name for name in source.defaults if name not in columns)]
    if settings.prep.url_column:
        url = _require_column(columns, settings.prep.url_column, label, "--url-column")
    else:
        url = _find_column(columns, URL_COLUMN_CANDIDATES)
        if url is None:
            raise InputError(
                f"{label}: no URL column (looked for {', '.join(URL_COLUMN_CANDIDATES)}); "
                f"name it with --url-column. Its columns: {', '.join(columns)}"
            )
    if settings.prep.id_column:
        source_id = _require_column(columns, settings.prep.id_column, label, "--id-column")
    else:
        source_id = source.id_column or _find_column(columns, ID_COLUMN_CANDIDATES)
    gbif_filter = source.format in GBIF_FORMATS
    type_column = _find_column(columns, ("type",)) if gbif_filter else None
    format_column = _find_column(columns, ("format",)) if gbif_filter else None
    if source.format == "gbif":
        missing = [name for name, found in (("type", type_column), ("format", format_column),
                                            ("gbifID", source_id)) if found is None]
        if missing:
            raise InputError(
                f"{label}: read as GBIF multimedia but has no {', '.join(missing)} column; "
                "use --format tsv to read it without the GBIF filter"
            )
    keep = []
    for name in settings.prep.keep_columns:
        if name in BATCH.names:
            raise InputError(f"--keep-columns: '{name}' is already an output column")
        keep.append(_require_column(columns, name, label, "--keep-columns"))
    return ColumnRoles(
        url=url,
        source_id=source_id,
        license=_find_column(columns, ("license",)),
        source=_find_column(columns, ("source",)),
        title=_find_column(columns, ("title",)),
        keep=keep,
        gbif_filter=gbif_filter,
        type=type_column,
        format=format_column,
    )


@dataclass
class RejectedRow:
    source_file: str
    row_number: int | None
    raw_value: str
    reason: RejectReason


@dataclass
class CleanChunk:
    """What became of one chunk: its rows as staging columns (less `row_index` and `server_id`,
    which only the chunks' order decides) and which of them are kept, the rows rejected, the
    rows the GBIF filter left out, and their counts. The columns hold every row of the chunk:
    the kept ones are copied once, when they are staged."""

    columns: dict[str, pa.Array]
    kept: np.ndarray | None  # positions of the rows kept, in input order; None: every row
    rows_kept: int
    rejected: list[RejectedRow]
    left_out: pa.Table
    rows_read: int
    dropped: Counter
    kept_without_image_format: int = 0


@dataclass
class Tally:
    """Row counts of a whole prep, by what became of the rows."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # by DropReason or RejectReason
    # GBIF rows kept although their format is not image/* (empty, or "jpeg" ...)
    kept_without_image_format: int = 0

    def add(self, chunk: CleanChunk) -> None:
        self.rows_read += chunk.rows_read
        self.rows_kept += chunk.rows_kept
        self.dropped.update(chunk.dropped)
        self.kept_without_image_format += chunk.kept_without_image_format

    def as_dict(self) -> dict[str, int]:
        return {str(reason): count for reason, count in sorted(self.dropped.items()) if count}


class _Outcome:
    """What a chunk's checks found so far: rows rejected, rows left out, counts by reason."""

    def __init__(self, label: str, read_rejected: list[tuple[int | None, str, RejectReason]]
                 ) -> None:
        self.rejected = [RejectedRow(label, line, raw, reason)
                         for line, raw, reason in read_rejected]
        self.dropped: Counter = Counter(reason for _, _, reason in read_rejected)
        self.left_out: list[pa.Table] = []
        self.kept_without_image_format = 0

    def finish(self, columns: dict[str, pa.Array], kept: np.ndarray | None, rows_kept: int,
               rows_read: int) -> CleanChunk:
        self.rejected.sort(key=lambda row: row.row_number or 0)
        return CleanChunk(
            columns=columns, kept=kept, rows_kept=rows_kept, rejected=self.rejected,
            left_out=pa.concat_tables(self.left_out) if self.left_out
            else DROPPED.empty_table(),
            rows_read=rows_read, dropped=self.dropped,
            kept_without_image_format=self.kept_without_image_format,
        )


# A column with at most this share of distinct values in a chunk (GBIF's type, format, license)
# is checked once per distinct value, not once per row.
LOW_CARDINALITY = 0.25


class _PerValue:
    """Applies a string kernel to a chunk's distinct values when they are few, else to every row.

    A column found not to repeat itself is not encoded again: the hash pass would be wasted.
    """

    def __init__(self) -> None:
        self.repeats = True

    def __call__(self, kernel: Callable[[pa.Array], pa.Array], values: pa.Array) -> pa.Array:
        if self.repeats and len(values) >= 64:
            encoded = values.dictionary_encode()
            if len(encoded.dictionary) <= LOW_CARDINALITY * len(values):
                return kernel(encoded.dictionary).take(encoded.indices)
            self.repeats = False
        return kernel(values)


def _present(values: pa.Array) -> pa.Array:
    """True where a value is there and not blank."""
    return pc.fill_null(pc.and_(pc.greater(pc.binary_length(values), 0),
                                pc.invert(pc.utf8_is_space(values))), False)


def _blank_to_null(values: pa.Array) -> pa.Array:
    trimmed = pc.utf8_trim_whitespace(values)
    lengths = pc.binary_length(trimmed)
    if (pc.min(lengths).as_py() or 0) > 0:
        return trimmed  # nothing blank (the usual case): no second copy
    return pc.if_else(pc.greater(lengths, 0), trimmed, pa.scalar(None, pa.string()))


def _matcher(pattern: str) -> Callable[[pa.Array], pa.Array]:
    return lambda values: pc.match_substring_regex(values, pattern)


class ChunkCleaner:
    """Turns one source's raw chunks into staging rows, counting and rejecting on the way.

    `clean` keeps no state between chunks (but what it learns about cardinality), so chunks may
    be cleaned on several threads and committed in order.
    """

    def __init__(self, roles: ColumnRoles, source: Source, row_key_prefix: str,
                 keep_columns: list[str], strict_image_format: bool = False) -> None:
        self.roles = roles
        self.strict_image_format = strict_image_format
        self.label = source.label
        self.constants = source.defaults
        self.row_key_prefix = row_key_prefix
        self.keep_columns = keep_columns
        self._per_value: dict[str, _PerValue] = defaultdict(_PerValue)

    def _apply(self, column: str, kernel: Callable[[pa.Array], pa.Array],
               values: pa.Array) -> pa.Array:
        return self._per_value[column](kernel, values)

    def clean(self, chunk: RawChunk) -> CleanChunk:
        """The chunk's rows to stage, once the GBIF filter and the URL checks have passed."""
        outcome = _Outcome(self.label, chunk.rejected)
        columns, lines = self._with_constants(chunk), chunk.line_numbers
        alive = self._gbif_filter(columns, lines, outcome) if self.roles.gbif_filter else None
        # Every row's URL is checked, the ones just left out too: cheaper than picking out the
        # rows the filter keeps first, for the few it drops (the kept rows are copied once, as
        # they are staged).
        urls = normalise_urls(columns[self.roles.url])
        self._reject_urls(urls, alive, columns[self.roles.url], lines, outcome)
        kept = pc.is_null(urls.reject_reason)
        if alive is not None:
            kept = pc.and_(alive, kept)
        positions = np.flatnonzero(kept.to_numpy(zero_copy_only=False))
        count = len(positions)
        rows = self._staging_columns(columns, lines, urls.identifier, urls.server_name)
        return outcome.finish(rows, positions if count != len(lines) else None, count,
                              rows_read=len(chunk) + len(chunk.rejected))

    def _with_constants(self, chunk: RawChunk) -> dict[str, pa.Array]:
        """The chunk's columns, with the source's constant fields (DwC-A defaults) added."""
        columns = dict(chunk.columns)
        for name, value in self.constants.items():
            if name not in columns and name in self.roles.wanted:
                columns[name] = pa.repeat(pa.scalar(value, pa.string()), len(chunk))
        return columns

    def _gbif_filter(self, columns: dict[str, pa.Array], lines: pa.Array,
                     outcome: _Outcome) -> pa.Array | None:
        """GBIF's checks in turn (an id, StillImage, an image format); the rows that pass all,
        or None when the table has none of the columns to check."""
        roles = self.roles
        checks = [
            (DropReason.MISSING_GBIF_ID, roles.source_id, None),
            (DropReason.NOT_STILL_IMAGE, roles.type, STILL_IMAGE),
            (DropReason.NOT_IMAGE_FORMAT, roles.format, IMAGE_MIME_TYPE),
        ]
        alive = None  # every row, until a check removes some
        for reason, column, pattern in checks:
            if column is None:
                continue  # a DwC-A table without this column: nothing to check it by
            values = columns[column]
            ok = pc.fill_null(self._apply(column, _present if pattern is None
                                          else _matcher(pattern), values), False)
            if reason == DropReason.NOT_IMAGE_FORMAT and not self.strict_image_format:
                ok = self._rescue_loose_formats(column, values, ok, alive, outcome)
            removed = pc.invert(ok) if alive is None else pc.and_(alive, pc.invert(ok))
            count = pc.sum(removed).as_py() or 0
            outcome.dropped[reason] += count
            if count:
                outcome.left_out.append(self._dropped(reason, removed, count, lines,
                                                      columns[roles.url], values))
            alive = ok if alive is None else pc.and_(alive, ok)
        return alive

    def _rescue_loose_formats(self, column: str, values: pa.Array, ok: pa.Array,
                              alive: pa.Array | None, outcome: _Outcome) -> pa.Array:
        """Keeps the rows whose format is empty or a bare image type, as real GBIF files have
        on image rows, and counts those still alive."""
        loose = pc.fill_null(self._apply(column, _matcher(LOOSE_IMAGE_FORMAT), values), True)
        rescued = pc.and_(loose, pc.invert(ok))
        if alive is not None:
            rescued = pc.and_(alive, rescued)
        outcome.kept_without_image_format += pc.sum(rescued).as_py() or 0
        return pc.or_(ok, loose)

    def _reject_urls(self, urls: NormalisedUrls, alive: pa.Array | None, raw_urls: pa.Array,
                     lines: pa.Array, outcome: _Outcome) -> None:
        """Records the rows (of those the filter kept) whose URL cannot be downloaded."""
        refused = pc.is_valid(urls.reject_reason)
        if alive is not None:
            refused = pc.and_(alive, refused)
        for position in pc.indices_nonzero(refused).to_pylist():
            reason = RejectReason(urls.reject_reason[position].as_py())
            raw = raw_urls[position].as_py()
            outcome.rejected.append(
                RejectedRow(self.label, lines[position].as_py(), raw or "", reason))
            outcome.dropped[reason] += 1

    def _staging_columns(self, columns: dict[str, pa.Array], lines: pa.Array,
                         identifier: pa.Array, server_name: pa.Array) -> dict[str, pa.Array]:
        """The chunk's rows as staging columns (less `row_index` and `server_id`)."""
        roles = self.roles
        nothing = pa.nulls(len(lines), pa.string())
        metadata = {
            name: self._apply(column, _blank_to_null, columns[column]) if column else nothing
            for name, column in (("license", roles.license), ("source", roles.source),
                                 ("title", roles.title))
        }
        is_license_full = pc.and_(
            pc.and_(pc.is_valid(metadata["license"]), pc.is_valid(metadata["source"])),
            pc.is_valid(metadata["title"]),
        )
        return {
            "source_id": self._source_ids(columns, lines),
            "identifier": identifier,
            "is_license_full": is_license_full,
            **metadata,
            "server_name": server_name,
            **{name: columns[column] for name, column in zip(self.keep_columns, roles.keep)},
        }

    def _source_ids(self, columns: dict[str, pa.Array], lines: pa.Array) -> pa.Array:
        """The id column, trimmed; where it is blank (or there is none), the line number."""
        if self.roles.source_id is not None:
            ids = pc.utf8_trim_whitespace(columns[self.roles.source_id])
            present = pc.fill_null(pc.greater(pc.binary_length(ids), 0), False)
            if pc.all(present).as_py() is not False:
                return ids
        row_keys = pc.binary_join_element_wise(self.row_key_prefix, lines.cast(pa.string()), "")
        if self.roles.source_id is None:
            return row_keys
        return pc.if_else(present, ids, row_keys)

    def _dropped(self, reason: DropReason, removed: pa.Array, count: int, lines: pa.Array,
                 urls: pa.Array, values: pa.Array) -> pa.Table:
        return pa.Table.from_arrays(
            [pa.repeat(pa.scalar(self.label, pa.string()), count), lines.filter(removed),
             urls.filter(removed), pa.repeat(pa.scalar(str(reason), pa.string()), count),
             values.filter(removed).cast(pa.string())], schema=DROPPED)
