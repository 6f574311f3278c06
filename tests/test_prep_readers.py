"""Unquoted text: a block read in one pass of Arrow's CSV parser gives exactly what reading it line
by line gives, and a block the fast path cannot vouch for is read line by line."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from distributed_downloader.prep.readers import LinesReader

COLUMNS = ["gbifID", "type", "identifier"]
HEADER = "\t".join(COLUMNS).encode() + b"\n"
FIELDS = st.sampled_from(
    ["1", "", " ", "StillImage", 'a "quoted" one', "http://h.localhost/a.jpg", "é", "x,y",
     "\ufeffz"]
)
ROW = st.lists(FIELDS, min_size=3, max_size=3).map(lambda fields: "\t".join(fields).encode())
# What real files hold besides good rows, each of which the fast path must leave alone.
ODD = st.sampled_from([b"", b"\r", b"1\t2", b"1\t2\t3\t4", b"1\tStill\xe9\tx", b"a\rb\tc\td",
                       b"1\tStillImage\tx\r", b"1\t2\t3\r\r", b"\xef\xbb\xbf1\t2\t3"])


def read_block(block: bytes, fast: bool) -> tuple[dict, list, list]:
    reader = LinesReader(lambda: io.BytesIO(HEADER + block), "test", "\t", header_lines=1)
    if not fast:
        reader._parse_clean = lambda *args: None  # type: ignore[method-assign]
    chunks = [job() for job in reader.jobs(COLUMNS)]
    columns = {name: [value for c in chunks for value in c.columns[name].to_pylist()]
               for name in COLUMNS}
    lines = [line for c in chunks for line in c.line_numbers.to_pylist()]
    return columns, lines, [row for c in chunks for row in c.rejected]


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.one_of(ROW, ROW, ROW, ODD), min_size=1, max_size=12),
       crlf=st.booleans(), last_newline=st.booleans())
def test_fast_path_agrees_with_reading_line_by_line(rows: list[bytes], crlf: bool,
                                                     last_newline: bool) -> None:
    block = (b"\r\n" if crlf else b"\n").join(rows) + (b"\n" if last_newline else b"")
    assert read_block(block, fast=True) == read_block(block, fast=False)


def test_a_clean_block_takes_the_fast_path_and_an_odd_one_does_not() -> None:
    reader = LinesReader(lambda: io.BytesIO(HEADER + b"1\tStillImage\tu\r\n2\t\tv\n"), "test",
                         "\t", header_lines=1)
    positions = {name: i for i, name in enumerate(COLUMNS)}
    chunk = reader._parse_clean(bytearray(b"1\tStillImage\tu\r\n2\t\tv\n"), 2, 2, positions)
    assert chunk is not None
    assert chunk.columns["type"].to_pylist() == ["StillImage", ""]
    assert chunk.line_numbers.to_pylist() == [2, 3]
    for odd in (b"1\t2\t3\n\n4\t5\t6\n", b"1\t2\r3\t4\n", b"1\t\xff\t3\n", b"1\t2\n"):
        count = odd.count(b"\n")
        assert reader._parse_clean(bytearray(odd), 2, count, positions) is None, odd
