"""The profiles store: what the run knows of each server, in `OUT/profiles/`.

`servers.csv` holds each server's profile: written by the profile stage (probing) and by fetch
(what it learned), read by both and by `status`; this module is its one reader and writer.
`rates.csv` is the user's hand-set rates and exclusions (`--rates`), which win over both.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from distributed_downloader.config import PolitenessSettings
from distributed_downloader.errors import InputError
from distributed_downloader.policy import LearnedRate
from distributed_downloader.storage import RunLayout, atomic_write_text

PROFILE_COLUMNS = ("server_name", "rate_limit", "max_connections", "latency_ms", "status", "notes",
                   "max_rate_limit", "rate_held", "rate_throttled", "throttled_at",
                   "throttle_wait", "paused_until", "failing_since", "last_request")
TRUE_WORDS = frozenset({"1", "true", "yes", "y", "x", "exclude", "excluded"})


class ProfileStatus(StrEnum):
    """What servers.csv says of a server (the `status` column)."""

    OK = "ok"  # answers; its rate may grow up to max_rate_limit
    PROBED = "probed"  # advertises a limit (RateLimit-Policy) or robots.txt caps it: a ceiling
    THROTTLED = "throttled"  # drew a 429 at `rate_throttled`; tried again after a quiet while
    DOWN = "down"  # did not answer the profile: fetch skips it (but --retry-errors)
    GAVE_UP = "gave_up"  # a fetch gave up on it; the next run tries again
    MANUAL = "manual"  # set by the rates file: `rate_limit` is a ceiling
    OPTED_OUT = "opted_out"  # every answer opted out (X-Robots-Tag): never asked again


@dataclass
class ServerProfile:
    server_name: str
    rate_limit: float  # where the next run starts
    max_connections: int
    latency_ms: float | None = None
    status: ProfileStatus = ProfileStatus.OK
    notes: str = ""
    # A hard ceiling: an advertised limit, robots.txt's Crawl-delay, a hand-set rate; None: the
    # run's max_rate_limit.
    max_rate_limit: float | None = None
    # What the server tolerated (policy.LearnedRate): the highest rate that held, the latest
    # rate that drew a 429 and when (unix time): evidence with an age, not a cap.
    rate_held: float | None = None
    rate_throttled: float | None = None
    throttled_at: float | None = None
    throttle_wait: float | None = None  # quiet seconds before rate_throttled is tried again
    paused_until: float | None = None  # a Retry-After pause still running (unix time)
    failing_since: float | None = None  # failing every request since then (unix time)
    last_request: float | None = None  # about when it was last asked (unix time)

    @property
    def learned(self) -> LearnedRate:
        return LearnedRate(self.rate_held, self.rate_throttled, self.throttled_at,
                           self.throttle_wait)


_OPTIONAL_FLOATS = ("latency_ms", "max_rate_limit", "rate_held", "rate_throttled",
                    "throttled_at", "throttle_wait", "paused_until", "failing_since",
                    "last_request")


@dataclass
class RateOverride:
    """One line of the user's rates file: what to force for one server."""

    server_name: str
    rate_limit: float | None = None
    max_connections: int | None = None
    exclude: bool = False


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
                    status=ProfileStatus(row.get("status") or "ok"),
                    notes=row.get("notes") or "",
                    **{name: float(row[name]) if row.get(name) else None
                       for name in _OPTIONAL_FLOATS},
                )
            except (KeyError, ValueError):
                continue  # a damaged line: that server starts from the defaults
            rates = (profile.rate_limit, profile.max_rate_limit, profile.rate_held,
                     profile.rate_throttled)
            if not all(rate is None or rate > 0 for rate in rates):
                continue  # 0, negative or NaN (a hand edit): the defaults again
            if profile.status == ProfileStatus.THROTTLED and profile.rate_throttled is None \
                    and profile.max_rate_limit is not None:
                # Written before rates carried their evidence: its ceiling was 90% of the rate
                # that drew the 429, and when is unknown (so it is tried again soon).
                profile.rate_throttled = profile.max_rate_limit / 0.9
                profile.throttled_at, profile.max_rate_limit = 0.0, None
            profiles[profile.server_name] = profile
    return profiles


def write_profiles(path: Path, profiles: list[ServerProfile]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PROFILE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for profile in sorted(profiles, key=lambda p: p.server_name):
        row = asdict(profile)
        row["status"] = str(profile.status)
        row["rate_limit"] = f"{profile.rate_limit:.4g}"
        for name in _OPTIONAL_FLOATS:
            value = getattr(profile, name)
            whole = name not in ("max_rate_limit", "rate_held", "rate_throttled")  # ms, s, times
            row[name] = "" if value is None else f"{value:.0f}" if whole else f"{value:.4g}"
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


# --- hand-set rates ---------------------------------------------------------------------------


def parse_rate_overrides(text: str, where: str) -> dict[str, RateOverride]:
    """Read a rates CSV: ours (server_name, rate_limit, max_connections, exclude) or the
    original's servers_profiles.csv (server_name, total_batches, ..., rate_limit)."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip() for name in reader.fieldnames or []]
    if "server_name" not in columns:
        raise InputError(f"{where}: a rates file needs a server_name column (found: "
                         f"{', '.join(columns) or 'nothing'})")
    overrides: dict[str, RateOverride] = {}
    for line, raw in enumerate(reader, start=2):
        row = {(key or "").strip(): (value or "").strip() for key, value in raw.items()
               if isinstance(value, str)}
        name = row.get("server_name", "").lower()
        if not name:
            continue
        try:
            rate = float(row["rate_limit"]) if row.get("rate_limit") else None
            connections = int(row["max_connections"]) if row.get("max_connections") else None
        except ValueError:
            raise InputError(f"{where}:{line}: rate_limit and max_connections must be numbers "
                             f"(server {name})") from None
        if (rate is not None and rate <= 0) or (connections is not None and connections <= 0):
            raise InputError(f"{where}:{line}: rate_limit and max_connections must be positive "
                             f"(server {name}); use exclude to skip a server")
        exclude = row.get("exclude", "").lower() in TRUE_WORDS
        overrides[name] = RateOverride(name, rate, connections, exclude)
    return overrides


def load_rate_overrides(layout: RunLayout, politeness: PolitenessSettings,
                        keep: bool = True) -> dict[str, RateOverride]:
    """The run's hand-set rates: the `rates` file when given (with `keep`, copied into the run
    for the next commands), else the copy a previous command kept."""
    if politeness.rates is not None:
        try:
            text = politeness.rates.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            if not layout.rate_overrides.exists():
                raise InputError(f"{politeness.rates}: rates file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{politeness.rates}: cannot read rates file ({exc})") \
                from None
        else:
            overrides = parse_rate_overrides(text, str(politeness.rates))
            if keep:
                atomic_write_text(layout.rate_overrides, text)
            return overrides
    if layout.rate_overrides.exists():
        return parse_rate_overrides(layout.rate_overrides.read_text(encoding="utf-8-sig"),
                                    str(layout.rate_overrides))
    return {}


def apply_overrides(profiles: dict[str, ServerProfile],
                    overrides: dict[str, RateOverride],
                    politeness: PolitenessSettings) -> None:
    """Hand-set rates win: the profile of an overridden server says so."""
    for name, override in overrides.items():
        if override.exclude or (override.rate_limit is None and override.max_connections is None):
            continue
        current = profiles.get(name)
        rate = override.rate_limit or (current.rate_limit if current else
                                       politeness.default_rate_limit)
        connections = override.max_connections or (
            current.max_connections if current else politeness.max_connections_per_server)
        profiles[name] = ServerProfile(name, rate, connections,
                                       current.latency_ms if current else None,
                                       ProfileStatus.MANUAL,
                                       "set by the rates file", rate)
