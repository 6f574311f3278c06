"""Incremental snapshots: what earlier downloads (`--previous OUT`) already hold for this input.

A URL that an earlier download stored is not requested again: its rows are batched as usual but
carry where the image lives (`reuse_from`, the earlier batch's folder, and `reuse_uuid`), and the
fetch worker writes them as successes without a request: linking to the earlier files (the
default, `--previous-mode link`) or copying the image (`copy`). A URL that failed for good there
(a 404, say) keeps that error (`reuse_error_*`); one that failed in a way that may pass now
(timeouts, 5xx, ...) or was never fetched is fetched again. Earlier outputs are searched in
the order given; links always point to where the bytes are, never to another link.

prep also reports the overlap, by server: URLs that are new, reused, carried as errors, fetched
again, and gone since the earlier snapshots (link rot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from distributed_downloader.errors import RETRYABLE, UserError
from distributed_downloader.schema import OVERLAP
from distributed_downloader.storage import (
    ERROR_PREFIX,
    SUCCESS_PREFIX,
    RunLayout,
    sql_path,
    upgrade_layout,
)

COUNTS = [field.name for field in OVERLAP if field.name != "server_name"]




def _columns(con: duckdb.DuckDBPyConnection, pattern: str) -> set[str]:
    return {row[0] for row in con.sql(
        f"DESCRIBE SELECT * FROM read_parquet({pattern}, union_by_name = true)").fetchall()}


def check_previous(previous: list[Path], output: Path) -> list[RunLayout]:
    layouts = []
    for path in previous:
        layout = RunLayout(path.resolve())
        if layout.root == output.resolve():
            raise UserError(f"--previous {path} is the output itself")
        if not layout.prep_summary.exists():
            raise UserError(f"--previous {path}: not a download folder (no finished prep)")
        try:
            upgrade_layout(layout)
        except OSError:  # read-only: its errors are not carried (those URLs are fetched again)
            pass
        layouts.append(layout)
    return layouts


def create_previous_tables(con: duckdb.DuckDBPyConnection, previous: list[RunLayout]) -> None:
    """Two DuckDB tables: `previous_outcome` (one row per URL that an earlier download stored,
    or failed for good) and `previous_url` (every URL the earlier snapshots held)."""
    retryable = ", ".join(f"'{code}'" for code in sorted(RETRYABLE))
    outcomes, urls = [], []
    for priority, layout in enumerate(previous):
        root = layout.downloaded
        if layout.has_chunks(SUCCESS_PREFIX):
            successes = layout.chunk_pattern(SUCCESS_PREFIX)
            # A row that was itself reused by link points to where its bytes are.
            linked = "linked_from" in _columns(con, successes)
            folder = (f"{sql_path(root)} || '/server_name=' || server_name || '/partition_id=' "
                      "|| partition_id")
            where = f"coalesce(linked_from, {folder})" if linked else folder
            uuid = "coalesce(linked_uuid, uuid)" if linked else "uuid"
            outcomes.append(
                f"SELECT identifier, 0 AS kind, {priority} AS priority, {where} AS reuse_from, "
                f"{uuid} AS reuse_uuid, NULL AS reuse_error_code, NULL AS reuse_error_msg, "
                f"NULL::INTEGER AS reuse_http_status FROM read_parquet({successes}, "
                "hive_partitioning = true, union_by_name = true)")
        if layout.has_chunks(ERROR_PREFIX):
            errors = layout.chunk_pattern(ERROR_PREFIX)
            outcomes.append(
                f"SELECT identifier, 1 AS kind, {priority} AS priority, NULL AS reuse_from, "
                "NULL AS reuse_uuid, error_code AS reuse_error_code, "
                f"error_msg || ' (in ' || {sql_path(layout.root)} || ')' AS reuse_error_msg, "
                f"http_status AS reuse_http_status FROM read_parquet({errors}) "
                f"WHERE error_code NOT IN ({retryable})")
        urls.append(f"SELECT identifier, server_name FROM read_parquet("
                    f"{sql_path(layout.batches / '*' / '*' / '*.parquet')}, "
                    "hive_partitioning = true)")
    if not outcomes:
        outcomes.append("SELECT NULL::VARCHAR AS identifier, 0 AS kind, 0 AS priority, "
                        "NULL::VARCHAR AS reuse_from, NULL::VARCHAR AS reuse_uuid, "
                        "NULL::VARCHAR AS reuse_error_code, NULL::VARCHAR AS reuse_error_msg, "
                        "NULL::INTEGER AS reuse_http_status WHERE false")
    # A stored image wins over an error; the first earlier download over the later ones.
    con.execute(f"""
        CREATE TEMP TABLE previous_outcome AS
        SELECT * EXCLUDE (kind, priority) FROM ({' UNION ALL BY NAME '.join(outcomes)})
        QUALIFY row_number() OVER (PARTITION BY identifier
                                   ORDER BY kind, priority, reuse_uuid) = 1""")
    con.execute(f"CREATE TEMP TABLE previous_url AS SELECT DISTINCT identifier, "
                f"server_name::VARCHAR AS server_name FROM ({' UNION ALL '.join(urls)})")


def overlap_by_server(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Distinct URLs by server: new, reused, carried as errors, fetched again, gone."""
    return con.sql("""
        WITH now AS (SELECT DISTINCT identifier, server_name FROM prepared),
        joined AS (
            SELECT coalesce(now.server_name, previous_url.server_name) AS server_name,
                   now.identifier IS NOT NULL AS present,
                   previous_url.identifier IS NOT NULL AS known,
                   outcome.reuse_from IS NOT NULL AS stored,
                   outcome.reuse_error_code IS NOT NULL AS failed
            FROM now
            FULL OUTER JOIN previous_url USING (identifier)
            LEFT JOIN previous_outcome AS outcome
              ON outcome.identifier = coalesce(now.identifier, previous_url.identifier))
        SELECT server_name,
               count(*) FILTER (present AND NOT known AND NOT stored AND NOT failed) AS new,
               count(*) FILTER (present AND stored) AS reused,
               count(*) FILTER (present AND failed) AS carried_errors,
               count(*) FILTER (present AND known AND NOT stored AND NOT failed)
                   AS fetched_again,
               count(*) FILTER (NOT present) AS gone
        FROM joined GROUP BY server_name ORDER BY server_name""").fetch_arrow_table().cast(OVERLAP)


def overlap_totals(by_server: pa.Table) -> dict[str, Any]:
    return {name: sum(by_server.column(name).to_pylist()) for name in COUNTS}
