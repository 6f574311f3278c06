"""Many small servers at once: the same images over 240 servers against the same over 4.

    python benchmarks/many_servers.py [--images 5000] [--hosts 240] [--few 4]

GBIF's long tail: most servers hold a few dozen images. A loopback farm without limits serves
the same photos under N distinct URLs, spread once over `--hosts` servers (127.0.1.1 ...) and
once over `--few`; `distributed-downloader fetch` (default politeness, no profile: every server
is a first contact) fetches each, and the script prints both times and their ratio, measured in
the same run, and each fetch's CPU seconds (its workers included) and theirs: the run is bound by
the CPU, and CPU seconds are less swayed than the time by other jobs on the machine. 1.0 means
many small servers cost nothing more than a few large ones.

Run as root, it re-runs itself inside a network namespace holding only loopback
(`unshare -n`), so that nothing can reach beyond this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from distributed_downloader.testing.netns import in_loopback_namespace

WORK = Path(__file__).parent / "work"
SIZES = [(640, 480), (800, 600), (1024, 768)]
PHOTOS = 24


def photos() -> list[bytes]:
    from distributed_downloader.testing.farm import make_photo

    return [make_photo(*SIZES[index % len(SIZES)], seed=index) for index in range(PHOTOS)]


def hosts(count: int) -> list[str]:
    """127.0.1.1, 127.0.1.2, ...: 254 per /24."""
    return [f"127.0.{1 + index // 254}.{1 + index % 254}" for index in range(count)]


def quietly(command: list[str]) -> None:
    """Run a command; its output is shown only when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


def children_cpu() -> float:
    """CPU seconds (user + system) of the child processes waited for so far, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fetch(farm: object, images: int, bodies: list[bytes], out: Path,
          ) -> tuple[float, float, float, dict]:
    """prep (not timed) and fetch of `images` URLs spread evenly over the farm's servers:
    the fetch's seconds, when it started, its CPU seconds (workers included), its summary."""
    servers = farm.servers  # type: ignore[attr-defined]
    lines = []
    for index in range(images):
        server = servers[index % len(servers)]
        server.images[f"{index}.jpg"] = bodies[index % len(bodies)]
        lines.append(server.url(f"/img/{index}.jpg"))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    urls = out.with_suffix(".txt")
    urls.write_text("\n".join(lines) + "\n")
    base = [sys.executable, "-m", "distributed_downloader"]
    quietly([*base, "prep", str(urls), "--output", str(out)])
    started, started_at, cpu = time.monotonic(), time.time(), children_cpu()
    quietly([*base, "fetch", str(out), "--default-rate-limit", "100000",
             "--allow-network", "127.0.0.0/8"])
    seconds, cpu = time.monotonic() - started, children_cpu() - cpu
    return seconds, started_at, cpu, json.loads((out / "fetch_summary.json").read_text())


def most_servers_at_once(servers: list) -> int:
    """The most servers whose first-to-last image request spans overlap at one moment."""
    spans = []
    for server in servers:
        times = [record.time for record in server.image_requests()]
        if times:
            spans.append((min(times), max(times)))
    return max((sum(1 for start, end in spans if start <= moment <= end)
                for moment, _ in spans), default=0)


def timeline(servers: list, started_at: float) -> None:
    """Second by second from the fetch's start: image requests, robots.txt requests, servers
    asked for their first image, and servers between their first and last image request."""
    spans, robots = [], []
    for server in servers:
        robots += [record.time for record in server.log if record.path == "/robots.txt"]
        times = [record.time for record in server.image_requests()]
        if times:
            spans.append((min(times), max(times)))
    images = sorted(t for server in servers for t in (r.time for r in server.image_requests()))
    end = int(max(images) - started_at) + 1 if images else 0
    print("    s  images  robots  first  in-flight")
    for second in range(end):
        low, high = started_at + second, started_at + second + 1
        print(f"{second:5d} {sum(low <= t < high for t in images):7d} "
              f"{sum(low <= t < high for t in robots):7d} "
              f"{sum(low <= start < high for start, _ in spans):6d} "
              f"{sum(start < high and end >= low for start, end in spans):10d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--hosts", type=int, default=240)
    parser.add_argument("--few", type=int, default=4)
    parser.add_argument("--timeline", action="store_true",
                        help="print each second's requests and servers in flight")
    args = parser.parse_args()
    in_loopback_namespace()
    from distributed_downloader.testing.farm import Farm, ServerSpec

    bodies = photos()
    print(f"{args.images} images, mean {sum(map(len, bodies)) / len(bodies) / 1e3:.0f} KB, "
          f"{os.cpu_count()} cores", flush=True)
    seconds, cpu = {}, {}
    for count in (args.few, args.hosts):
        with Farm([ServerSpec(host) for host in hosts(count)]) as farm:
            seconds[count], started_at, cpu[count], summary = fetch(
                farm, args.images, bodies, WORK / f"many-servers-{count}")
            at_once = most_servers_at_once(farm.servers)
            if args.timeline:
                timeline(farm.servers, started_at)
        print(f"{count:>4} servers: {seconds[count]:.1f} s, "
              f"{args.images / seconds[count]:.0f} images/s, {cpu[count]:.1f} s of CPU "
              f"({summary['successes']} stored, "
              f"at most {at_once} servers fetched at once, "
              f"worker peak RSS {summary.get('worker_peak_rss_mib')} MiB)", flush=True)
    print(f"{args.hosts} servers / {args.few} servers: "
          f"{seconds[args.hosts] / seconds[args.few]:.2f}x the time, "
          f"{cpu[args.hosts] / cpu[args.few]:.2f}x the CPU", flush=True)


if __name__ == "__main__":
    main()
