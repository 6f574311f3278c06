"""`size_based --min-side N`: the images whose original is smaller than N pixels on a side,
listed in `OUT/tools/size_based/removed.parquet` for the dataset to leave out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_downloader.storage import RunLayout
from distributed_downloader.tools import Tool, query_successes


def find_small(layout: RunLayout, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    side = int(options["min_side"])
    target = folder / "removed.parquet"
    con = query_successes(layout, target, f"""
        SELECT uuid, original_size[1] AS original_height, original_size[2] AS original_width
        FROM successes
        WHERE least(original_size[1], original_size[2]) < {side}
        ORDER BY uuid""")
    if con is None:
        return {"images": 0, "removed": 0, "kept": 0}
    removed = con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchone()[0]
    images = con.execute("SELECT count(*) FROM successes").fetchone()[0]
    return {"images": images, "removed": removed, "kept": images - removed,
            "result": str(target)}


TOOL = Tool("size_based", whole_run=find_small)
