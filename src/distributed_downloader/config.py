"""The settings of a run, grouped by the stage that reads them: defaults in code, a YAML (or the
first version's .env) file, CLI flags.

Each group is a small frozen value object (as httpx's `Timeout` and `Limits`): `paths`, `prep`,
`politeness`, `network`, `images`, `store`, `cluster`, `tools`; a stage takes its group. Every
setting still has one flat name, the same in YAML, as a flag and in `OUT/config.yaml`
(`batch_size` is `--batch-size` and `settings.prep.batch_size`).

Precedence, lowest first: defaults, the run's saved `OUT/config.yaml`, `--config FILE`, flags.
The original downloader's YAML keys are accepted (nested under `downloader_parameters`,
`tools_parameters`, ...) so an existing config runs unchanged; keys that only described the
original's folder layout or helper scripts are accepted and reported as having no effect.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from distributed_downloader import __version__
from distributed_downloader.errors import ConfigError, UserError

InputFormat = Literal["auto", "gbif", "dwca", "csv", "tsv", "txt", "parquet"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

DEFAULT_USER_AGENT = f"distributed-downloader/{__version__}"


def _is_dns_server(server: str) -> bool:
    """IP, IP:PORT or [IPv6]:PORT, the forms c-ares accepts."""
    try:
        ipaddress.ip_address(server)
        return True
    except ValueError:
        pass
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _comma_list(value: Any, lower: bool = False) -> Any:
    """A flag's "a, b, c" is the list [a, b, c]."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        return [part.lower() for part in parts] if lower else parts
    return value


class _Group(BaseModel):
    """A group of settings: typed, frozen, every field with a default and a description."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PathSettings(_Group):
    """Where the run reads and writes."""

    input: Path | None = Field(
        None, description="The URL list: a file, a folder of files, or a DwC-A zip."
    )
    output: Path | None = Field(
        None, description="The run's folder; every stage reads and writes under it."
    )

    def run_folder(self, stage: str, how: str = "OUT") -> Path:
        """The run's folder, for a stage that cannot work without one (one line if missing)."""
        if self.output is None:
            raise UserError(f"{stage} needs the run's folder {how}")
        return self.output


class PrepSettings(_Group):
    """How prep reads the input and cuts it into batches."""

    input_format: InputFormat = Field("auto", description="How to read the input.")
    url_column: str | None = Field(
        None,
        description="Column holding the URL [default: the first of url, image_url, "
        "ac:accessURI, accessURI, identifier].",
    )
    id_column: str | None = Field(
        None,
        description="Column used as source_id [default: gbifID, source_id or id when present, "
        "else the row's line number].",
    )
    keep_columns: list[str] = Field(
        default_factory=list, description="Input columns to carry along into the batches."
    )
    batch_size: int = Field(10_000, gt=0, description="Most rows in one batch.")
    previous: list[Path] = Field(
        default_factory=list,
        description="Earlier download folders (newest first): URLs they stored are not "
        "requested again, nor those that failed for good there.",
    )
    previous_mode: Literal["link", "copy"] = Field(
        "link", description="How reused images enter this download: link (a pointer to the "
        "earlier download's files) or copy."
    )
    keep_duplicates: bool = Field(
        False, description="Download a URL once per row instead of once per distinct URL."
    )
    strict_image_format: bool = Field(
        False, description="GBIF filter: keep only rows whose format is image/* (the original "
        "downloader's rule). By default a StillImage row whose format is empty or a bare image "
        "type (jpeg, png, ...) is kept too, as real GBIF files have many; prep counts them."
    )
    uuid: Literal["deterministic", "random"] = Field(
        "deterministic",
        description="deterministic: UUID v5 of source id and URL (same input, same UUIDs); "
        "random: uuid4.",
    )
    memory_limit: str = Field(
        "512MB", description="Memory prep's DuckDB may use before it spills to disk."
    )

    @field_validator("keep_columns", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("memory_limit")
    @classmethod
    def _check_memory_limit(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)\s*", value, re.IGNORECASE):
            raise ValueError("expected a size such as 512MB or 2GiB")
        return value.strip()


class PolitenessSettings(_Group):
    """How hard the run may ask each server: rates, retries, breaker, robots.txt, opt-out."""

    default_rate_limit: float = Field(
        10.0, gt=0, description="Requests per second to one server, for the whole run."
    )
    max_rate_limit: float | None = Field(
        None,
        gt=0,
        description="Most requests per second the engine may raise a server to on its own "
        "[default: default_rate_limit × max_rate_factor]. A rate set by hand (rates file, "
        "servers.csv) is never passed.",
    )
    max_rate_factor: float = Field(
        4.0, ge=1, description="When max_rate_limit is not set: how many times "
        "default_rate_limit the engine may raise a server to, step by step and only while it "
        "answers fast (its quickest answers no slower than its quickest of the run), without "
        "throttles, bursts of failures or timeouts, and the rate is used in full; earned again "
        "in each run (1: never above default_rate_limit)."
    )
    rate_multiplier: float = Field(
        1.0, gt=0, description="Scales every server's rate budget (0.5 halves them)."
    )
    max_connections_per_server: int = Field(
        8, gt=0, description="Most open requests to one server, for the whole run."
    )
    max_retries: int = Field(
        5, ge=1, description="Most attempts per URL that failed (5xx, timeout, reset), the "
        "first included; answers that only said \"slow down\" (429) are not counted."
    )
    retry_delay: float = Field(
        1.0, gt=0, description="Seconds before a failed URL is asked again; each later retry "
        "waits retry_delay_growth times longer (1, 3, 9, 27, 81 s ...), other URLs going on "
        "meanwhile."
    )
    retry_delay_growth: float = Field(
        3.0, ge=1, description="How many times longer each retry of a URL waits than the one "
        "before (Heritrix's growing delay): a passing fault is retried within seconds, a bad "
        "spell within minutes."
    )
    retry_delay_max: float = Field(
        600.0, gt=0, description="Longest wait before a failed URL is asked again."
    )
    max_throttles: int = Field(
        10, ge=1, description="Times one URL may be told to slow down (429) before it is "
        "written as an http_429 error, retryable by a later run."
    )
    first_contact_rate: float = Field(
        1.0, gt=0, description="Requests per second to a server that no profile or earlier "
        "run knows: its first answers are its probe; the rate steps up with each report of good "
        "answers (about one a second), reaching default_rate_limit in warm_up_steps."
    )
    warm_up_steps: int = Field(
        3, ge=1, description="Reports of good answers in which a first-contacted server goes "
        "from first_contact_rate to its starting rate."
    )
    profile_requests: int = Field(
        5, ge=1, le=20, description="Requests the profile stage sends to each server (one a "
        "second at most)."
    )
    profile_interval: float = Field(
        1.05, ge=1, description="Seconds between two of the profile stage's requests to one "
        "server (a little over one a second, so that a 1 request/s limit is never hit)."
    )
    profile_servers_at_once: int = Field(
        256, ge=1, description="Servers the profile stage probes at the same time."
    )
    server_down_after: float = Field(
        120.0,
        gt=0,
        description="Seconds a server may keep failing every request before its remaining URLs "
        "are written as retryable errors instead of being requested.",
    )
    rate_increase_interval: float = Field(
        2.0, gt=0, description="Seconds of answers without a throttle before a server's rate "
        "is raised a step (longer for slow servers: at least 4 requests' worth)."
    )
    rate_growth_factor: float = Field(
        1.5, gt=1, description="How much a step raises a rate while no limit is known."
    )
    rate_decrease_factor: float = Field(
        0.5, gt=0, lt=1, description="How much a throttle at a rate that once held lowers it "
        "(above such a rate, the rate falls back to it instead)."
    )
    throttle_memory: float = Field(
        60.0, gt=0, description="Quiet seconds after a 429 before the rate that drew it is "
        "tried again; doubles while such tries keep drawing 429s, up to throttle_memory_max."
    )
    throttle_memory_max: float = Field(
        240.0, gt=0, description="Longest wait before trying again a rate that drew a 429."
    )
    overload_failure_share: float = Field(
        0.25, gt=0, le=1, description="Share of failed answers (5xx without Retry-After, "
        "timeouts, resets) over overload_window that counts as overload and lowers the rate "
        "like a 429."
    )
    overload_window: float = Field(
        20.0, gt=0, description="Seconds of a server's latest answers that overload is "
        "judged on."
    )
    overload_min_failures: int = Field(
        10, ge=1, description="Fewest failed answers in overload_window that can count as "
        "overload."
    )
    breaker_failures: int = Field(
        5, ge=1, description="Different URLs failing in a row, with no good answer between, "
        "that pause a server (circuit breaker) and then probe it one request at a time."
    )
    breaker_max_pause: float = Field(
        60.0, gt=0, description="Longest pause between two probes of a failing server."
    )
    opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noml", "noindex", "noimageindex"],
        description="X-Robots-Tag values that make an image an `opted_out` error, not stored."
    )
    opt_out_server_after: int = Field(
        10, ge=1, description="A server whose first N answers all opt out is not asked again "
        "(its rows become `opted_out_server` errors)."
    )
    ignore_opt_out: bool = Field(
        False, description="Store images whatever their X-Robots-Tag says (reported)."
    )
    respect_robots: bool = Field(
        True, description="Read each server's robots.txt (RFC 9309) once per run: disallowed "
        "URLs become `robots_disallowed` errors, never requested; Crawl-delay caps the rate."
    )
    rates: Path | None = Field(
        None, description="CSV of per-server rates set by hand (server_name, rate_limit, ...)."
    )

    @field_validator("opt_out_directives", mode="before")
    @classmethod
    def _split_directives(cls, value: Any) -> Any:
        return _comma_list(value, lower=True)

    @property
    def effective_max_rate(self) -> float:
        return self.max_rate_limit or self.default_rate_limit * self.max_rate_factor


class NetworkSettings(_Group):
    """What one request may do: timeouts, sizes, who we say we are, which addresses and DNS."""

    timeout: float = Field(60.0, gt=0, description="Seconds one request may take, body included.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    max_body_size: int = Field(
        50_000_000, gt=0, description="Largest body in bytes; larger ones are not downloaded."
    )
    max_body_memory: int = Field(
        48 << 20, gt=0, description="Bytes of response bodies one worker holds at once: "
        "expected from its requests in flight (the mean body so far), being read, or waiting "
        "to be decoded; a request is sent only while its answer fits."
    )
    max_redirects: int = Field(
        5, ge=0, description="Redirects followed per URL; more is a `too_many_redirects` error."
    )
    user_agent: str = Field(
        DEFAULT_USER_AGENT, description="User-Agent header sent with every request."
    )
    contact: str | None = Field(
        None, description="An e-mail or URL where hosts can reach you; added to the "
        "User-Agent, as Wikimedia's and many museums' policies ask."
    )
    allow_network: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) that may be contacted although private, loopback or "
        "otherwise non-public; everything else non-public is refused.",
    )
    dns_servers: list[str] = Field(
        default_factory=list,
        description="DNS servers to ask (IP or IP:PORT, IPv6 with a port as [IP]:PORT); "
        "empty: the system's (/etc/resolv.conf).",
    )
    dns_min_ttl: float = Field(
        10.0, ge=0, description="Shortest time in seconds a DNS answer is kept (a TTL of 0 "
        "must not mean a query per request)."
    )
    dns_max_ttl: float = Field(
        3600.0, gt=0, description="Longest time in seconds a DNS answer is kept (a host that "
        "moves is found again within it)."
    )
    dns_stale_for: float = Field(
        86_400.0, ge=0, description="Seconds past its TTL a DNS answer is still used when its "
        "refresh fails."
    )
    dns_negative_ttl: float = Field(
        5.0, ge=0, description="Seconds a failed DNS lookup is remembered, so that every URL "
        "of the host does not ask again at once."
    )
    dns_timeout: float = Field(
        2.0, gt=0, description="Seconds a DNS query waits for its first try (later tries wait "
        "longer)."
    )
    dns_tries: int = Field(2, ge=1, description="Tries of a DNS query before it fails.")

    @field_validator("allow_network", "dns_servers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("allow_network")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"'{network}' is not a network such as 127.0.0.0/8") from None
        return value

    @field_validator("dns_servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for server in value:
            if not _is_dns_server(server):
                raise ValueError(f"'{server}' is not a server such as 192.0.2.53 or "
                                 "192.0.2.53:5353")
        return value

    @property
    def effective_user_agent(self) -> str:
        """The User-Agent sent: the tool and its version, and the contact when there is one."""
        if self.contact and self.contact not in self.user_agent:
            return f"{self.user_agent} (+{self.contact})"
        return self.user_agent


class ImageSettings(_Group):
    """How a downloaded image is checked, decoded, resized and encoded."""

    image_size: int = Field(
        720, ge=0, description="Longest side of stored images in pixels (0 keeps the original)."
    )
    output_image_format: Literal["jpeg", "webp", "original"] = Field(
        "jpeg", description="Encoding of stored images (original: as downloaded when not resized)."
    )
    image_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of stored images.")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels are refused (decompression bombs)."
    )
    max_decode_memory: int = Field(
        96 << 20, gt=0, description="Bytes of decoded pixels one worker holds at once, counted "
        "from each image's header before it is decoded: an image waits while it would go "
        "over, and one larger than the whole budget is decoded alone. Sized, beside the "
        "worker's max_body_memory and max_output_memory, for workers under 400 MiB."
    )


class StoreSettings(_Group):
    """Where and how fetched rows are written."""

    output_format: Literal["parquet", "webdataset", "files", "hdf5"] = Field(
        "parquet", description="Where stored images go: in the successes Parquet (parquet), or "
        "per batch in images.tar (webdataset), images/{uuid}.jpg (files) or images.h5 (hdf5), "
        "the Parquet keeping every other column."
    )
    max_output_memory: int = Field(
        32 << 20, gt=0, description="Bytes of image data one worker holds for chunks not yet "
        "written, across its batches; over it, the largest chunk is written early. Two "
        "batches' chunks of 16 MiB each: a worker holds as much with many small batches as "
        "with a few large ones."
    )


class ClusterSettings(_Group):
    """Where the run's processes run: workers, executor, Slurm, and how work is spread."""

    workers: int | None = Field(
        None, gt=0, description="Worker processes on this machine [default: one per core]."
    )
    batches_per_worker: int = Field(
        256, gt=0, description="Batches one worker fetches at once, at most: enough for "
        "hundreds of small servers each asked slowly (a first contact starts at 1 request/s); "
        "the rows in flight are capped apart from this."
    )
    log_level: LogLevel = Field("INFO", description="Least severe log messages shown.")
    executor: Literal["local", "mpi"] = Field(
        "local", description="local: worker processes on this machine; mpi: under mpirun/srun, "
        "rank 0 schedules and the other ranks fetch."
    )
    stop_grace: float = Field(
        60.0, gt=0, description="Seconds workers get, after a stop, to flush their chunks "
        "before those that did not stop are ended."
    )
    run_lock_lease: int = Field(
        120, ge=10, description="Seconds without a heartbeat after which the lock of a run "
        "folder held from another host (a shared file system) counts as abandoned and may be "
        "taken over; the holder renews it four times per lease. On the same host a lock is "
        "abandoned as soon as its process is gone."
    )
    account: str | None = Field(None, description="Slurm account to charge.")
    num_downloads: int = Field(
        20, gt=0, description="Most download periods (Slurm jobs) one chain submits."
    )
    partition: str | None = Field(None, description="Slurm partition [default: the cluster's].")
    time_limit: str = Field(
        "01:00:00", description="Time limit of each Slurm download period (Slurm's format: "
        "minutes, HH:MM:SS or D-HH:MM:SS)."
    )
    stop_margin: int = Field(
        120, ge=30, description="Seconds before a period's time limit when Slurm asks it to "
        "stop; it flushes its chunks and exits, and the next period resumes."
    )
    stall_periods: int = Field(
        3, ge=1, description="Slurm download periods in a row without a committed row after "
        "which the chain stops (stalled) instead of queueing another."
    )
    launcher: Literal["srun", "mpirun"] = Field(
        "srun", description="How a Slurm job starts its MPI ranks."
    )
    srun_mpi: str = Field("pmix", description="srun's --mpi plugin (pmix or pmi2).")
    max_nodes: int = Field(1, gt=0, description="Most nodes one download job uses.")
    workers_per_node: int = Field(1, gt=0, description="Download workers on each node.")
    cpu_per_worker: int = Field(1, gt=0, description="CPU cores given to each worker.")
    min_worker_rate: float = Field(
        20.0, gt=0, description="A server gets one more worker only while each of its workers "
        "would still have this many requests/s (one worker easily handles a slow server)."
    )
    schedule_rules: dict[int, int] = Field(
        default_factory=dict,
        description="Most workers a server may get, keyed by its number of batches (a server "
        "with more than KEY batches gets up to VALUE workers); empty: no cap.",
    )


class ToolSettings(_Group):
    """Post-processing tools: where they run and their own options."""

    tools_num_workers: int = Field(1, gt=0, description="Workers of a tools run.")
    tools_max_nodes: int = Field(1, gt=0, description="Most nodes a tools job uses.")
    tools_workers_per_node: int = Field(1, gt=0, description="Tool workers on each node.")
    tools_cpu_per_worker: int = Field(1, gt=0, description="CPU cores of each tool worker.")
    threshold_size: int = Field(
        224, ge=0, description="size_based tool: smallest side an image must have."
    )
    new_resize_size: int = Field(720, gt=0, description="resize tool: the new longest side.")


# Group attribute -> its class, in the order settings are listed and saved.
GROUPS: dict[str, type[_Group]] = {
    "paths": PathSettings,
    "prep": PrepSettings,
    "politeness": PolitenessSettings,
    "network": NetworkSettings,
    "images": ImageSettings,
    "store": StoreSettings,
    "cluster": ClusterSettings,
    "tools": ToolSettings,
}
# Flat setting name (YAML key, flag, saved key) -> the group holding it.
GROUP_OF: dict[str, str] = {
    name: group for group, model in GROUPS.items() for name in model.model_fields
}
SETTING_NAMES = tuple(GROUP_OF)
assert len(SETTING_NAMES) == sum(len(model.model_fields) for model in GROUPS.values()), \
    "a setting name is used in two groups"


def setting_field(name: str) -> FieldInfo:
    """The field (type, default, description) of the setting `name`."""
    return GROUPS[GROUP_OF[name]].model_fields[name]


def _nested(values: dict[str, Any]) -> dict[str, Any]:
    """Flat names ({"batch_size": 7}) put into their groups ({"prep": {"batch_size": 7}})."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        group = GROUP_OF.get(key)
        if group is None:
            nested[key] = value  # a group, or an unknown key that validation reports
            continue
        inner = nested.setdefault(group, {})
        if isinstance(inner, BaseModel):
            inner = nested[group] = dict(inner)
        inner[key] = value
    return nested


class Settings(BaseModel):
    """Every setting of a run, by group. Built from flat names: Settings(batch_size=7)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: PathSettings = Field(default_factory=PathSettings)
    prep: PrepSettings = Field(default_factory=PrepSettings)
    politeness: PolitenessSettings = Field(default_factory=PolitenessSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    tools: ToolSettings = Field(default_factory=ToolSettings)

    @model_validator(mode="before")
    @classmethod
    def _group_flat_names(cls, data: Any) -> Any:
        return _nested(data) if isinstance(data, dict) else data

    def value(self, name: str) -> Any:
        """The setting `name` by its flat name."""
        return getattr(getattr(self, GROUP_OF[name]), name)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name, in the order they are saved."""
        return {name: self.value(name) for name in SETTING_NAMES}

    def replace(self, **values: Any) -> Settings:
        """A copy with some settings (flat names, or whole groups) changed, validated."""
        merged = self.flat()
        for key, value in values.items():
            if key in GROUPS:
                merged.update(dict(value) if isinstance(value, BaseModel) else value)
            else:
                merged[key] = value
        copy = type(self).model_validate(merged)
        copy._one_off = dict(self._one_off)
        return copy

    def model_copy(self, *, update: Any = None, deep: bool = False) -> Settings:
        """As pydantic's, but `update` takes flat names and is validated (see `replace`)."""
        return self.replace(**update) if update else super().model_copy(deep=deep)

    # setting -> the value the run had before this command's one-off flag (see load_settings)
    _one_off: dict[str, Any] = PrivateAttr(default_factory=dict)

    def set_one_off(self, before: dict[str, Any]) -> None:
        self._one_off = dict(before)

    @property
    def one_off(self) -> dict[str, Any]:
        """Settings this command loosened by a flag, with the values saved for later commands."""
        return dict(self._one_off)

    def to_save(self) -> Settings:
        """What the run's later commands start from: this command's one-off flags left out."""
        return self.replace(**self._one_off)

# The settings each stage's command takes as flags (`download` takes all three).
FETCH_SETTINGS = (
    "workers", "image_size", "output_image_format", "output_format", "image_quality",
    "default_rate_limit", "first_contact_rate", "max_rate_limit", "max_rate_factor",
    "rate_multiplier", "max_connections_per_server", "max_retries", "server_down_after",
    "retry_delay", "retry_delay_max", "rate_increase_interval", "rate_growth_factor",
    "rate_decrease_factor", "throttle_memory", "throttle_memory_max",
    "overload_failure_share", "overload_min_failures", "breaker_failures", "breaker_max_pause",
    "timeout", "connect_timeout", "max_body_size", "max_image_pixels", "max_decode_memory",
    "user_agent", "allow_network", "cpu_per_worker", "rates", "executor", "min_worker_rate",
    "contact", "opt_out_directives", "opt_out_server_after", "ignore_opt_out", "dns_servers",
    "respect_robots",
)
PROFILE_SETTINGS = ("default_rate_limit", "max_rate_limit", "max_connections_per_server",
                    "profile_requests", "timeout", "connect_timeout", "user_agent", "contact",
                    "allow_network", "dns_servers", "rates", "respect_robots")
PREP_SETTINGS = ("url_column", "id_column", "keep_columns", "batch_size", "keep_duplicates",
                 "strict_image_format", "uuid", "memory_limit", "previous", "previous_mode")


def one_off_flags(settings: Settings, accepted: tuple[str, ...]) -> list[str]:
    """Command-line flags that give a command this command's one-off settings (a Slurm chain's
    jobs get the flags of the command that submitted them)."""
    flags: list[str] = []
    for name in (name for name in settings.one_off if name in accepted):
        value, flag = settings.value(name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, ",".join(map(str, value))]
        elif value is not None:
            flags += [flag, str(value)]
    return flags

# The original downloader's YAML keys, by their path in its file, onto settings.
LEGACY_YAML_KEYS: dict[str, str] = {
    "path_to_input": "input",
    "path_to_urls": "input",
    "path_to_output_folder": "output",
    **{
        f"downloader_parameters.{key}": key
        for key in (
            "num_downloads max_nodes workers_per_node cpu_per_worker image_size "
            "batch_size rate_multiplier default_rate_limit"
        ).split()
    },
    "downloader_parameters.header": "user_agent",
    "downloader_parameters.logger_level": "log_level",
    "tools_parameters.num_workers": "tools_num_workers",
    "tools_parameters.max_nodes": "tools_max_nodes",
    "tools_parameters.workers_per_node": "tools_workers_per_node",
    "tools_parameters.cpu_per_worker": "tools_cpu_per_worker",
    "tools_parameters.threshold_size": "threshold_size",
    "tools_parameters.new_resize_size": "new_resize_size",
}
# Sections and keys of the original that described its own folders and scripts: this version
# lays out its output and writes its job scripts itself, so they are accepted and have no effect.
LEGACY_YAML_WITHOUT_EFFECT = ("scripts", "output_structure", "suppress_unchanged_error")
LEGACY_YAML_SECTIONS = ("downloader_parameters", "tools_parameters")

# The first version's .env keys onto settings.
LEGACY_ENV_KEYS: dict[str, str] = {
    "ACCOUNT": "account",
    "PATH_TO_INPUT": "input",
    "PATH_TO_OUTPUT": "output",
    "DOWNLOAD_DIR": "output",
    "DOWNLOADER_PROFILES_PATH": "rates",
    "DOWNLOADER_MAX_NODES": "max_nodes",
    "DOWNLOADER_WORKERS_PER_NODE": "workers_per_node",
    "DOWNLOADER_CPU_PER_TASK": "cpu_per_worker",
    "DOWNLOADER_CPU_PER_WORKER": "cpu_per_worker",
    "DOWNLOADER_NUM_DOWNLOADS": "num_downloads",
    "DOWNLOADER_HEADER": "user_agent",
    "DOWNLOADER_IMAGE_SIZE": "image_size",
    "DOWNLOADER_LOGGER_LEVEL": "log_level",
    "DOWNLOADER_BATCH_SIZE": "batch_size",
    "DOWNLOADER_RATE_MULTIPLIER": "rate_multiplier",
    "DOWNLOADER_DEFAULT_RATE_LIMIT": "default_rate_limit",
}
LEGACY_ENV_WITHOUT_EFFECT = (
    "DOWNLOADER_URLS_FOLDER DOWNLOADER_IMAGES_FOLDER DOWNLOADER_LOGS_FOLDER "
    "DOWNLOADER_SCHEDULES_FOLDER GBIF_CACHE_ROOT PROCESSED_DATA_ROOT PROCESSED_DATA_ROOT_LOCAL "
    "TIME_STAMP MPI_SUBMITTER_SCRIPT DOWNLOADING_SCRIPT VERIFYING_SCRIPT CONFIG_PATH"
).split()


class LoadedFile(BaseModel):
    """Settings read from one file, and the keys in it that were accepted without effect."""

    values: dict[str, Any]
    without_effect: list[str] = []


def _unknown_key(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown setting '{key}'{hint}")


def _user_agent_from_header(value: Any) -> Any:
    """The original's `header` was a whole header line ("User-Agent: ...") or a mapping."""
    if isinstance(value, dict):
        for name, header_value in value.items():
            if str(name).lower() == "user-agent":
                return header_value
        return DEFAULT_USER_AGENT
    if isinstance(value, str):
        name, sep, rest = value.partition(":")
        if sep and name.strip().lower() == "user-agent":
            return rest.strip()
    return value


def _yaml_values(data: dict[str, Any], where: str) -> LoadedFile:
    valid_keys = sorted(
        set(SETTING_NAMES) | set(LEGACY_YAML_KEYS) | set(LEGACY_YAML_WITHOUT_EFFECT)
        | set(LEGACY_YAML_SECTIONS)
    )
    values: dict[str, Any] = {}
    without_effect: list[str] = []

    def put(name: str, value: Any, key: str) -> None:
        if name == "user_agent" and key.endswith("header"):
            value = _user_agent_from_header(value)
        values[name] = value

    for key, value in data.items():
        key = str(key)
        if key in LEGACY_YAML_WITHOUT_EFFECT:
            without_effect.append(key)
        elif key in LEGACY_YAML_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping of settings")
            for inner, inner_value in value.items():
                path = f"{key}.{inner}"
                if path in LEGACY_YAML_KEYS:
                    put(LEGACY_YAML_KEYS[path], inner_value, path)
                elif inner in SETTING_NAMES:
                    put(str(inner), inner_value, path)
                else:
                    inner_valid = [k for k in LEGACY_YAML_KEYS if k.startswith(key + ".")]
                    raise _unknown_key(path, where, inner_valid + list(SETTING_NAMES))
        elif key in LEGACY_YAML_KEYS:
            put(LEGACY_YAML_KEYS[key], value, key)
        elif key in SETTING_NAMES:
            values[key] = value
        else:
            raise _unknown_key(key, where, valid_keys)
    return LoadedFile(values=values, without_effect=without_effect)


def _parse_env_file(text: str, where: str) -> LoadedFile:
    values: dict[str, Any] = {}
    without_effect: list[str] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}:{number}: expected KEY=VALUE, got {raw_line.strip()!r}")
        value = value.strip()
        if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value)  # a trailing comment
        if key in LEGACY_ENV_KEYS:
            name = LEGACY_ENV_KEYS[key]
            values[name] = _user_agent_from_header(value) if name == "user_agent" else value
        elif key in LEGACY_ENV_WITHOUT_EFFECT:
            without_effect.append(key)
        else:
            raise _unknown_key(key, where, list(LEGACY_ENV_KEYS) + LEGACY_ENV_WITHOUT_EFFECT)
    return LoadedFile(values=values, without_effect=without_effect)


def read_settings_file(path: Path) -> LoadedFile:
    """Read a YAML settings file (ours or the original's) or the first version's .env file."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: settings file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read settings file ({exc})") from None
    if path.suffix == ".env" or path.name == ".env":
        return _parse_env_file(text, where)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return LoadedFile(values={})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    return _yaml_values(data, where)


def validate(values: dict[str, Any], where: str) -> Settings:
    """Build settings, turning pydantic's report into one line that names the setting."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error["loc"][1:] if error["loc"][:1] and error["loc"][0] in GROUPS \
                else error["loc"]  # a setting is named by its flat name, not its group
            name = ".".join(str(part) for part in loc) or "settings"
            problems.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None


def saved_settings_path(output: Path) -> Path:
    return output / "config.yaml"


# Settings whose flags can make a run less polite or less safe. Such a flag applies to the
# command given it (and to the Slurm chain it submits), never to the run's later commands,
# unless the user asks (`--save-overrides`); a flag that makes the run gentler is kept as usual.
POLITENESS_AND_SAFETY = ("allow_network", "respect_robots", "ignore_opt_out", "max_rate_limit",
                         "max_rate_factor", "default_rate_limit", "first_contact_rate",
                         "rate_multiplier", "max_connections_per_server")
FROM_FLAG = "command line"


def loosens(name: str, before: Settings, after: Settings) -> bool:
    """Whether `after` is less polite or less safe than `before` in the setting `name`."""
    if name == "allow_network":
        return not set(after.network.allow_network) <= set(before.network.allow_network)
    if name == "respect_robots":
        return before.politeness.respect_robots and not after.politeness.respect_robots
    if name == "ignore_opt_out":
        return after.politeness.ignore_opt_out and not before.politeness.ignore_opt_out
    if name == "max_rate_limit":
        return after.politeness.effective_max_rate > before.politeness.effective_max_rate
    return after.value(name) > before.value(name)


class LoadedSettings(BaseModel):
    """The settings of one command, and where each came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    settings: Settings
    sources: dict[str, str] = {}  # setting -> the file or FROM_FLAG that set it last
    without_effect: list[str] = []

    def not_default(self) -> list[tuple[str, Any, str]]:
        """(name, value, where from) of every setting that differs from its default."""
        values, defaults = self.settings.flat(), Settings().flat()
        return [(name, value, self.sources.get(name, "?")) for name, value in values.items()
                if name not in ("input", "output") and value != defaults[name]]


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    save_overrides: bool = False,
) -> LoadedSettings:
    """Merge every source of settings, remembering where each came from.

    The run's folder can come from the flags or from the settings file, and the run's saved
    settings in that folder sit below both, so the file is read first to learn where the run is.
    """
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    from_file = read_settings_file(config_file) if config_file else LoadedFile(values={})
    output = overrides.get("output") or from_file.values.get("output")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if output is not None:
        saved = saved_settings_path(Path(output))
        if saved.exists():
            merged.update(read_settings_file(saved).values)
            sources.update(dict.fromkeys(merged, str(saved)))
    merged.update(from_file.values)
    sources.update(dict.fromkeys(from_file.values, str(config_file)))
    where = str(config_file) if config_file else "settings"
    before = validate(merged, where)
    merged.update(overrides)
    sources.update(dict.fromkeys(overrides, FROM_FLAG))
    settings = validate(merged, where)
    if not save_overrides:
        settings.set_one_off({name: before.value(name) for name in POLITENESS_AND_SAFETY
                              if name in overrides and loosens(name, before, settings)})
    return LoadedSettings(settings=settings, sources=sources,
                          without_effect=from_file.without_effect)


def save_settings(settings: Settings) -> None:
    """Write the settings the run's next command starts from to `OUT/config.yaml` (one-off
    politeness and safety flags left out)."""
    from distributed_downloader.storage import atomic_write_text

    atomic_write_text(saved_settings_path(settings.paths.run_folder("saving settings")),
                      settings_as_yaml(settings.to_save()))


def settings_as_yaml(settings: Settings) -> str:
    """The effective settings in our own flat form, as written to `OUT/config.yaml`."""
    data = settings.flat()
    for name, value in data.items():
        if isinstance(value, Path):
            data[name] = str(value.resolve())
        elif isinstance(value, list) and value and isinstance(value[0], Path):
            data[name] = [str(path.resolve()) for path in value]
    header = "# Effective settings of this run (defaults < saved < --config < flags).\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
