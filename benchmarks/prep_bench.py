"""Prep throughput and peak memory on a generated GBIF-shaped multimedia.txt.

    python benchmarks/prep_bench.py --rows 1000000 10000000

For each N it writes `benchmarks/work/multimedia-N.txt` (once; reused later), runs
`distributed-downloader prep` on it in a child process, and reports rows/s and the child's peak
RSS. Hosts follow a Zipf-like skew over 545 servers (the largest few hold most rows), as in
GBIF; about 5% of URLs need the full URL parser (spaces, non-ASCII, upper-case hosts), 3% repeat
an earlier URL, and a few rows are dropped by the filter or rejected. Hosts are `*.localhost`
names: prep never connects, and if anything did, they resolve to loopback.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
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


def run_prep(input_path: Path, output: Path, memory_limit: str) -> dict:
    if output.exists():
        shutil.rmtree(output)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "distributed_downloader", "prep", str(input_path),
         "--output", str(output), "--memory-limit", memory_limit],
        check=True, stdout=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    summary = json.loads((output / "prep" / "summary.json").read_text())
    summary["wall_seconds"] = seconds
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--memory-limit", default="512MB")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    print(f"{'rows':>12} {'seconds':>8} {'rows/s':>10} {'peak RSS MiB':>13} {'servers':>8} "
          f"{'batches':>8}")
    for rows in args.rows:
        input_path = WORK / f"multimedia-{rows}.txt"
        if not input_path.exists():
            generate(input_path, rows)
        summary = run_prep(input_path, WORK / f"out-{rows}", args.memory_limit)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"{rows:>12,} {summary['wall_seconds']:>8.1f} "
              f"{rows / summary['wall_seconds']:>10,.0f} {peak:>13.0f} "
              f"{summary['servers']:>8} {summary['batches']:>8}", flush=True)


if __name__ == "__main__":
    main()
