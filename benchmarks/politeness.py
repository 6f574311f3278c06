"""Politeness at speed: farms of rate-limited loopback servers with a skewed share of the images.

    python benchmarks/politeness.py [--scale 1.0] [--scenario all] [--mpi N] [--timeout 900]

No run can finish sooner than the slowest server's requests ÷ its limit (the bound). For each
run: the makespan against the bound, the share of 429 answers, and each server's peak requests
in any 1-second window against its limit. Each run works in its own benchmarks/work/politeness-
LABEL folder (removed and made again) and logs the fetch's output to politeness-LABEL.log beside.

Eight servers (127.0.0.41–48) allow 20, 10, 10, 5, 5, 5, 2 and 2 requests/s (429 with
Retry-After beyond) and hold 1200, 400, 300, 150, 120, 100, 40 and 30 images (bound 60 s):
  known      the servers' limits are in OUT/profiles/servers.csv, as a previous run or a
             rates file leaves them
  profiled   the servers advertise their limits (RateLimit-Policy) and `profile` runs first,
             as `download` does (its ~5 s are reported apart, not in the makespan)
  learned    no profile: every server starts at --default-rate-limit 10 and the engine adapts
Goals: makespan <= 1.15x the bound, 429s <= 1%, peak <= 1.2x the limit.

Two runs "from nothing" (no profile, limits hidden, --default-rate-limit 10 --max-rate-limit
400), with --mpi N under `mpirun -n N ... --executor mpi` instead of the local executor:
  realistic  20 servers (127.0.0.61–80) with hidden limits of 40–200 requests/s and a Zipf share
             of ~12,000 URLs (the largest share on the slowest server: bound ~110 s), among them
             flaky URLs (503 without Retry-After 1–3 times), 404s, slow answers, HTML pages,
             truncated images and redirects; plus a host where nothing listens (127.0.0.81) and
             one answering 500 to everything (127.0.0.82), 50 URLs each.
             Goals: makespan <= 1.25x the bound, 429s <= 1%, peak <= limit + burst
             (burst: max(2, 10% of the limit)), every URL that can succeed stored, <= 3
             requests per URL to the always-500 server.
  changing   4 servers (127.0.0.91–94) allowing 100, 60, 60 and 40 requests/s; the first halves
             its limit 30 s into the fetch and doubles it back at 70 s (bound ~120 s, counted
             with the limit in force as if a client knew each change at once; a rate that drew
             a 429 is tried again only after a quiet minute, so the makespan is reported, not
             a goal). Goals: 80% of the raised limit reached within 5 minutes, 429s <= 1%,
             peak <= the highest limit in force in the window + burst.
--scale multiplies every image count (and, in `changing`, the times of the changes).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import duckdb

from distributed_downloader.testing.farm import (
    Farm,
    FarmServer,
    RequestRecord,
    ServerSpec,
    make_small_image,
)
from distributed_downloader.profiles import ServerProfile, write_profiles

WORK = Path(__file__).parent / "work"
CLI = [sys.executable, "-m", "distributed_downloader"]
SCENARIOS = ("known", "profiled", "learned", "realistic", "changing")
LIMITS = [20, 10, 10, 5, 5, 5, 2, 2]
IMAGES = [1200, 400, 300, 150, 120, 100, 40, 30]
# The runs from nothing: no profile, every server starts at the default rate.
FROM_NOTHING = ["--default-rate-limit", "10", "--max-rate-limit", "400",
                "--allow-network", "127.0.0.0/24"]


# --- running the CLI ---------------------------------------------------------------------------

def fresh_output(label: str) -> Path:
    out = WORK / f"politeness-{label}"
    if out.exists():
        shutil.rmtree(out)  # only the benchmark's own folder
    return out


def prep(urls: Path, out: Path) -> None:
    done = subprocess.run([*CLI, "prep", str(urls), "--output", str(out)], check=False,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"prep failed with exit code {done.returncode}:\n{done.stderr}")


def prepared(label: str, scenario: str, lines: list[str], farm: Farm) -> Path:
    """A fresh run folder with `lines` prepared; the farm's logs emptied for the fetch."""
    out = fresh_output(label)
    urls = WORK / f"politeness-{scenario}-urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    prep(urls, out)
    for server in farm.servers:
        server.log.clear()
    return out


def fetch(label: str, out: Path, options: list[str], timeout: float,
          mpi: int | None = None) -> float | None:
    """Run `fetch OUT OPTIONS`; its makespan in seconds, or None when it ran out of time."""
    command = [*CLI, "fetch", str(out), *options]
    if mpi:
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(mpi),
                   *command, "--executor", "mpi"]
    log = WORK / f"politeness-{label}.log"
    with open(log, "w") as handle:
        started = time.monotonic()
        # Its own session, so a timeout ends the fetch and every process it started.
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: mpirun passes it on to its ranks (which have groups of their own).
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None
        makespan = time.monotonic() - started
    if returncode != 0:
        raise SystemExit(f"{label}: fetch failed with exit code {returncode}; see {log}")
    return makespan


def free_port(host: str) -> int:
    """A port where nothing listens on HOST (connections are refused)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# --- measuring what the servers saw ----------------------------------------------------------

def burst(limit: float) -> float:
    return max(2.0, 0.1 * limit)


def window_counts(times: list[float]) -> list[tuple[float, int]]:
    """For each request, the requests in the 1-second window [its time, its time + 1)."""
    times = sorted(times)
    counts, end = [], 0
    for start, first in enumerate(times):
        while end < len(times) and times[end] < first + 1.0:
            end += 1
        counts.append((first, end - start))
    return counts


def limit_during(schedule: list[tuple[float, float]], start: float, end: float) -> float:
    """The highest limit in force in [start, end); SCHEDULE: (from time, limit), sorted."""
    at_start = [limit for since, limit in schedule if since <= start] or [schedule[0][1]]
    later = [limit for since, limit in schedule if start < since < end]
    return max([at_start[-1], *later])


@dataclass
class Peak:
    """The worst 1-second window of one server against the limit in force then."""

    host: str
    peak: int
    limit: float

    @property
    def excess(self) -> float:
        return self.peak - self.limit


def worst_window(server: FarmServer, schedule: list[tuple[float, float]]) -> tuple[Peak, Peak]:
    """The windows with the largest peak - limit and peak ÷ limit."""
    by_excess = by_ratio = Peak(server.spec.host, 0, schedule[0][1])
    for start, count in window_counts([record.time for record in server.log]):
        window = Peak(server.spec.host, count, limit_during(schedule, start, start + 1.0))
        if window.excess > by_excess.excess:
            by_excess = window
        if window.peak / window.limit > by_ratio.peak / by_ratio.limit:
            by_ratio = window
    return by_excess, by_ratio


def bare_5xx_retries(log: list[RequestRecord]) -> int:
    """Requests for a path that had already been answered 5xx without Retry-After."""
    failed: set[str] = set()
    retries = 0
    for record in sorted(log, key=lambda record: record.time):
        if record.path in failed:
            retries += 1
        if 500 <= record.status < 600 and record.retry_after is None:
            failed.add(record.path)
    return retries


def throttle_share(servers: list[FarmServer]) -> tuple[int, int]:
    return (sum(server.status_count(429) for server in servers),
            sum(len(server.log) for server in servers))


def rows(out: Path, kind: str, columns: str) -> list[tuple]:
    tree = "downloaded_images" if kind == "successes" else "download_errors"
    files = list(out.glob(f"{tree}/*/*/{kind}-*.parquet"))
    if not files:
        return []
    pattern = out / tree / "*" / "*" / f"{kind}-*.parquet"
    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{pattern}', "
                      "hive_partitioning = true, union_by_name = true)").fetchall()


def url_key(url: str) -> tuple:
    """A URL compared by host, port, path and query (as prep may normalise its spelling)."""
    parts = urlsplit(url)
    return parts.hostname, parts.port, parts.path, parts.query


def makespan_text(makespan: float | None, bound: float, timeout: float,
                  goal: float | None) -> str:
    if makespan is None:
        return f"TIMEOUT after {timeout:.0f} s (bound {bound:.1f} s)"
    return (f"makespan {makespan:6.1f} s, bound {bound:.1f} s: {makespan / bound:.2f}x"
            + (f" (goal <= {goal:.2f}x)" if goal else ""))


def peak_text(peaks: list[tuple[Peak, Peak]]) -> str:
    by_excess = max((pair[0] for pair in peaks), key=lambda peak: peak.excess)
    by_ratio = max((pair[1] for pair in peaks), key=lambda peak: peak.peak / peak.limit)
    over = sum(1 for pair in peaks if pair[0].excess > burst(pair[0].limit)
               or pair[1].excess > burst(pair[1].limit))
    return (f"peak - limit worst {by_excess.excess:+.0f} ({by_excess.host}: {by_excess.peak} "
            f"in 1 s, limit {by_excess.limit:g}, burst {burst(by_excess.limit):g}); "
            f"peak ÷ limit worst {by_ratio.peak / by_ratio.limit:.2f} ({by_ratio.host}: "
            f"{by_ratio.peak} vs {by_ratio.limit:g}); servers over limit + burst: "
            f"{over}/{len(peaks)} (goal 0)")


# --- known, profiled, learned ----------------------------------------------------------------

def run_small(label: str, farm: Farm, urls: Path, scale: float, timeout: float) -> None:
    out = fresh_output(label)
    prep(urls, out)
    if label == "known":
        write_profiles(out / "profiles" / "servers.csv", [
            ServerProfile(server.address, limit, 8, status="probed")
            for server, limit in zip(farm.servers, LIMITS)
        ])
    profile_seconds = 0.0
    if label == "profiled":
        for server in farm.servers:
            server.spec.advertise_limit = True
        started = time.monotonic()
        subprocess.run([*CLI, "profile", str(out), "--default-rate-limit", "10",
                        "--max-rate-limit", "20", "--allow-network", "127.0.0.0/24"],
                       check=True, stdout=subprocess.DEVNULL)
        profile_seconds = time.monotonic() - started
    for server in farm.servers:
        server.log.clear()
    makespan = fetch(label, out, ["--default-rate-limit", "10", "--max-rate-limit", "20",
                                  "--allow-network", "127.0.0.0/24"], timeout)
    for server in farm.servers:
        server.spec.advertise_limit = False
    bound = max(count * scale / limit for count, limit in zip(IMAGES, LIMITS))
    if makespan is None:
        print(f"{label:>8}: TIMEOUT after {timeout:.0f} s (bound {bound:.1f} s)", flush=True)
        return
    throttled, requests = throttle_share(farm.servers)
    peaks = [server.peak_per_second() / limit for server, limit in zip(farm.servers, LIMITS)]
    profiled = f" (+ profile {profile_seconds:.1f} s)" if profile_seconds else ""
    print(f"{label:>8}: makespan {makespan:6.1f} s{profiled}, bound {bound:.1f} s "
          f"({makespan / bound:.2f}x), 429s {throttled}/{requests} "
          f"({throttled / requests:.2%}), peak/limit max {max(peaks):.2f} "
          f"[{' '.join(f'{p:.2f}' for p in peaks)}]", flush=True)


def run_small_scenarios(labels: list[str], scale: float, timeout: float) -> None:
    specs = [ServerSpec(f"127.0.0.{41 + i}", rate_limit=limit) for i, limit in enumerate(LIMITS)]
    with Farm(specs) as farm:
        lines = []
        for server, count in zip(farm.servers, IMAGES):
            for index in range(int(count * scale)):
                server.images[f"{index}.jpg"] = make_small_image(index)
                lines.append(server.url(f"/img/{index}.jpg"))
        urls = WORK / "politeness-urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        for label in labels:
            run_small(label, farm, urls, scale, timeout)


# --- realistic ---------------------------------------------------------------------------------

REALISTIC_SEED = 20240611
REALISTIC_HOSTS = [f"127.0.0.{61 + i}" for i in range(20)]
DOWN_HOST, FAILING_HOST = "127.0.0.81", "127.0.0.82"
DEAD_URLS = 50  # on each of the down and the failing host
REALISTIC_BOUND = 110.0  # seconds, at --scale 1: the slowest server's requests ÷ its limit
ZIPF = 1.3  # share of the k-th largest server ∝ 1 / k^ZIPF
# Share of each fault among a live server's URLs; the rest are plain /img/ URLs.
FAULT_MIX = {"flaky": 0.02, "missing": 0.03, "slow": 0.01, "html": 0.01, "truncated": 0.01,
             "redirect": 0.02}
SUCCEEDABLE = {"img", "flaky", "slow", "redirect"}


@dataclass
class PlannedHost:
    host: str
    limit: float
    urls: list[tuple[str, str]] = field(default_factory=list)  # (kind, path and query)

    def fewest_requests(self) -> int:
        """Requests any downloader needs: one a URL, the 503s of flaky ones, redirect hops,
        robots.txt."""
        extra = sum(int(path.rpartition("fails=")[2]) for kind, path in self.urls
                    if kind == "flaky")
        return len(self.urls) + extra + sum(1 for kind, _ in self.urls if kind == "redirect") + 1


def realistic_plan(scale: float) -> list[PlannedHost]:
    """The live servers: limits, URL counts and faults, the same for every run at one scale."""
    rng = random.Random(REALISTIC_SEED)
    limits = [float(rng.randint(40, 200)) for _ in REALISTIC_HOSTS]
    ranks = list(range(len(REALISTIC_HOSTS)))
    rng.shuffle(ranks)  # ranks[i]: host i's place, largest share first
    top = ranks.index(0)
    slowest = limits.index(min(limits))
    limits[top], limits[slowest] = limits[slowest], limits[top]  # the largest share binds
    # Its fewest requests are ~1.06 its URLs (flaky 503s, redirect hops): size it for the bound.
    top_count = REALISTIC_BOUND * limits[top] * scale / 1.06
    hosts = []
    for host, limit, rank in zip(REALISTIC_HOSTS, limits, ranks):
        planned = PlannedHost(host, limit)
        for index in range(max(1, round(top_count / (rank + 1) ** ZIPF))):
            draw, kind = rng.random(), "img"
            for fault, share in FAULT_MIX.items():
                if draw < share:
                    kind = fault
                    break
                draw -= share
            path = f"/{kind}/{index}.jpg"
            if kind == "flaky":
                path += f"?fails={rng.randint(1, 3)}"
            planned.urls.append((kind, path))
        hosts.append(planned)
    return hosts


def run_realistic(scale: float, timeout: float, mpi: int | None) -> None:
    label = "realistic" + (f"-mpi{mpi}" if mpi else "")
    plan = realistic_plan(scale)
    specs = [ServerSpec(planned.host, rate_limit=planned.limit, flaky_retry_after=None)
             for planned in plan] + [ServerSpec(FAILING_HOST, fail_status=500)]
    down_address = f"{DOWN_HOST}:{free_port(DOWN_HOST)}"
    with Farm(specs) as farm:
        live, failing = farm.servers[:-1], farm.servers[-1]
        lines, succeedable = [], set()
        for number, (server, planned) in enumerate(zip(live, plan)):
            for kind, path in planned.urls:
                name = path.split("/")[2].partition("?")[0]
                if kind != "missing" and kind != "html":
                    server.images[name] = make_small_image(number * 1_000_000 + len(lines))
                lines.append(server.url(path))
                if kind in SUCCEEDABLE:
                    succeedable.add(url_key(lines[-1]))
        lines += [failing.url(f"/img/{index}.jpg") for index in range(DEAD_URLS)]
        lines += [f"http://{down_address}/img/{index}.jpg" for index in range(DEAD_URLS)]
        random.Random(REALISTIC_SEED).shuffle(lines)
        bounds = {planned.host: planned.fewest_requests() / planned.limit for planned in plan}
        binding = max(bounds, key=bounds.__getitem__)
        bound = bounds[binding]
        print(f"realistic: {len(lines)} URLs ({len(succeedable)} can succeed) on "
              f"{len(live)} servers limited to {min(p.limit for p in plan):g}–"
              f"{max(p.limit for p in plan):g}/s (largest share {max(len(p.urls) for p in plan)}"
              f" URLs), + {DEAD_URLS} refused + {DEAD_URLS} always-500; bound {bound:.1f} s "
              f"({binding}: {plan[REALISTIC_HOSTS.index(binding)].fewest_requests()} requests "
              f"at {plan[REALISTIC_HOSTS.index(binding)].limit:g}/s)", flush=True)
        out = prepared(label, "realistic", lines, farm)
        makespan = fetch(label, out, FROM_NOTHING, timeout, mpi)
        time.sleep(0.2)  # the farm's last log lines
        report_realistic(label, out, farm, plan, succeedable, down_address, makespan, bound,
                         timeout)


def report_realistic(label: str, out: Path, farm: Farm, plan: list[PlannedHost],
                     succeedable: set[tuple], down_address: str, makespan: float | None,
                     bound: float, timeout: float) -> None:
    live, failing = farm.servers[:-1], farm.servers[-1]
    throttled, requests = throttle_share(farm.servers)
    peaks = [worst_window(server, [(0.0, planned.limit)]) for server, planned in zip(live, plan)]
    stored = {url_key(identifier) for (identifier,) in rows(out, "successes", "identifier")}
    errors = {url_key(identifier): (code, attempts) for identifier, code, attempts in
              rows(out, "errors", "identifier, error_code, retry_count")}
    missed = succeedable - stored
    missed_kinds = Counter(key[2].split("/")[1] for key in missed)
    missed_codes = Counter(errors.get(key, ("no row",))[0] for key in missed)
    per_url = Counter(record.path for record in failing.image_requests())
    down_errors = [(code, attempts) for key, (code, attempts) in errors.items()
                   if f"{key[0]}:{key[1]}" == down_address]
    down_codes = dict(Counter(code for code, _ in down_errors))
    bare = sum(bare_5xx_retries(server.log) for server in farm.servers)
    pad = " " * (max(9, len(label)) + 2)
    print(f"{label:>9}: {makespan_text(makespan, bound, timeout, 1.25)}", flush=True)
    print(f"{pad}429s {throttled}/{requests} ({throttled / max(1, requests):.2%}, "
          f"goal <= 1%); {peak_text(peaks)}")
    print(f"{pad}stored {len(succeedable) - len(missed)}/{len(succeedable)} that can "
          f"succeed ({1 - len(missed) / len(succeedable):.2%}, goal 100%)"
          + (f"; missed by kind {dict(missed_kinds)}, their errors {dict(missed_codes)}"
             if missed else ""))
    print(f"{pad}always-500 server: {len(failing.image_requests())} requests, at most "
          f"{max(per_url.values(), default=0)} per URL (goal <= 3); 5xx-without-Retry-After "
          f"retries {bare}; refused host: {len(down_errors)}/{DEAD_URLS} URLs with an error "
          f"row {down_codes}, retry_count at most "
          f"{max((attempts for _, attempts in down_errors), default=0)}", flush=True)


# --- changing ----------------------------------------------------------------------------------

CHANGING_HOSTS = [f"127.0.0.{91 + i}" for i in range(4)]
CHANGING_LIMITS = [100.0, 60.0, 60.0, 40.0]
CHANGING_IMAGES = [10_000, 4_800, 4_200, 3_000]  # alone: 120 s (with the changes), 80, 70, 75
CHANGES = [(30.0, 0.5), (70.0, 1.0)]  # (seconds into the fetch, factor of the first's limit)


def finish_time(requests: int, schedule: list[tuple[float, float]]) -> float:
    """When REQUESTS are served at the limits of SCHEDULE ((from second, limit), sorted)."""
    served = 0.0
    for (since, limit), (until, _) in zip(schedule, [*schedule[1:], (math.inf, 0.0)]):
        if served + limit * (until - since) >= requests:
            return since + (requests - served) / limit
        served += limit * (until - since)
    raise AssertionError("the last limit lasts forever")


def run_changing(scale: float, timeout: float, mpi: int | None) -> None:
    label = "changing" + (f"-mpi{mpi}" if mpi else "")
    specs = [ServerSpec(host, rate_limit=limit)
             for host, limit in zip(CHANGING_HOSTS, CHANGING_LIMITS)]
    # Offsets from the fetch's start, and the first server's limit from then on.
    plan = [(0.0, CHANGING_LIMITS[0])] + [(at * scale, CHANGING_LIMITS[0] * factor)
                                          for at, factor in CHANGES]
    schedules = [plan] + [[(0.0, limit)] for limit in CHANGING_LIMITS[1:]]
    counts = [max(1, round(count * scale)) for count in CHANGING_IMAGES]
    bounds = [finish_time(count + 1, schedule) for count, schedule in zip(counts, schedules)]
    bound = max(bounds)
    with Farm(specs) as farm:
        lines = []
        for number, (server, count) in enumerate(zip(farm.servers, counts)):
            lines += server.add_images(count, seed=number * 1_000_000)
        random.Random(REALISTIC_SEED).shuffle(lines)
        print(f"changing: {len(lines)} images on {len(counts)} servers limited to "
              f"{', '.join(f'{limit:g}' for limit in CHANGING_LIMITS)}/s; the first's limit "
              f"{' → '.join(f'{limit:g} at {at:g} s' for at, limit in plan[1:])}; bound "
              f"{bound:.1f} s ({', '.join(f'{b:.0f}' for b in bounds)})", flush=True)
        out = prepared(label, "changing", lines, farm)
        changer = farm.servers[0]
        changed: list[tuple[float, float]] = []  # (time.time(), limit) as they happened

        def change(limit: float) -> None:
            changer.spec.rate_limit = limit
            changed.append((time.time(), limit))

        started = time.time()
        timers = [threading.Timer(at, change, args=(limit,)) for at, limit in plan[1:]]
        for timer in timers:
            timer.start()
        makespan = fetch(label, out, FROM_NOTHING, timeout, mpi)
        for timer in timers:
            timer.cancel()
        changer.spec.rate_limit = CHANGING_LIMITS[0]
        time.sleep(0.2)
        in_force = [[(started, CHANGING_LIMITS[0]), *changed]] + \
            [[(started, limit)] for limit in CHANGING_LIMITS[1:]]
        throttled, requests = throttle_share(farm.servers)
        peaks = [worst_window(server, schedule)
                 for server, schedule in zip(farm.servers, in_force)]
        pad = " " * (max(9, len(label)) + 2)
        print(f"{label:>9}: {makespan_text(makespan, bound, timeout, None)}")
        print(f"{pad}429s {throttled}/{requests} ({throttled / max(1, requests):.2%}, "
              f"goal <= 1%); {peak_text(peaks)}")
        print(f"{pad}{changer.spec.host} requests/s by 5 s (its limit): "
              f"{rate_series(changer, started, in_force[0])}", flush=True)
        if len(changed) >= 2:
            risen_at, limit = changed[-1]
            reached = first_time_at(changer, risen_at, 0.8 * limit)
            took = "not reached" if reached is None else f"{reached - risen_at:.0f} s"
            print(f"{pad}after the limit rose back to {limit:g}/s: 80% of it reached in {took} "
                  "(goal <= 300 s)", flush=True)


def first_time_at(server: FarmServer, since: float, rate: float) -> float | None:
    """When the server first answered `rate` requests in a 1-s window after `since`."""
    times = sorted(r.time for r in server.log if r.time >= since and r.status != 429)
    first = 0
    for last, now in enumerate(times):
        while now - times[first] >= 1.0:
            first += 1
        if last - first + 1 >= rate:
            return times[first]
    return None


def rate_series(server: FarmServer, started: float, schedule: list[tuple[float, float]]) -> str:
    """Requests/s answered 2xx/3xx in each 5 s since STARTED, the limit in force at its end."""
    buckets: dict[int, int] = defaultdict(int)
    for record in server.log:
        if record.status < 400:
            buckets[int((record.time - started) // 5)] += 1
    parts = []
    for bucket in range(max(buckets, default=-1) + 1):
        end = started + 5 * (bucket + 1)
        limit = [limit for since, limit in schedule if since < end][-1]
        parts.append(f"{buckets[bucket] / 5:.0f}({limit:g})")
    return " ".join(parts)


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every image count")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--mpi", type=int, metavar="N",
                        help="realistic/changing: fetch under `mpirun -n N` (--executor mpi)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one fetch may take before it is stopped")
    args = parser.parse_args()
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    WORK.mkdir(exist_ok=True)
    small = [label for label in chosen if label in ("known", "profiled", "learned")]
    if small:
        run_small_scenarios(small, args.scale, args.timeout)
    for label, run in (("realistic", run_realistic), ("changing", run_changing)):
        if label not in chosen:
            continue
        if args.mpi and shutil.which("mpirun") is None:
            print(f"{label}: skipped: --mpi needs mpirun, which is not on PATH", flush=True)
            continue
        run(args.scale, args.timeout, args.mpi)


if __name__ == "__main__":
    main()
