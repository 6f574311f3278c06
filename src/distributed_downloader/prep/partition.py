"""UUIDs, duplicate URLs, and batches by server, out of core.

DuckDB does the work that needs the whole input at once under a memory limit, spilling to disk
beyond it: it finds the URLs that occur more than once (few) and numbers only their rows, and
sorts the rows to download by server. The sorted rows then stream through Python: a thread pulls
them and formats their UUIDs from DuckDB's SHA-1 digests, a couple of batches ahead of the one
that cuts each server's rows into batches (written on a few threads), so DuckDB sorts the next
staging file while the last one's batches are still being cut and written.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Settings
from distributed_downloader.prep.previous import (
    create_previous_tables,
    overlap_by_server,
    overlap_totals,
)
from distributed_downloader.schema import (
    BATCH,
    REUSE_NAMES,
    SERVERS,
    batch_schema,
    duplicates_schema,
)
from distributed_downloader.storage import (
    PARQUET_COMPRESSION,
    RunLayout,
    batch_folder,
    sql_path,
)

# Deterministic UUIDs are version 5 in this namespace, of "source_id\nURL" (with "\nK" added for
# the K-th repeat of the same pair), so the same input always gets the same UUIDs.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://pypi.org/project/distributed-downloader/")
BATCH_FILE_NAME = "part-0.parquet"
ROWS_PER_FETCH = 20_000  # rows per Arrow batch from DuckDB: a small batch keeps memory down
# Sorted batches fetched ahead of the cutter (a few MiB each): DuckDB sorts the next staging file
# while the rows of the last one are still being cut and written.
BATCHES_AHEAD = 2
WRITE_THREADS = 2  # batch files compressed at once; the writes release the GIL
HEX_DIGEST = 40  # characters of a SHA-1 digest in hex
# The staged rows are kept in a few files by server (server number modulo their count), each
# file holding whole servers: the rows to download are then sorted by server one file at a
# time, a sort that mostly fits in memory where one sort of every row spills to disk.
STAGING_FILES = 8
# Batch columns that differ on (almost) every row: a dictionary would only add to their size
# and cost (GBIF's titles name one specimen each).
UNIQUE_PER_ROW = ("uuid", "source_id", "identifier", "title")
# Columns whose minimum and maximum in a batch file would skip nothing for a reader (random
# UUIDs, free text): no statistics computed for them.
NO_STATISTICS = ("uuid", "title")
# Too small in a batch file to gain from compression (a bit a row): not compressed, which
# spares a compressor's set-up per file.
UNCOMPRESSED = ("is_license_full",)


def uuid_v5_sql(name_sql: str) -> tuple[str, str]:
    """SQL for a UUID v5 in two projections: the SHA-1 digest, then its formatting (RFC 9562)."""
    digest = f"sha1(unhex('{UUID_NAMESPACE.hex}') || encode({name_sql}))"
    formatted = (
        "substr(digest, 1, 8) || '-' || substr(digest, 9, 4) || '-5' || substr(digest, 14, 3)"
        " || '-' || substr('89ab89ab89ab89ab', position(substr(digest, 17, 1) IN "
        "'0123456789abcdef'), 1) || substr(digest, 18, 3) || '-' || substr(digest, 21, 12)"
    )
    return digest, formatted


def uuid_v5_python(source_id: str, identifier: str, repeat: int = 0) -> str:
    """The same UUID as the SQL above, for tests and for anyone checking provenance by hand."""
    name = f"{source_id}\n{identifier}" + (f"\n{repeat}" if repeat else "")
    return str(uuid.uuid5(UUID_NAMESPACE, name))


# The UUID's variant nibble, by the digest's hex character in that place: 10xx (RFC 9562).
_VARIANT = np.zeros(256, np.uint8)
for _nibble, _char in enumerate(b"0123456789abcdef"):
    _VARIANT[_char] = b"89ab"[_nibble & 3]
UUID_TEXT = 36
# Which characters of the UUID come from which of the digest: (UUID start, digest start, count).
_FROM_DIGEST = ((0, 0, 8), (9, 8, 4), (15, 13, 3), (20, 17, 3), (24, 20, 12))


def format_uuids(digests: pa.Array) -> pa.Array:
    """UUID v5 strings from hex SHA-1 digests, as `uuid_v5_sql`'s formatting gives them, with
    NumPy on the digests' bytes (every digest has the same length)."""
    digests = digests.cast(pa.string())
    count = len(digests)
    offsets = np.frombuffer(digests.buffers()[1], np.int32)[digests.offset:][: count + 1]
    if digests.null_count or count and offsets[-1] - offsets[0] != HEX_DIGEST * count:
        raise ValueError("format_uuids takes 40-character hex digests, no nulls")
    data = np.frombuffer(digests.buffers()[2], np.uint8)[offsets[0]:][: HEX_DIGEST * count]
    hexes = data.reshape(count, HEX_DIGEST)
    text = np.empty((count, UUID_TEXT), np.uint8)
    for start, source, length in _FROM_DIGEST:  # a few strided copies, not a gather per byte
        text[:, start:start + length] = hexes[:, source:source + length]
    text[:, [8, 13, 18, 23]] = ord("-")
    text[:, 14] = ord("5")
    text[:, 19] = _VARIANT[hexes[:, 16]]
    return pa.Array.from_buffers(
        pa.string(), count,
        [None, pa.py_buffer(np.arange(0, UUID_TEXT * (count + 1), UUID_TEXT, dtype=np.int32)),
         pa.py_buffer(text)])


def staging_paths(work: Path) -> list[Path]:
    return [work / f"staging-{number}.parquet" for number in range(STAGING_FILES)]


def staging_file_of(server_ids: pa.Array) -> np.ndarray:
    """Which of the staging files holds each row, by its server's number."""
    return server_ids.to_numpy() % STAGING_FILES


class ServerNumbers:
    """Numbers servers in the order they first appear, so DuckDB sorts by an integer."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._numbers: dict[str, int] = {}

    def of(self, server_names: pa.Array) -> pa.Array:
        encoded = server_names.dictionary_encode()
        numbers = []
        for name in encoded.dictionary.to_pylist():
            number = self._numbers.get(name)
            if number is None:
                number = self._numbers[name] = len(self.names)
                self.names.append(name)
            numbers.append(number)
        return pa.array(numbers, pa.int32()).take(encoded.indices)


@dataclass
class ServerBatches:
    server_name: str
    rows: int = 0
    batches: int = 0
    reused_rows: int = 0


@dataclass
class PartitionResult:
    download_rows: int
    duplicates: int
    servers: list[ServerBatches] = field(default_factory=list)
    overlap: dict[str, Any] | None = None  # with --previous: distinct URLs by kind

    @property
    def batches(self) -> int:
        return sum(server.batches for server in self.servers)


class BatchCutter:
    """Cuts rows sorted by server into numbered batch files of at most `batch_size` rows."""

    def __init__(self, root: Path, batch_size: int, schema: pa.Schema,
                 server_names: list[str]) -> None:
        self.root = root
        self.batch_size = batch_size
        self.schema = schema
        self.server_names = server_names
        self.servers: list[ServerBatches] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._dictionary = [name for name in schema.names if name not in UNIQUE_PER_ROW]
        self._statistics = [name for name in schema.names if name not in NO_STATISTICS]
        self._compression = {name: "none" if name in UNCOMPRESSED else PARQUET_COMPRESSION
                             for name in schema.names}
        self._pool = ThreadPoolExecutor(WRITE_THREADS)
        self._writes: deque[Future] = deque()

    def add(self, rows: pa.RecordBatch) -> None:
        """Rows with a leading `server_id` column, in server order."""
        if not rows.num_rows:
            return
        numbers = rows.column(0)
        changes = pc.indices_nonzero(
            pc.not_equal(numbers.slice(1), numbers.slice(0, len(numbers) - 1))
        ).to_pylist()
        starts = [0] + [i + 1 for i in changes]
        ends = starts[1:] + [len(numbers)]
        for start, end in zip(starts, ends):
            server = self.server_names[numbers[start].as_py()]
            if not self.servers or self.servers[-1].server_name != server:
                self._flush(final=True)
                self.servers.append(ServerBatches(server))
            self._pending.append(rows.slice(start, end - start))
            self._pending_rows += end - start
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending)
        offset = 0
        while self._pending_rows - offset >= self.batch_size or (final and offset < len(table)):
            size = min(self.batch_size, len(table) - offset)
            self._write(table.slice(offset, size))
            offset += size
        rest = table.slice(offset)
        self._pending = rest.to_batches()
        self._pending_rows = len(rest)

    def _write(self, rows: pa.Table) -> None:
        server = self.servers[-1]
        folder = batch_folder(self.root, server.server_name, server.batches)
        while len(self._writes) >= 2 * WRITE_THREADS:
            self._writes.popleft().result()
        self._writes.append(self._pool.submit(self._write_file, rows, folder))
        server.rows += len(rows)
        server.batches += 1
        if "reuse_from" in rows.column_names:
            reused = pc.or_(pc.is_valid(rows["reuse_from"]),
                            pc.is_valid(rows["reuse_error_code"]))
            server.reused_rows += pc.sum(reused).as_py() or 0

    def _write_file(self, rows: pa.Table, folder: Path) -> None:
        """One batch file, on a write thread: what can wait (the folder, the columns, the
        compression) is done there, so that the thread cutting the rows moves on."""
        table = rows.drop_columns(["server_id"])
        if table.schema != self.schema:
            table = table.cast(self.schema)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / BATCH_FILE_NAME, compression=self._compression,
                       use_dictionary=self._dictionary, write_statistics=self._statistics)

    def finish(self) -> list[ServerBatches]:
        self._flush(final=True)
        self.close()
        return self.servers

    def close(self) -> None:
        """Waits for the writes under way; the first that failed raises."""
        try:
            while self._writes:
                self._writes.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _connect(work: Path, settings: Settings) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(work / "prep.duckdb"))
    con.execute(f"SET memory_limit = '{settings.prep.memory_limit}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def _digests_to_uuids(rows: pa.RecordBatch) -> pa.RecordBatch:
    """The `uuid` column of a fetched batch, from the digests DuckDB computed in its place."""
    position = rows.schema.get_field_index("uuid")
    return rows.set_column(position, "uuid", format_uuids(rows.column(position)))


# The name a deterministic UUID is made of: "source_id\nURL", and "\nK" for the K-th repeat.
PAIR_NAME_SQL = ("source_id || chr(10) || identifier || CASE WHEN pair_repeat > 0 "
                 "THEN chr(10) || pair_repeat::VARCHAR ELSE '' END")


@dataclass(frozen=True)
class _UuidSql:
    """Where the queries give rows their UUIDs. Deterministic UUIDs of the rows to download are
    computed after the sort by server, so that the sort does not carry them."""

    deterministic: bool
    named: str  # the numbered rows of repeated URLs, with their UUIDs
    after_sort: str  # the UUID column of the rows to download
    once: str  # what a row whose URL occurs once carries into the sort (it is repeat 0)
    repeated: str  # what the row carrying a repeated URL carries into the sort


def _uuid_sql(deterministic: bool) -> _UuidSql:
    if not deterministic:
        return _UuidSql(False, named="SELECT *, uuid()::VARCHAR AS uuid FROM numbered",
                        after_sort="coalesce(uuid, uuid()::VARCHAR) AS uuid",
                        once="NULL::VARCHAR AS uuid", repeated="uuid")
    digest, formatted = uuid_v5_sql(PAIR_NAME_SQL)
    named = f"""
        SELECT * EXCLUDE (digest), {formatted} AS uuid FROM (
            SELECT *, {digest} AS digest FROM numbered)"""
    return _UuidSql(True, named=named, after_sort=f"{digest} AS uuid",
                    once="0 AS pair_repeat", repeated="pair_repeat")


def _number_repeats(con: duckdb.DuckDBPyConnection, staging: list[Path], uuids: _UuidSql,
                    keep_duplicates: bool) -> None:
    """Table `repeats`: the rows of URLs seen more than once, each with its pair's repeat
    number, its UUID and the UUID of the row that carries its URL (the first, unless every
    duplicate is kept)."""
    # URLs seen more than once, found by their 64-bit hash (8 bytes to aggregate, not the
    # URL): a hash seen twice makes its rows candidates, which are then counted by URL. All
    # rows of a URL are in its server's staging file, so each file is aggregated alone (smaller
    # hash tables).
    repeated_in_each = " UNION ALL ".join(
        f"SELECT hash FROM (SELECT hash(identifier) AS hash FROM read_parquet({sql_path(path)}))"
        " GROUP BY hash HAVING count(*) > 1" for path in staging)
    con.execute(f"CREATE TEMP TABLE repeated_hashes AS {repeated_in_each}")
    carrier = (
        "uuid" if keep_duplicates
        else "first_value(uuid) OVER (PARTITION BY identifier ORDER BY row_index)"
    )
    con.execute(f"""
        CREATE TEMP TABLE repeats AS
        WITH candidates AS (
            SELECT *, count(*) OVER (PARTITION BY identifier) AS occurrences
            FROM prepared SEMI JOIN repeated_hashes ON hash(identifier) = hash),
        numbered AS (
            SELECT * EXCLUDE (occurrences), row_number() OVER (
                PARTITION BY source_id, identifier ORDER BY row_index) - 1 AS pair_repeat
            FROM candidates WHERE occurrences > 1)
        SELECT *, {carrier} AS carrier_uuid FROM ({uuids.named})""")


def _write_duplicates(con: duckdb.DuckDBPyConnection, path: Path,
                      keep_columns: list[str]) -> int:
    """The rows whose URL another row carries, in input order; returns how many."""
    carried = ", ".join(f'"{name}"' for name in [*BATCH.names, *keep_columns])
    duplicates = con.sql(
        f"SELECT {carried}, server_name, carrier_uuid FROM repeats "
        "WHERE uuid <> carrier_uuid ORDER BY row_index"
    ).to_arrow_reader(ROWS_PER_FETCH)
    schema = duplicates_schema(keep_columns)
    count = 0
    with pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION) as out:
        for rows in duplicates:
            out.write_table(pa.Table.from_batches([rows]).cast(schema))
            count += rows.num_rows
    return count


def _compare_with_previous(con: duckdb.DuckDBPyConnection, work: Path,
                           previous: list[RunLayout]) -> dict[str, Any]:
    """Tables of what earlier downloads hold, `work/overlap.parquet`; returns its totals."""
    create_previous_tables(con, previous)
    by_server = overlap_by_server(con)
    pq.write_table(by_server, work / "overlap.parquet", compression=PARQUET_COMPRESSION)
    return overlap_totals(by_server)


def _sorted_batches(con: duckdb.DuckDBPyConnection, staging: list[Path], uuids: _UuidSql,
                    keep_columns: list[str], reuse: bool) -> Iterator[pa.RecordBatch]:
    """The rows to download, sorted by server one staging file at a time, with their UUIDs. A
    row whose URL occurs once is the first of its pair (pair_repeat 0); a repeated URL's row
    downloads it only if it carries it."""
    payload = ", ".join(f'"{name}"' for name in [*BATCH.names[1:], *keep_columns])
    reused = "".join(f", {name}" for name in REUSE_NAMES) if reuse else ""
    joined = "LEFT JOIN previous_outcome USING (identifier)" if reuse else ""
    for number, path in enumerate(staging):
        download = con.sql(f"""
            SELECT server_id, {uuids.after_sort}, {payload}{reused} FROM (
                SELECT * FROM (
                    SELECT server_id, row_index, {uuids.once}, {payload}
                    FROM read_parquet({sql_path(path)}) ANTI JOIN repeats USING (row_index)
                    UNION ALL
                    SELECT server_id, row_index, {uuids.repeated}, {payload}
                    FROM repeats WHERE uuid = carrier_uuid
                        AND server_id % {len(staging)} = {number}
                ) {joined}
                ORDER BY server_id, row_index)""").to_arrow_reader(ROWS_PER_FETCH)
        for rows in download:
            yield _digests_to_uuids(rows) if uuids.deterministic else rows


@dataclass
class _Failed:
    error: BaseException


_END = object()


def _read_ahead(items: Iterator[Any], depth: int,
                interrupt: Callable[[], None] | None = None) -> Iterator[Any]:
    """`items`, pulled on a thread of their own at most `depth` ahead of the caller (the pull
    stops, and its thread is joined, when the caller stops iterating; its error is raised in
    the caller). A pull still busy then is `interrupt`ed until it ends (DuckDB forgets an
    interrupt sent between two queries, so once is not enough)."""
    ahead: queue.Queue = queue.Queue(depth)
    stopped = threading.Event()

    def put(item: Any) -> bool:
        while not stopped.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def pull() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            put(_Failed(exc))

    thread = threading.Thread(target=pull, name="prep-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stopped.set()
        thread.join(0.1)
        while thread.is_alive():
            if interrupt is not None:
                interrupt()
            thread.join(0.1)


def _cut_batches(con: duckdb.DuckDBPyConnection, cutter: BatchCutter, staging: list[Path],
                 uuids: _UuidSql, keep_columns: list[str], reuse: bool) -> list[ServerBatches]:
    """Streams the rows to download into the cutter, sorted by server a staging file at a
    time, the next file sorted while the last one's rows are cut."""
    con.execute("SET preserve_insertion_order = true")  # for the projection after the sort
    batches = _read_ahead(_sorted_batches(con, staging, uuids, keep_columns, reuse),
                          BATCHES_AHEAD, interrupt=con.interrupt)
    try:
        for rows in batches:
            cutter.add(rows)
        return cutter.finish()
    finally:
        batches.close()  # the DuckDB connection is used by no other thread from here
        cutter.close()


def _write_servers(servers: list[ServerBatches], path: Path) -> None:
    servers.sort(key=lambda s: (-s.rows, s.server_name))
    table = pa.table(
        {
            "server_name": [s.server_name for s in servers],
            "rows": [s.rows for s in servers],
            "batches": [s.batches for s in servers],
            "reused_rows": [s.reused_rows for s in servers],
        },
        schema=SERVERS,
    )
    pq.write_table(table, path, compression=PARQUET_COMPRESSION)


def build_batches(
    staging: list[Path], work: Path, settings: Settings, keep_columns: list[str],
    server_names: list[str], previous: list[RunLayout] | None = None,
) -> PartitionResult:
    """Write `work/batches/`, `work/duplicates.parquet` and `work/servers.parquet` (and, with
    earlier downloads, `work/overlap.parquet`) from the staging files (file K holding the rows
    of the servers numbered K modulo their count).

    Only the rows of URLs that occur more than once need numbering (which of a repeated
    (source id, URL) pair a row is, which row carries the URL): DuckDB finds those URLs with
    one hash aggregation and numbers their rows alone. Every other row downloads its URL
    under the UUID of its pair, computed in the query that sorts the rows by server."""
    uuids = _uuid_sql(settings.prep.uuid != "random")
    con = _connect(work, settings)
    try:
        files = ", ".join(sql_path(path) for path in staging)
        con.execute(f"CREATE VIEW prepared AS SELECT * FROM read_parquet([{files}])")
        _number_repeats(con, staging, uuids, settings.prep.keep_duplicates)
        duplicates = _write_duplicates(con, work / "duplicates.parquet", keep_columns)
        overlap = _compare_with_previous(con, work, previous) if previous else None
        (work / "batches").mkdir()
        cutter = BatchCutter(work / "batches", settings.prep.batch_size,
                             batch_schema(keep_columns, reuse=bool(previous)), server_names)
        servers = _cut_batches(con, cutter, staging, uuids, keep_columns,
                               reuse=bool(previous))
    finally:
        con.close()
    _write_servers(servers, work / "servers.parquet")
    return PartitionResult(
        download_rows=sum(s.rows for s in servers), duplicates=duplicates, servers=servers,
        overlap=overlap,
    )
