"""Prep's speed and memory on a generated GBIF multimedia.txt, against one plain DuckDB query.

    python benchmarks/prep_bench.py --rows 3000000 10000000 30000000

For each N it writes `benchmarks/work/multimedia-N.txt` (once; reused later), runs
`distributed-downloader prep` on it in a child process, then the reference in another: one
DuckDB query that reads the file (every GBIF column as VARCHAR), keeps StillImage rows with an
image/* format and a gbifID, drops repeated URLs, takes the host with a regexp and writes the
columns prep writes to Parquet partitioned by host, under the same `--memory-limit`. It reports
rows/s and peak RSS of each (from the child's own rusage) and prep's speed as a ratio of the
reference's. The reference checks, cleans and numbers nothing (no URL normalisation, no UUIDs,
no rejected rows, no batches): it is the floor of what the engine costs.

Hosts follow a Zipf-like skew over 545 servers (the largest few hold most rows), as in GBIF;
about 5% of URLs need the full URL parser (spaces, non-ASCII, upper-case hosts), 3% repeat
an earlier URL, and a few rows are dropped by the filter or rejected. Hosts are `*.localhost`
names: prep never connects, and if anything did, they resolve to loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HEADER = (
    "gbifID\ttype\tformat\tidentifier\treferences\ttitle\tdescription\tsource\taudience\t"
    "created\tcreator\tcontributor\tpublisher\tlicense\trightsHolder\n"
)
SERVERS = 545
WORK = Path(__file__).parent / "work"


def host_weights(count: int, exponent: float = 1.3) -> list[float]:
    weights = [1 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def generate(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    hosts = [f"images.museum{rank}.localhost" for rank in range(SERVERS)]
    weights = host_weights(SERVERS)
    recent: list[str] = []
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(HEADER)
        chosen = rng.choices(range(SERVERS), weights=weights, k=rows)
        for gbif_id, host_index in enumerate(chosen, start=1_000_000_000):
            roll = rng.random()
            if roll < 0.03 and recent:
                url = rng.choice(recent)
            elif roll < 0.08:
                url = f"http://{hosts[host_index].upper()}/media/Spécimen {gbif_id} (dorsal).jpg"
            elif roll < 0.081:
                url = rng.choice(["", "javascript:void(0)", "images/relative.jpg"])
            else:
                url = f"https://{hosts[host_index]}/media/{gbif_id % 9973}/{gbif_id}.jpg?v=2"
            if len(recent) < 1000:
                recent.append(url)
            elif roll > 0.99:
                recent[rng.randrange(1000)] = url
            kind = "StillImage" if rng.random() > 0.02 else "Sound"
            fmt = "image/jpeg" if rng.random() > 0.01 else "text/html"
            out.write(
                f"{gbif_id}\t{kind}\t{fmt}\t{url}\thttps://museum{host_index}.localhost/occ/"
                f"{gbif_id}\tSpecimen \"{gbif_id}\" of Aus bus\t\tMuseum {host_index}\t\t"
                f"2019-03-0{gbif_id % 9 + 1}\tCollector {gbif_id % 313}\t\tMuseum {host_index}\t"
                f"CC_BY_4_0\tMuseum {host_index}\n"
            )
    tmp.rename(path)


REFERENCE = """
import sys, duckdb
source, output, memory_limit, spill = sys.argv[1:]
columns = {columns}
con = duckdb.connect()
con.execute(f"SET memory_limit = '{{memory_limit}}'")
con.execute(f"SET temp_directory = '{{spill}}'")
con.execute("SET preserve_insertion_order = false")
con.execute(f\"\"\"
    COPY (
        SELECT DISTINCT ON (identifier) gbifID AS source_id, identifier, license, source, title,
               regexp_extract(identifier, '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]+)', 1) AS server_name
        FROM read_csv('{{source}}', delim = '\\t', header = true, quote = '', escape = '',
                      auto_detect = false, columns = {{columns}})
        WHERE type = 'StillImage' AND format LIKE 'image/%' AND gbifID IS NOT NULL
    ) TO '{{output}}' (FORMAT parquet, PARTITION_BY (server_name))\"\"\")
"""


def timed_child(command: list[str], may_fail: bool = False) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MiB, last error line or "") of one child process,
    from its own rusage; a failure ends the benchmark unless `may_fail`. CPU time is what a
    shared machine distorts least."""
    with open(WORK / "child.log", "w+") as log:
        started = time.monotonic()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.monotonic() - started
        error = ""
        if status != 0:
            log.seek(0)
            text = log.read()
            if not may_fail:
                raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{text[-2000:]}")
            error = next((line for line in reversed(text.splitlines()) if "Error" in line),
                         f"exit status {status}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, error


def run_prep(input_path: Path, output: Path, memory_limit: str) -> dict:
    if output.exists():
        shutil.rmtree(output)
    seconds, cpu, peak, _ = timed_child(
        [sys.executable, "-m", "distributed_downloader", "prep", str(input_path),
         "--output", str(output), "--memory-limit", memory_limit])
    summary = json.loads((output / "prep" / "summary.json").read_text())
    summary["wall_seconds"], summary["cpu_seconds"], summary["peak_mib"] = seconds, cpu, peak
    return summary


def run_reference(input_path: Path, output: Path, memory_limit: str) -> dict:
    """The plain DuckDB query, in a child process of its own; its rows are counted after. It
    may fail (out of memory, at some size): the error is reported instead of its speed."""
    import duckdb

    for path in (output, output.with_suffix(".spill")):
        if path.exists():
            shutil.rmtree(path)
    columns = {name: "VARCHAR" for name in HEADER.strip().split("\t")}
    script = REFERENCE.format(columns=repr(columns))
    seconds, cpu, peak, error = timed_child(
        [sys.executable, "-c", script, str(input_path), str(output), memory_limit,
         str(output.with_suffix(".spill"))], may_fail=True)
    shutil.rmtree(output.with_suffix(".spill"), ignore_errors=True)
    if error:
        return {"wall_seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "error": error}
    rows = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/*/*.parquet')").fetchall()
    return {"wall_seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "rows": rows[0][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--memory-limit", default="512MB")
    parser.add_argument("--no-reference", action="store_true",
                        help="time prep only, without the plain DuckDB query")
    parser.add_argument("--reference-memory-limit",
                        help="DuckDB's memory limit for the reference [default: --memory-limit]")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each size (the machine may be shared: timings vary)")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'rows':>11} | {'prep s':>7} {'CPU s':>6} {'rows/s':>9} {'RSS MiB':>7} {'kept':>10} | "
          f"{'ref s':>7} {'CPU s':>6} {'rows/s':>9} {'RSS MiB':>7} {'kept':>10} | {'ratio':>5} "
          f"{'CPU':>5}")
    for rows in [size for size in args.rows for _ in range(args.repeat)]:
        input_path = WORK / f"multimedia-{rows}.txt"
        if not input_path.exists():
            generate(input_path, rows)
        prep = run_prep(input_path, WORK / f"out-{rows}", args.memory_limit)
        line = (f"{rows:>11,} | {prep['wall_seconds']:>7.1f} {prep['cpu_seconds']:>6.1f} "
                f"{rows / prep['wall_seconds']:>9,.0f} {prep['peak_mib']:>7.0f} "
                f"{prep['download_rows']:>10,} | ")
        if not args.no_reference:
            ref = run_reference(input_path, WORK / f"reference-{rows}",
                                args.reference_memory_limit or args.memory_limit)
            if "error" in ref:
                line += (f"{ref['wall_seconds']:>7.1f} {ref['cpu_seconds']:>6.1f} failed after, "
                         f"peak {ref['peak_mib']:.0f} MiB: {ref['error'][:70]}")
            else:
                ratio = ref["wall_seconds"] / prep["wall_seconds"]
                cpu_ratio = ref["cpu_seconds"] / prep["cpu_seconds"]
                line += (f"{ref['wall_seconds']:>7.1f} {ref['cpu_seconds']:>6.1f} "
                         f"{rows / ref['wall_seconds']:>9,.0f} {ref['peak_mib']:>7.0f} "
                         f"{ref['rows']:>10,} | {ratio:>5.2f} {cpu_ratio:>5.2f}")
        print(line, flush=True)
    print("ratio: prep's rows/s over the reference's (above 1: prep is faster); CPU: the "
          "reference's CPU seconds over prep's (above 1: prep uses less); "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
