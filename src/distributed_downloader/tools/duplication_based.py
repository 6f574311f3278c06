"""`duplication_based`: one image per original: duplicates by `hashsum_original`, the lowest
UUID kept, every other one mapped to it in `OUT/tools/duplication_based/duplicates.parquet`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb

from distributed_downloader.storage import RunLayout
from distributed_downloader.tools import Tool


def find_duplicates(layout: RunLayout, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    target = folder / "duplicates.parquet"
    temporary = folder / ".duplicates.parquet.tmp"
    pattern = layout.downloaded / "*" / "*" / "successes-*.parquet"
    if not any(layout.downloaded.glob("*/*/successes-*.parquet")):
        return {"images": 0, "duplicates_removed": 0, "kept_with_duplicates": 0}
    con = duckdb.connect()
    con.execute(f"""
        COPY (
            SELECT uuid, first(uuid ORDER BY uuid) OVER (PARTITION BY hashsum_original)
                       AS kept_uuid, hashsum_original
            FROM read_parquet('{pattern}', union_by_name = true)
            QUALIFY uuid <> kept_uuid
            ORDER BY kept_uuid, uuid
        ) TO '{temporary}' (FORMAT parquet, COMPRESSION zstd)""")
    os.replace(temporary, target)
    removed, groups = con.execute(
        f"SELECT count(*), count(DISTINCT kept_uuid) FROM read_parquet('{target}')").fetchone()
    images = con.execute(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchone()[0]
    return {"images": images, "duplicates_removed": removed, "kept_with_duplicates": groups,
            "result": str(target)}


TOOL = Tool("duplication_based", "Find images with the same original; keep the lowest UUID.",
            whole_run=find_duplicates)
