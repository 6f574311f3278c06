"""`duplication_based`: one image per original: duplicates by `hashsum_original`, the lowest
UUID kept, every other one mapped to it in `OUT/tools/duplication_based/duplicates.parquet`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_downloader.storage import RunLayout
from distributed_downloader.tools import Tool, query_successes


def find_duplicates(layout: RunLayout, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    target = folder / "duplicates.parquet"
    con = query_successes(layout, target, """
        SELECT uuid, first(uuid ORDER BY uuid) OVER (PARTITION BY hashsum_original)
                   AS kept_uuid, hashsum_original
        FROM successes
        QUALIFY uuid <> kept_uuid
        ORDER BY kept_uuid, uuid""")
    if con is None:
        return {"images": 0, "duplicates_removed": 0, "kept_with_duplicates": 0}
    removed, groups = con.execute(
        f"SELECT count(*), count(DISTINCT kept_uuid) FROM read_parquet('{target}')").fetchone()
    images = con.execute("SELECT count(*) FROM successes").fetchone()[0]
    return {"images": images, "duplicates_removed": removed, "kept_with_duplicates": groups,
            "result": str(target)}


TOOL = Tool("duplication_based", whole_run=find_duplicates)
