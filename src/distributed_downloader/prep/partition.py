"""UUIDs, duplicate URLs, and batches by server, out of core.

DuckDB does the work that needs the whole input at once (numbering repeated pairs, finding the
first row of every URL, sorting by server) under a memory limit, spilling to disk beyond it.
The sorted rows then stream through Python, which cuts each server's rows into batches.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
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
from distributed_downloader.storage import PARQUET_COMPRESSION, RunLayout, batch_folder

# Deterministic UUIDs are version 5 in this namespace, of "source_id\nURL" (with "\nK" added for
# the K-th repeat of the same pair), so the same input always gets the same UUIDs.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://pypi.org/project/distributed-downloader/")
BATCH_FILE_NAME = "part-0.parquet"
ROWS_PER_FETCH = 100_000


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

    def __init__(self, root: Path, batch_size: int, schema: pa.Schema) -> None:
        self.root = root
        self.batch_size = batch_size
        self.schema = schema
        self.servers: list[ServerBatches] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, rows: pa.RecordBatch) -> None:
        """Rows with a leading `server_name` column, in server order."""
        names = rows.column(0)
        changes = pc.indices_nonzero(
            pc.not_equal(names.slice(1), names.slice(0, len(names) - 1))
        ).to_pylist()
        starts = [0] + [i + 1 for i in changes]
        ends = starts[1:] + [len(names)]
        for start, end in zip(starts, ends):
            server = names[start].as_py()
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
        folder.mkdir(parents=True, exist_ok=True)
        table = rows.drop_columns(["server_name"]).cast(self.schema)
        pq.write_table(table, folder / BATCH_FILE_NAME, compression=PARQUET_COMPRESSION)
        server.rows += len(rows)
        server.batches += 1
        if "reuse_from" in table.column_names:
            reused = pc.or_(pc.is_valid(table["reuse_from"]),
                            pc.is_valid(table["reuse_error_code"]))
            server.reused_rows += pc.sum(reused).as_py() or 0

    def finish(self) -> list[ServerBatches]:
        self._flush(final=True)
        return self.servers


def _connect(work: Path, settings: Settings) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(work / "prep.duckdb"))
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def build_batches(
    staging: Path, work: Path, settings: Settings, keep_columns: list[str],
    previous: list[RunLayout] | None = None,
) -> PartitionResult:
    """Write `work/batches/`, `work/duplicates.parquet` and `work/servers.parquet` (and, with
    earlier downloads, `work/overlap.parquet`)."""
    con = _connect(work, settings)
    overlap = None
    try:
        carried = ", ".join(f'"{name}"' for name in [*BATCH.names, *keep_columns])
        if settings.uuid == "random":
            identified = f"SELECT *, uuid()::VARCHAR AS uuid FROM read_parquet('{staging}')"
        else:
            digest, formatted = uuid_v5_sql(
                "source_id || chr(10) || identifier || CASE WHEN pair_repeat > 0 "
                "THEN chr(10) || pair_repeat::VARCHAR ELSE '' END"
            )
            identified = f"""
                SELECT * EXCLUDE (digest), {formatted} AS uuid FROM (
                    SELECT * EXCLUDE (pair_repeat), {digest} AS digest FROM (
                        SELECT *, row_number() OVER (
                            PARTITION BY source_id, identifier ORDER BY row_index) - 1
                            AS pair_repeat
                        FROM read_parquet('{staging}')))"""
        carrier = (
            "uuid" if settings.keep_duplicates
            else "first_value(uuid) OVER (PARTITION BY identifier ORDER BY row_index)"
        )
        con.execute(
            f"CREATE TABLE prepared AS SELECT *, {carrier} AS carrier_uuid FROM ({identified})"
        )
        duplicates_path = work / "duplicates.parquet"
        duplicates = con.sql(
            f"SELECT {carried}, server_name, carrier_uuid FROM prepared "
            "WHERE uuid <> carrier_uuid ORDER BY row_index"
        ).fetch_arrow_reader(ROWS_PER_FETCH)
        dup_schema = duplicates_schema(keep_columns)
        duplicate_count = 0
        with pq.ParquetWriter(duplicates_path, dup_schema, compression=PARQUET_COMPRESSION) as out:
            for rows in duplicates:
                out.write_table(pa.Table.from_batches([rows]).cast(dup_schema))
                duplicate_count += rows.num_rows

        reuse, joined = "", ""
        if previous:
            create_previous_tables(con, previous)
            by_server = overlap_by_server(con)
            pq.write_table(by_server, work / "overlap.parquet", compression=PARQUET_COMPRESSION)
            overlap = overlap_totals(by_server)
            reuse = ", " + ", ".join(f"previous_outcome.{name}" for name in REUSE_NAMES)
            joined = "LEFT JOIN previous_outcome USING (identifier)"
        cutter = BatchCutter(work / "batches", settings.batch_size,
                             batch_schema(keep_columns, reuse=bool(previous)))
        (work / "batches").mkdir()
        download = con.sql(
            f"SELECT server_name, {carried}{reuse} FROM prepared {joined} "
            "WHERE uuid = carrier_uuid ORDER BY server_name, row_index"
        ).fetch_arrow_reader(ROWS_PER_FETCH)
        for rows in download:
            cutter.add(rows)
        servers = cutter.finish()
    finally:
        con.close()

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
    pq.write_table(table, work / "servers.parquet", compression=PARQUET_COMPRESSION)
    return PartitionResult(
        download_rows=sum(s.rows for s in servers), duplicates=duplicate_count, servers=servers,
        overlap=overlap,
    )
