"""Server profiles: the rate each server tolerates, in `OUT/profiles/servers.csv`.

Fetch writes what it learned (rates lowered by throttling, servers that stayed down) and the next
run starts from it. The columns are those of the profile stage, so a profile file can be written
by probing, by a previous download, or by hand.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from distributed_downloader.storage import atomic_write_text

PROFILE_COLUMNS = ("server_name", "rate_limit", "max_connections", "latency_ms", "status", "notes")


@dataclass
class ServerProfile:
    server_name: str
    rate_limit: float
    max_connections: int
    latency_ms: float | None = None
    status: str = "ok"  # ok | throttled (rate drew 429s) | probed | down
    notes: str = ""


def read_profiles(path: Path) -> dict[str, ServerProfile]:
    if not path.exists():
        return {}
    profiles = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                profile = ServerProfile(
                    server_name=row["server_name"],
                    rate_limit=float(row["rate_limit"]),
                    max_connections=int(float(row.get("max_connections") or 0)) or 1,
                    latency_ms=float(row["latency_ms"]) if row.get("latency_ms") else None,
                    status=row.get("status") or "ok",
                    notes=row.get("notes") or "",
                )
            except (KeyError, ValueError):
                continue  # a damaged line: that server starts from the defaults
            profiles[profile.server_name] = profile
    return profiles


def write_profiles(path: Path, profiles: list[ServerProfile]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PROFILE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for profile in sorted(profiles, key=lambda p: p.server_name):
        row = asdict(profile)
        row["rate_limit"] = f"{profile.rate_limit:.4g}"
        row["latency_ms"] = "" if profile.latency_ms is None else f"{profile.latency_ms:.0f}"
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())
