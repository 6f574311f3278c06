"""How long would a GBIF-sized download take? `distributed-downloader plan` on a synthetic run.

    python benchmarks/plan_gbif.py [--rows 200000000]

Writes the prepared tables of a synthetic run (no images, no network): 200 M rows on 545
servers with the skew of prep_bench.py (Zipf 1.3: the largest server holds 29%, the largest
five 56%), batches of 10,000, then plans it for several cluster sizes, in two cases:
  polite      every server at the default 10 requests/s (what a run without permission gets)
  cdn         the five largest servers at 100 requests/s, set by hand in a rates file, as a
              user who asked those hosts (CDN-backed object stores) would
and prints each expected duration next to the original downloader's nominal ceiling
(42 ranks × 10 requests/s = 420 images/s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from prep_bench import SERVERS, host_weights  # noqa: E402

from distributed_downloader.schema import SERVERS as SERVERS_SCHEMA  # noqa: E402

WORK = Path(__file__).parent / "work" / "plan-gbif"
BATCH_SIZE = 10_000
CLUSTERS = [(1, 4), (4, 8), (8, 8), (32, 8)]


def write_run(out: Path, rows: int) -> list[str]:
    weights = host_weights(SERVERS)
    counts = [max(1, round(rows * weight)) for weight in weights]
    names = [f"images{rank}.example.org" for rank in range(SERVERS)]
    batches = [-(-count // BATCH_SIZE) for count in counts]
    (out / "prep").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"server_name": names, "rows": counts, "batches": batches},
                            schema=SERVERS_SCHEMA), out / "prep" / "servers.parquet")
    (out / "prep" / "summary.json").write_text(json.dumps({
        "batch_size": BATCH_SIZE, "batches": sum(batches), "download_rows": sum(counts),
        "servers": SERVERS}))
    return names


def plan(out: Path, nodes: int, workers: int, rates: Path | None) -> dict:
    command = [sys.executable, "-m", "distributed_downloader", "plan", str(out), "--max-nodes",
               str(nodes), "--workers-per-node", str(workers), "--json"]
    if rates:
        command += ["--rates", str(rates)]
    return json.loads(subprocess.run(command, check=True, capture_output=True,
                                     text=True).stdout)


def days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000_000)
    args = parser.parse_args()
    names = write_run(WORK / "polite", args.rows)
    write_run(WORK / "cdn", args.rows)
    rates = WORK / "cdn-rates.csv"
    rates.write_text("server_name,rate_limit\n" + "".join(f"{n},100\n" for n in names[:5]))

    print(f"{args.rows:,} rows, {SERVERS} servers; the largest holds "
          f"{host_weights(SERVERS)[0]:.0%}\n")
    print("| case | nodes × workers | expected | cores alone | bound by | original nominal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, case_rates in (("polite", None), ("cdn", rates)):
        for nodes, workers in CLUSTERS:
            result = plan(WORK / case, nodes, workers, case_rates)
            top = result["largest"][0]
            print(f"| {case} | {nodes} × {workers} | {days(result['seconds'])} | "
                  f"{days(result['capacity_bound_seconds'])} | {top['server']} "
                  f"({top['rows']:,} rows at {top['rate']:g}/s, {top['share_of_run']:.0%}) | "
                  f"{days(result['original_nominal_seconds'])} |")


if __name__ == "__main__":
    main()
