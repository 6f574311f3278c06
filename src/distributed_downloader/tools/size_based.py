"""`size_based --min-side N`: the images whose original is smaller than N pixels on a side,
listed in `OUT/tools/size_based/removed.parquet` for the dataset to leave out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb

from distributed_downloader.storage import RunLayout
from distributed_downloader.tools import Tool


def find_small(layout: RunLayout, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    side = int(options["min_side"])
    target = folder / "removed.parquet"
    temporary = folder / ".removed.parquet.tmp"
    pattern = layout.downloaded / "*" / "*" / "successes-*.parquet"
    if not any(layout.downloaded.glob("*/*/successes-*.parquet")):
        return {"images": 0, "removed": 0, "kept": 0}
    con = duckdb.connect()
    con.execute(f"""
        COPY (
            SELECT uuid, original_size[1] AS original_height, original_size[2] AS original_width
            FROM read_parquet('{pattern}', union_by_name = true)
            WHERE least(original_size[1], original_size[2]) < {side}
            ORDER BY uuid
        ) TO '{temporary}' (FORMAT parquet, COMPRESSION zstd)""")
    os.replace(temporary, target)
    removed = con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchone()[0]
    images = con.execute(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchone()[0]
    return {"images": images, "removed": removed, "kept": images - removed,
            "result": str(target)}


TOOL = Tool("size_based", "List images whose original is smaller than --min-side pixels.",
            whole_run=find_small)
