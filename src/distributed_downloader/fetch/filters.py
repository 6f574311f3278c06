"""The request filters: the rows of a batch that are not requested, and what they become.

In order: rows already committed (a resumed run), rows an earlier download holds (`--previous`:
written from there, no request), rows robots.txt disallows (written as errors). What is left is
fetched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_downloader.chunks import read_file
from distributed_downloader.errors import ErrorCode
from distributed_downloader.fetch.opt_out import PRODUCT_TOKEN
from distributed_downloader.fetch.robots import RobotsFile, load_robots
from distributed_downloader.fetch.rows import error_row, reused_row
from distributed_downloader.formats import read_successes
from distributed_downloader.protocol import BatchRef
from distributed_downloader.schema import REUSE_NAMES
from distributed_downloader.storage import RunLayout
from distributed_downloader.writers import BatchWriter

log = logging.getLogger(__name__)


@dataclass
class Filtered:
    """The rows left to request, and how many rows a filter wrote instead."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    successes: int = 0
    errors: int = 0


def rows_not_done(layout: RunLayout, batch: BatchRef, done: set[str]) -> list[dict[str, Any]]:
    """The batch's prepared rows that no chunk holds yet (a resumed run skips the others)."""
    return [row for path in layout.prepared_chunks(batch.server_name, batch.partition_id)
            for row in read_file(path).to_pylist() if row["uuid"] not in done]


async def reuse_earlier(rows: list[dict[str, Any]], writer: BatchWriter, copy: bool,
                        pool: Executor) -> Filtered:
    """Write the rows an earlier download already holds (`--previous`), without a request."""
    left = Filtered()
    reused = []
    for row in rows:
        earlier = {name: row.pop(name, None) for name in REUSE_NAMES}
        if earlier["reuse_error_code"]:
            writer.add_error(error_row(row, earlier["reuse_error_code"],
                                       earlier["reuse_error_msg"] or "",
                                       0, earlier["reuse_http_status"]))
            left.errors += 1
        elif earlier["reuse_from"]:
            reused.append((row, earlier["reuse_from"], earlier["reuse_uuid"]))
        else:
            left.rows.append(row)
    if not reused:
        return left
    wanted: dict[str, set[str]] = {}
    for _, folder, uuid in reused:
        wanted.setdefault(folder, set()).add(uuid)
    stored = await asyncio.get_running_loop().run_in_executor(pool, _read_earlier, wanted, copy)
    for row, folder, uuid in reused:
        before = stored.get((folder, uuid))
        if before is None:  # the earlier download lost it since prep: fetch it after all
            left.rows.append(row)
            continue
        writer.add_success(reused_row(row, before, folder, uuid, copy))
        left.successes += 1
    return left


def _read_earlier(wanted: dict[str, set[str]], with_images: bool,
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """(earlier batch folder, uuid) -> that success row; its image only when copying."""
    found = {}
    for folder, uuids in wanted.items():
        rows = read_successes(Path(folder), uuids, follow_links=False, with_images=with_images)
        found.update({(folder, row["uuid"]): row for row in rows})
    return found


class RobotsRules:
    """Each server's robots.txt, as the coordinator fetched it before releasing the server."""

    def __init__(self, layout: RunLayout, respect: bool, worker_id: int) -> None:
        self.layout = layout
        self.respect = respect
        self.worker_id = worker_id
        self.files: dict[str, RobotsFile | None] = {}

    def of(self, server: str) -> RobotsFile | None:
        if not self.respect:
            return None
        if server not in self.files:
            self.files[server] = load_robots(self.layout, server)
            if self.files[server] is None:
                log.warning("worker %s: no robots.txt on record for %s", self.worker_id, server)
        return self.files[server]

    def filter(self, rows: list[dict[str, Any]], server: str, writer: BatchWriter) -> Filtered:
        """The rows robots.txt allows; the others become errors, never requested."""
        robots = self.of(server) if rows else None
        if robots is None:
            return Filtered(rows)
        left = Filtered()
        for row in rows:
            if robots.allows(row["identifier"]):
                left.rows.append(row)
            else:
                writer.add_error(error_row(row, ErrorCode.ROBOTS_DISALLOWED,
                                           f"{robots.url} disallows it for {PRODUCT_TOKEN}", 0))
                left.errors += 1
        return left

    def permitted(self, server: str) -> Callable[[str], bool] | None:
        """For redirects: may this URL be fetched, as far as its server's robots.txt says?"""
        robots = self.of(server)
        if robots is None:
            return None
        return robots.permits_redirect(server)
