"""Slurm periods and slow servers: a chain of 2-minute periods against servers allowing 0.9–9/s.

    python benchmarks/slurm_slow_servers.py [--timeout 1800] [--time-limit 00:02:00]
                                            [--stop-margin 30] [--num-downloads 20]

Reproduces the issue "Slurm periods and slow servers": on a single-node Slurm with 2-minute
periods and the original downloader's YAML, a 900-image run whose servers allow 0.9–9
requests/s took 9 periods, ended `stalled` with 8 rows never fetched, saw 2.9% 429s, and the
servers allowing 0.9 requests/s got 2 requests within one second.

A loopback farm of ten servers (127.0.0.101–110) with hidden limits of 0.9, 0.9, 0.9, 1.5, 2,
3, 4, 5, 7 and 9 requests/s (429 with Retry-After: 1 beyond; under 1/s the farm allows one
request per 1/limit s) holds 900 images: 360, 200 and 100 on the three 0.9/s servers (the
first alone needs 400 s of fetching: the bound, several periods' worth), 40, 30, 30, 30, 30,
40 and 40 on the others. A YAML in the original downloader's format (path_to_input,
path_to_output_folder, account, downloader_parameters: num_downloads, max_nodes 1,
workers_per_node 2, cpu_per_worker 1, batch_size 50, default_rate_limit 10, ...) plus what a
loopback run needs (allow_network, time_limit, stop_margin) goes to `slurm submit --config`;
the benchmark then polls `slurm status OUT --json` until the chain is no longer running
(`slurm cancel OUT` after --timeout). Everything lives in benchmarks/work/slurm-slow-servers/
(removed and made again); the farm's request log is written there as requests.csv.

It reports: the chain's final state and reason, the download periods, rows stored / expected
(successes read with DuckDB), the share of 429s over every request the farm saw (profile and
robots.txt included), for each server its smallest gap between two requests, its peak requests
in any 1-s window against its limit, and for the <1/s servers the gaps shorter than 1/limit
(by phase: profile, period 1, later periods); and per period the 429s in its first 10 s (a
restart burst), counted from the period's `started` in OUT/slurm/chain.json and from its first
request (period 1 is first contact, not a restart: its 429s are reported apart).
Goals: chain `finished`, 100% stored, 429s <= 1%, no two requests closer than 1/limit at the
<1/s servers after the first period, no 429 in the first 10 s of a restart (periods 2+).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import duckdb

from distributed_downloader.testing.farm import Farm, RequestRecord, ServerSpec

WORK = Path(__file__).parent / "work" / "slurm-slow-servers"
CLI = [sys.executable, "-m", "distributed_downloader"]
HOSTS = [f"127.0.0.{101 + i}" for i in range(10)]
LIMITS = [0.9, 0.9, 0.9, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0]
IMAGES = [360, 200, 100, 40, 30, 30, 30, 30, 40, 40]  # 900 in all
BURST_SECONDS = 10.0  # a period's first seconds, where a restart burst would show
POLL_SECONDS = 10.0
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "RESIZING"}


# --- the run -----------------------------------------------------------------------------------

def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)
    if check and done.returncode != 0:
        raise SystemExit(f"`{' '.join(map(str, args))}` failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done


def chain_status(out: Path) -> dict | None:
    done = cli("slurm", "status", out, "--json", check=False)
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout)
    except ValueError:
        return None


def write_config(path: Path, urls: Path, out: Path, args: argparse.Namespace) -> None:
    """The original downloader's YAML, plus our keys a loopback run needs."""
    path.write_text(
        f"path_to_input: {urls}\n"
        f"path_to_output_folder: {out}\n"
        "account: bench\n"
        "downloader_parameters:\n"
        f"  num_downloads: {args.num_downloads}\n"
        "  max_nodes: 1\n"
        "  workers_per_node: 2\n"
        "  cpu_per_worker: 1\n"
        "  header: {\"User-Agent\": \"distributed-downloader-benchmark\"}\n"
        "  image_size: 720\n"
        "  logger_level: INFO\n"
        "  batch_size: 50\n"
        "  rate_multiplier: 1\n"
        "  default_rate_limit: 10\n"
        "# Ours: loopback servers may be contacted; short periods.\n"
        "allow_network: 127.0.0.0/24\n"
        f"time_limit: \"{args.time_limit}\"\n"
        f"stop_margin: {args.stop_margin}\n")


def fresh_work() -> None:
    out = WORK / "out"
    if (out / "slurm" / "chain.json").exists():
        status = chain_status(out)
        if status is not None and status["state"] == "running":
            cli("slurm", "cancel", out, check=False)  # an earlier benchmark's chain
    if WORK.exists():
        shutil.rmtree(WORK)  # only the benchmark's own folder
    WORK.mkdir(parents=True)


def wait_for_chain(out: Path, timeout: float) -> tuple[dict | None, float, bool]:
    """Poll until the chain is no longer running; (last status, seconds, timed out)."""
    started = time.monotonic()
    status, shown = None, None
    while time.monotonic() - started < timeout:
        status = chain_status(out) or status
        if status is not None:
            periods = sum(1 for job in status["jobs"]
                          if job["kind"] == "download" and job["started"])
            line = (f"  {time.monotonic() - started:5.0f} s: chain {status['state']}, "
                    f"{status['rows_done']}/{status['rows']} rows, {periods} periods started")
            if line.split(": ", 1)[1] != shown:
                print(line, flush=True)
                shown = line.split(": ", 1)[1]
            if status["state"] != "running":
                # The job that ended the chain leaves Slurm's queue within seconds.
                for _ in range(12):
                    if not any(job["slurm_state"] in ACTIVE_STATES for job in status["jobs"]):
                        break
                    time.sleep(5)
                    status = chain_status(out) or status
                return status, time.monotonic() - started, False
        time.sleep(POLL_SECONDS)
    cancelled = cli("slurm", "cancel", out, check=False)
    print(f"  timeout: {cancelled.stdout.strip()}", flush=True)
    time.sleep(5)
    return chain_status(out) or status, time.monotonic() - started, True


# --- measuring -----------------------------------------------------------------------------------

def stored_rows(out: Path) -> int:
    pattern = out / "downloaded_images" / "*" / "*" / "successes-*.parquet"
    if not list(out.glob("downloaded_images/*/*/successes-*.parquet")):
        return 0
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchall()[0][0]


def error_codes(out: Path) -> dict[str, int]:
    pattern = out / "download_errors" / "*" / "*" / "errors-*.parquet"
    if not list(out.glob("download_errors/*/*/errors-*.parquet")):
        return {}
    return dict(duckdb.sql(f"SELECT error_code, count(*) FROM read_parquet('{pattern}') "
                           "GROUP BY 1 ORDER BY 2 DESC").fetchall())


def min_gap(records: list[RequestRecord]) -> float:
    times = sorted(record.time for record in records)
    return min((b - a for a, b in pairwise(times)), default=math.inf)


def short_gaps(records: list[RequestRecord], interval: float) -> list[tuple[float, float]]:
    """(time of the later request, gap) for consecutive requests closer than `interval`."""
    times = sorted(record.time for record in records)
    return [(b, b - a) for a, b in pairwise(times) if b - a < interval]


def phase_of(when: float, starts: list[float]) -> int:
    """0: before the first period (prep, profile); k: period k."""
    return sum(1 for start in starts if when >= start)


def write_log(path: Path, farm: Farm) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["host", "limit", "time", "path", "status", "retry_after"])
        for server in farm.servers:
            for record in server.log:
                writer.writerow([server.spec.host, server.spec.rate_limit, f"{record.time:.4f}",
                                 record.path, record.status, record.retry_after or ""])


def goal(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(farm: Farm, out: Path, status: dict | None, seconds: float, timed_out: bool,
           bound: float) -> None:
    expected = sum(IMAGES)
    downloads = [job for job in (status or {}).get("jobs", []) if job["kind"] == "download"]
    periods = [job for job in downloads if job["started"]]
    starts = [job["started"] for job in periods]
    stored = stored_rows(out)
    errors = error_codes(out)
    every = [record for server in farm.servers for record in server.log]
    throttled = sum(1 for record in every if record.status == 429)
    state = status["state"] if status else "unknown"
    reason = status["reason"] if status else ""

    print("\n=== summary ===")
    print(f"chain: {state} ({reason}) after {seconds:.0f} s"
          + (" [TIMEOUT: cancelled]" if timed_out else "")
          + f"   goal finished: {goal(state == 'finished')}")
    print(f"download periods: {len(periods)} started ({len(downloads)} submitted); bound "
          f"{bound:.0f} s of fetching ({HOSTS[IMAGES.index(max(IMAGES))]}: {max(IMAGES)} "
          f"images at {LIMITS[IMAGES.index(max(IMAGES))]:g}/s)")
    print(f"rows stored: {stored}/{expected} ({stored / expected:.1%})"
          + (f"; errors {errors}" if errors else "")
          + f"   goal 100%: {goal(stored == expected)}")
    share = throttled / max(1, len(every))
    print(f"429s: {throttled}/{len(every)} requests ({share:.2%})   goal <= 1%: "
          f"{goal(share <= 0.01)}")

    print("\nper server (all requests the farm saw: robots.txt, profile probes, fetches):")
    print(f"  {'server':<12}{'limit':>6}{'images':>7}{'requests':>9}{'429s':>6}"
          f"{'429s p|1|later':>15}{'min gap s':>10}{'1/limit':>8}{'peak/1s':>11}  gaps < "
          "1/limit (profile | period 1 | later)")
    late_short = 0
    for server, limit, images in zip(farm.servers, LIMITS, IMAGES):
        log = server.log
        gaps = short_gaps(log, 1.0 / limit)
        by_phase, throttled_by_phase = [0, 0, 0], [0, 0, 0]
        for when, _ in gaps:
            by_phase[min(2, phase_of(when, starts))] += 1
        for record in log:
            if record.status == 429:
                throttled_by_phase[min(2, phase_of(record.time, starts))] += 1
        if limit < 1:
            late_short += by_phase[2]
        gap_text = f"{by_phase[0]} | {by_phase[1]} | {by_phase[2]}" if limit < 1 else \
            f"({len(gaps)} in all; under 1/s limits only)"
        throttled_text = "|".join(map(str, throttled_by_phase))
        print(f"  {server.spec.host:<12}{limit:>6g}{images:>7}{len(log):>9}"
              f"{server.status_count(429):>6}{throttled_text:>15}{min_gap(log):>10.3f}"
              f"{1 / limit:>8.3f}{server.peak_per_second():>5} vs {limit:<3g}  {gap_text}")
    print(f"gaps shorter than 1/limit at the <1/s servers after the first period: {late_short}"
          f"   goal 0: {goal(late_short == 0)}")

    print("\nper period (429s in the first 10 s from `started`, and from the period's first "
          "request):")
    print(f"  {'period':<7}{'started':>9}{'first req':>10}{'lasted':>8}{'requests':>9}"
          f"{'429s':>6}{'429s@start':>11}{'429s@1st req':>13}  chain's record")
    restart_bursts, first_burst = 0, 0
    profile_records = [r for r in every if not starts or r.time < starts[0]]
    print(f"  {'profile':<7}{'':>9}{'':>10}{'':>8}{len(profile_records):>9}"
          f"{sum(1 for r in profile_records if r.status == 429):>6}")
    for index, job in enumerate(periods):
        start = job["started"]
        end = starts[index + 1] if index + 1 < len(starts) else math.inf
        records = sorted((r for r in every if start <= r.time < end), key=lambda r: r.time)
        first = records[0].time if records else None
        at_start = sum(1 for r in records if r.status == 429 and r.time < start + BURST_SECONDS)
        at_first = sum(1 for r in records if first is not None and r.status == 429
                       and r.time < first + BURST_SECONDS)
        if job["period"] == 1:
            first_burst = max(at_start, at_first)
        else:
            restart_bursts += max(at_start, at_first)
        lasted = f"{end - start:.0f} s" if end != math.inf else "-"
        record = ""
        if job.get("rows_committed") is not None:
            record = f"{job['rows_committed']} rows, {job['requests']} requests"
            if job.get("waiting"):
                record += f"; waited on {', '.join(job['waiting'])}"
        print(f"  {job['period']:<7}{time.strftime('%H:%M:%S', time.localtime(start)):>9}"
              f"{(f'+{first - start:.1f} s' if first else '-'):>10}{lasted:>8}"
              f"{len(records):>9}{sum(1 for r in records if r.status == 429):>6}"
              f"{at_start:>11}{at_first:>13}  {record}")
    print(f"429s in the first {BURST_SECONDS:g} s of a restart (periods 2+): {restart_bursts}"
          f"   goal 0: {goal(restart_bursts == 0)}; of period 1 (first contact: rates learned "
          f"down from default_rate_limit 10, not a restart): {first_burst}")
    print(f"\nfarm's request log: {WORK / 'requests.csv'}; chain: {out / 'slurm'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds the chain may run before it is cancelled")
    parser.add_argument("--time-limit", default="00:02:00", help="each period's Slurm limit")
    parser.add_argument("--stop-margin", type=int, default=30,
                        help="seconds before the limit when a period stops (at least 30)")
    parser.add_argument("--num-downloads", type=int, default=20, help="most download periods")
    args = parser.parse_args()
    for command in ("sbatch", "squeue", "srun"):
        if shutil.which(command) is None:
            raise SystemExit(f"{command} not found: run `bash scripts/setup-cluster.sh` (root)")
    fresh_work()
    out, urls, config = WORK / "out", WORK / "urls.txt", WORK / "hpc.yaml"
    specs = [ServerSpec(host, rate_limit=limit) for host, limit in zip(HOSTS, LIMITS)]
    bound = max(images / limit for images, limit in zip(IMAGES, LIMITS))
    with Farm(specs) as farm:
        lines = []
        for number, (server, count) in enumerate(zip(farm.servers, IMAGES)):
            lines += server.add_images(count, seed=number * 100_000)
        urls.write_text("\n".join(lines) + "\n")
        write_config(config, urls, out, args)
        print(f"{len(lines)} images on {len(specs)} servers allowing "
              f"{', '.join(f'{limit:g}' for limit in LIMITS)} requests/s "
              f"({', '.join(map(str, IMAGES))} images); bound {bound:.0f} s of fetching; "
              f"periods of {args.time_limit} (stop_margin {args.stop_margin} s)", flush=True)
        print(f"$ python {' '.join(CLI[1:])} slurm submit --config {config}", flush=True)
        submitted = cli("slurm", "submit", "--config", config)
        print("  " + submitted.stdout.strip().replace("\n", "\n  "), flush=True)
        try:
            status, seconds, timed_out = wait_for_chain(out, args.timeout)
        except BaseException:
            cli("slurm", "cancel", out, check=False)
            raise
        time.sleep(0.5)  # the farm's last log lines
        write_log(WORK / "requests.csv", farm)
        report(farm, out, status, seconds, timed_out, bound)


if __name__ == "__main__":
    main()
