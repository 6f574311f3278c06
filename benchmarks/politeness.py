"""Politeness at speed: a farm of rate-limited servers with a skewed share of the images.

    python benchmarks/politeness.py [--scale 1.0]

Eight loopback servers allow 20, 10, 10, 5, 5, 5, 2 and 2 requests/s (429 with Retry-After
beyond that) and hold 1200, 400, 300, 150, 120, 100, 40 and 30 images. No run can finish sooner
than the slowest server's images ÷ its limit (the bound, 60 s here). Three runs:
  known      the servers' limits are in OUT/profiles/servers.csv, as a previous run or a
             rates file leaves them
  profiled   the servers advertise their limits (RateLimit-Policy) and `profile` runs first,
             as `download` does (its ~5 s are reported apart, not in the makespan)
  learned    no profile: every server starts at --default-rate-limit 10 and the engine adapts
For each: the makespan against the bound, the share of 429 answers, and each server's peak
requests in any 1-second window against its limit. Goals: makespan <= 1.15x the bound, 429s
<= 1%, peak <= 1.2x the limit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from distributed_downloader.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.profile import ServerProfile, write_profiles

WORK = Path(__file__).parent / "work"
LIMITS = [20, 10, 10, 5, 5, 5, 2, 2]
IMAGES = [1200, 400, 300, 150, 120, 100, 40, 30]


def run(label: str, farm: Farm, urls: Path, scale: float) -> None:
    out = WORK / f"politeness-{label}"
    if out.exists():
        shutil.rmtree(out)
    base = [sys.executable, "-m", "distributed_downloader"]
    subprocess.run([*base, "prep", str(urls), "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
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
        subprocess.run([*base, "profile", str(out), "--default-rate-limit", "10",
                        "--max-rate-limit", "20", "--allow-network", "127.0.0.0/24"],
                       check=True, stdout=subprocess.DEVNULL)
        profile_seconds = time.monotonic() - started
    for server in farm.servers:
        server.log.clear()
    started = time.monotonic()
    subprocess.run([*base, "fetch", str(out), "--default-rate-limit", "10",
                    "--max-rate-limit", "20", "--allow-network", "127.0.0.0/24"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    makespan = time.monotonic() - started
    bound = max(count * scale / limit for count, limit in zip(IMAGES, LIMITS))
    requests = sum(len(server.log) for server in farm.servers)
    throttled = sum(server.status_count(429) for server in farm.servers)
    peaks = [server.peak_per_second() / limit for server, limit in zip(farm.servers, LIMITS)]
    profiled = f" (+ profile {profile_seconds:.1f} s)" if profile_seconds else ""
    print(f"{label:>8}: makespan {makespan:6.1f} s{profiled}, bound {bound:.1f} s "
          f"({makespan / bound:.2f}x), 429s {throttled}/{requests} "
          f"({throttled / requests:.2%}), peak/limit max {max(peaks):.2f} "
          f"[{' '.join(f'{p:.2f}' for p in peaks)}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every image count")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    specs = [ServerSpec(f"127.0.0.{41 + i}", rate_limit=limit) for i, limit in enumerate(LIMITS)]
    with Farm(specs) as farm:
        lines = []
        for server, count in zip(farm.servers, IMAGES):
            for index in range(int(count * args.scale)):
                server.images[f"{index}.jpg"] = make_small_image(index)
                lines.append(server.url(f"/img/{index}.jpg"))
        urls = WORK / "politeness-urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        for label in ("known", "profiled", "learned"):
            run(label, farm, urls, scale=args.scale)


if __name__ == "__main__":
    main()
