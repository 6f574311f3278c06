"""Chunked readers: one per physical layout (unquoted lines, quoted CSV, Parquet).

A reader knows the column names once it is opened and then yields chunks of rows as string
columns, with each row's line number, so memory stays bounded whatever the input's size. Rows
that cannot be parsed come out beside the chunk, to be rejected one by one.

Reading is sequential, parsing need not be: `jobs()` yields, in order, one callable per chunk,
which prep may run on another thread (the Arrow and CSV kernels they call release the GIL).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from distributed_downloader.errors import InputError, RejectReason

BLOCK_BYTES = 8 << 20  # text read per chunk
MAX_LINE_BYTES = 16 << 20  # a longer "line" means the file is not text
CSV_ROWS_PER_CHUNK = 50_000
PARQUET_ROWS_PER_CHUNK = 65_536
UTF8_BOM = b"\xef\xbb\xbf"
NEWLINE = ord("\n")

Opener = Callable[[], BinaryIO]


@dataclass
class RawChunk:
    """Rows as read: string columns by input name, their line numbers, and rows that failed."""

    columns: dict[str, pa.Array]
    line_numbers: pa.Array  # int64
    rejected: list[tuple[int | None, str, RejectReason]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.line_numbers)


ChunkJob = Callable[[], RawChunk]


class TableReader(Protocol):
    columns: list[str]

    def jobs(self, wanted: list[str]) -> Iterator[ChunkJob]:
        """One callable per chunk, in input order; each returns the chunk it parses."""
        ...


def _done(chunk: RawChunk) -> ChunkJob:
    return lambda: chunk


def _line_numbers(first: int, count: int) -> pa.Array:
    return pa.array(np.arange(first, first + count, dtype=np.int64))


def _binary(block: bytes | bytearray, text: bool = False) -> pa.Array:
    """A block as one binary (or string) value, without copying it."""
    offsets = pa.py_buffer(np.array([0, len(block)], np.int32))
    return pa.Array.from_buffers(pa.string() if text else pa.binary(), 1,
                                 [None, offsets, pa.py_buffer(block)])


def _has_blank_line(block: bytearray) -> bool:
    """Whether a block of whole lines holds an empty one: two newlines side by side (NumPy on
    the newlines' positions, a third of what `bytes.find` costs on a newline every line)."""
    newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == NEWLINE)
    return bool(newlines.size) and (newlines[0] == 0 or bool((np.diff(newlines) == 1).any()))


def _has_empty_row(table: pa.Table) -> bool:
    """Whether a row has every column read empty, as a blank line parses: only then need the
    block be searched for one."""
    empty = None
    for column in table.columns:
        here = pc.equal(pc.binary_length(column), 0)
        empty = here if empty is None else pc.and_(empty, here)
    return bool(pc.any(empty).as_py()) if empty is not None else False


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _decode_lines(lines: pa.Array) -> tuple[pa.Array, list[int]]:
    """Binary lines to strings; lines that are not UTF-8 become nulls and are listed."""
    try:
        return lines.cast(pa.string()), []
    except pa.ArrowInvalid:
        decoded: list[str | None] = []
        invalid: list[int] = []
        for position, value in enumerate(lines.to_pylist()):
            try:
                decoded.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                decoded.append(None)
                invalid.append(position)
        return pa.array(decoded, pa.string()), invalid


class LinesReader:
    """Unquoted text with one row per line: GBIF's tab-separated files, TSV, and TXT.

    GBIF's files are not quoted and contain stray `"` characters, so quotes mean nothing here:
    every newline ends a row and every delimiter separates fields. TXT has no delimiter (the
    whole line is the one column).
    """

    def __init__(
        self,
        open_binary: Opener,
        label: str,
        delimiter: str | None,
        header_lines: int,
        column_names: list[str] | None = None,
    ) -> None:
        self.label = label
        self.delimiter = delimiter
        self._stream = open_binary()
        self._pending = b""
        self._next_line = 1
        header = None
        for _ in range(header_lines):
            header = self._read_line()
            if header is None:
                break
        if column_names is not None:
            self.columns = column_names
        elif header is None:
            raise InputError(f"{label}: empty file (no header line)")
        else:
            self.columns = self._split_header(header)

    def _read_line(self) -> bytes | None:
        while b"\n" not in self._pending:
            more = self._stream.read(1 << 16)
            if not more:
                break
            self._pending += more
            if len(self._pending) > MAX_LINE_BYTES:
                raise InputError(f"{self.label}: line {self._next_line} is over 16 MiB; not text?")
        if not self._pending:
            return None
        line, _, self._pending = self._pending.partition(b"\n")
        if self._next_line == 1:
            line = line.removeprefix(UTF8_BOM)
        self._next_line += 1
        return line.rstrip(b"\r")

    def _split_header(self, header: bytes) -> list[str]:
        text = header.decode("utf-8", errors="replace")
        names = text.split(self.delimiter) if self.delimiter else [text]
        return [name.strip() for name in names]

    def _fill(self, view: memoryview) -> int:
        """Reads into `view` until it is full or the input ends; returns the bytes read."""
        filled = 0
        while filled < len(view):
            count = self._stream.readinto(view[filled:])  # type: ignore[attr-defined]
            if not count:
                break
            filled += count
        return filled

    def _blocks(self) -> Iterator[bytearray]:
        """Whole lines, a few MiB at a time, each block a buffer of its own (read into, not
        copied, since parsing may still hold the previous one)."""
        while True:
            pending = self._pending
            block = bytearray(len(pending) + BLOCK_BYTES)
            block[: len(pending)] = pending
            size = len(pending) + self._fill(memoryview(block)[len(pending):])
            if size == len(pending):
                if pending:
                    yield bytearray(pending)
                return
            del block[size:]
            if self._next_line == 1 and not pending and block.startswith(UTF8_BOM):
                del block[: len(UTF8_BOM)]
            cut = block.rfind(b"\n")
            if cut < 0:
                if len(block) > MAX_LINE_BYTES:
                    raise InputError(
                        f"{self.label}: line {self._next_line} is over 16 MiB; not text?"
                    )
                self._pending = bytes(block)
                continue
            self._pending = bytes(block[cut + 1 :])
            del block[cut + 1 :]
            yield block

    def jobs(self, wanted: list[str]) -> Iterator[ChunkJob]:
        positions = {name: self.columns.index(name) for name in wanted}
        try:
            for block in self._blocks():
                newlines = np.count_nonzero(np.frombuffer(block, np.uint8) == NEWLINE)
                count = int(newlines) + (not block.endswith(b"\n"))
                first = self._next_line
                self._next_line += count
                yield partial(self._parse, block, first, count, positions)
        finally:
            self._stream.close()

    def _parse(
        self, block: bytearray, first: int, count: int, positions: dict[str, int]
    ) -> RawChunk:
        chunk = self._parse_clean(block, first, count, positions)
        if chunk is not None:
            return chunk
        lines = pc.split_pattern(_binary(block), b"\n").flatten()
        if block.endswith(b"\n"):
            lines = lines.slice(0, len(lines) - 1)
        return self._parse_lines(lines, first, positions, len(self.columns))

    def _parse_clean(
        self, block: bytearray, first: int, count: int, positions: dict[str, int]
    ) -> RawChunk | None:
        """A block with nothing to reject or skip, in one pass of Arrow's CSV parser; None
        when it holds a blank line (skipped, where the parser would make it a row of empty
        fields), a CR that does not end a line, bytes that are not UTF-8 or a row of the wrong
        width (then `_parse_lines` looks at it line by line)."""
        if self.delimiter is None or block.startswith(UTF8_BOM):
            return None  # (a BOM: the parser would drop it from the first field)
        if block.find(b"\r") >= 0:
            if block.count(b"\r") != block.count(b"\r\n"):
                return None
            if block.startswith(b"\r\n") or block.find(b"\n\r\n") >= 0:
                return None  # a line holding only a CR: blank too
        try:
            _binary(block, text=True).validate(full=True)  # checks the UTF-8
            table = pa_csv.read_csv(
                pa.py_buffer(block),
                read_options=pa_csv.ReadOptions(
                    column_names=self.columns, use_threads=False, block_size=len(block) + 1),
                parse_options=pa_csv.ParseOptions(
                    delimiter=self.delimiter, quote_char=False, escape_char=False,
                    newlines_in_values=False, ignore_empty_lines=False),
                convert_options=pa_csv.ConvertOptions(
                    include_columns=list(positions),
                    column_types={name: pa.string() for name in positions},
                    strings_can_be_null=False, check_utf8=False),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        if table.num_rows != count or _has_empty_row(table) and _has_blank_line(block):
            return None
        return RawChunk(
            columns={name: _one_chunk(table.column(name)) for name in positions},
            line_numbers=_line_numbers(first, count),
        )

    def _parse_lines(
        self, lines: pa.Array, first: int, positions: dict[str, int], expected: int
    ) -> RawChunk:
        text, invalid = _decode_lines(lines)
        numbers = _line_numbers(first, len(lines))
        rejected: list[tuple[int | None, str, RejectReason]] = [
            (first + i, lines[i].as_py().decode("utf-8", "backslashreplace"),
             RejectReason.INVALID_UTF8)
            for i in invalid
        ]
        text = pc.utf8_rtrim(text, "\r")
        keep = pc.and_(pc.is_valid(text), pc.greater(pc.utf8_length(text), 0))
        if self.delimiter is None:
            keep = pc.fill_null(keep, False)
            return RawChunk(
                columns={name: text.filter(keep) for name in positions},
                line_numbers=numbers.filter(keep),
                rejected=rejected,
            )
        fields = pc.split_pattern(text, self.delimiter)
        well_formed = pc.equal(pc.list_value_length(fields), expected)
        malformed = pc.fill_null(pc.and_(keep, pc.invert(well_formed)), False)
        for position in pc.indices_nonzero(malformed).to_pylist():
            rejected.append((first + position, text[position].as_py(), RejectReason.MALFORMED_ROW))
        keep = pc.fill_null(pc.and_(keep, well_formed), False)
        fields = fields.filter(keep)
        return RawChunk(
            columns={name: pc.list_element(fields, i) for name, i in positions.items()},
            line_numbers=numbers.filter(keep),
            rejected=sorted(rejected, key=lambda row: row[0] or 0),
        )


class CsvReader:
    """Quoted CSV (RFC 4180 style), where a quoted field may hold delimiters and newlines."""

    def __init__(
        self,
        open_binary: Opener,
        label: str,
        delimiter: str = ",",
        header_lines: int = 1,
        column_names: list[str] | None = None,
    ) -> None:
        self.label = label
        csv.field_size_limit(MAX_LINE_BYTES)
        self._text = io.TextIOWrapper(
            open_binary(), encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
        self._reader = csv.reader(self._text, delimiter=delimiter)
        header = None
        for _ in range(header_lines):
            header = next(self._reader, None)
        if column_names is not None:
            self.columns = column_names
        elif header is None:
            raise InputError(f"{label}: empty file (no header line)")
        else:
            self.columns = [name.strip() for name in header]

    def _rows(self) -> Iterator[tuple[int, list[str] | None, str | None]]:
        """(first line, fields) per record, or (first line, None, error) when it fails."""
        while True:
            first_line = self._reader.line_num + 1
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield first_line, None, str(exc)
                continue
            yield first_line, row, None

    def jobs(self, wanted: list[str]) -> Iterator[ChunkJob]:
        return map(_done, self._chunks(wanted))

    def _chunks(self, wanted: list[str]) -> Iterator[RawChunk]:
        positions = [self.columns.index(name) for name in wanted]
        expected = len(self.columns)
        batch: list[tuple[int, list[str]]] = []
        rejected: list[tuple[int | None, str, RejectReason]] = []
        try:
            for line, row, error in self._rows():
                if row is None:
                    rejected.append((line, error or "", RejectReason.MALFORMED_ROW))
                elif not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                elif len(row) != expected:
                    raw = ",".join(row).encode("utf-8", "surrogateescape")
                    raw_text = raw.decode("utf-8", "backslashreplace")
                    rejected.append((line, raw_text, RejectReason.MALFORMED_ROW))
                else:
                    batch.append((line, row))
                if len(batch) >= CSV_ROWS_PER_CHUNK:
                    yield self._chunk(batch, rejected, wanted, positions)
                    batch, rejected = [], []
            if batch or rejected:
                yield self._chunk(batch, rejected, wanted, positions)
        finally:
            self._text.close()

    @staticmethod
    def _chunk(
        batch: list[tuple[int, list[str]]],
        rejected: list[tuple[int | None, str, RejectReason]],
        wanted: list[str],
        positions: list[int],
    ) -> RawChunk:
        good: list[tuple[int, list[str]]] = []
        for line, row in batch:
            try:
                for position in positions:
                    row[position].encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, kept as surrogates
                raw = ",".join(row).encode("utf-8", "surrogateescape")
                rejected.append(
                    (line, raw.decode("utf-8", "backslashreplace"), RejectReason.INVALID_UTF8)
                )
                continue
            good.append((line, row))
        columns = {
            name: pa.array([row[position] for _, row in good], pa.string())
            for name, position in zip(wanted, positions)
        }
        numbers = pa.array([line for line, _ in good], pa.int64())
        return RawChunk(columns=columns, line_numbers=numbers, rejected=rejected)


class ParquetReader:
    """A Parquet file, read a row group's slice at a time; every column read as a string."""

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{label}: not a readable Parquet file ({exc})") from None
        self.columns = list(self._file.schema_arrow.names)

    def jobs(self, wanted: list[str]) -> Iterator[ChunkJob]:
        return map(_done, self._chunks(wanted))

    def _chunks(self, wanted: list[str]) -> Iterator[RawChunk]:
        next_row = 1
        try:
            for batch in self._file.iter_batches(
                batch_size=PARQUET_ROWS_PER_CHUNK, columns=wanted
            ):
                columns = {}
                for name in wanted:
                    column = batch.column(name)
                    try:
                        columns[name] = column.cast(pa.string())
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        raise InputError(
                            f"{self.label}: column '{name}' of type {column.type} cannot be read "
                            f"as text ({exc})"
                        ) from None
                yield RawChunk(columns=columns, line_numbers=_line_numbers(next_row, len(batch)))
                next_row += len(batch)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{self.label}: Parquet file broken near row {next_row} ({exc})"
            ) from None
