"""End-to-end download speed against the machine's decode ceiling and img2dataset.

    python benchmarks/throughput.py [--images 2000] [--skip-img2dataset] [--memory]

A loopback farm without limits (4 servers) serves realistic photos, a mix from 640x480 to
4000x3000 JPEG (~0.4 bytes/pixel, like camera photos), under N distinct URLs. Reported, on the
same cores and images, with image_size 720:
  ceiling        the same images decoded, resized and encoded in-process, no network
  ours           `distributed-downloader fetch` (prep not timed), end to end
  img2dataset    the same URL list, installed in benchmarks/work/img2dataset-venv
With --memory it also fetches 10,000 URLs with batch sizes 1,000 and 10,000 and reports the
peak RSS of the busiest worker.

Run as root, it re-runs itself inside a network namespace holding only loopback
(`unshare -n`), so that nothing, img2dataset included, can reach beyond this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).parent / "work"
SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000), (4000, 3000)]
PHOTOS_PER_SIZE = 8
HOSTS = ("127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34")
I2D_VENV = WORK / "img2dataset-venv"


def in_loopback_namespace() -> None:
    """Re-run this script in a network namespace with only `lo` (root only)."""
    if os.environ.get("BENCH_NETNS") or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    command = " ".join([sys.executable, *map(lambda a: f"'{a}'", sys.argv)])
    env = {**os.environ, "BENCH_NETNS": "1"}
    sys.exit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && {command}"],
                             env=env))


def photos() -> list[bytes]:
    from distributed_downloader.testing.farm import make_photo

    folder = WORK / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for index in range(PHOTOS_PER_SIZE * len(SIZES)):
        width, height = SIZES[index % len(SIZES)]
        path = folder / f"{index}-{width}x{height}.jpg"
        if not path.exists():
            path.write_bytes(make_photo(width, height, seed=index))
        result.append(path.read_bytes())
    return result


def _process(body: bytes) -> None:
    from distributed_downloader.images import process_image

    process_image(body, 720)


def ceiling(bodies: list[bytes], count: int, cores: int) -> float:
    work = [bodies[i % len(bodies)] for i in range(count)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_process, work[:cores])  # start-up and imports, not timed
        started = time.monotonic()
        pool.map(_process, work, chunksize=4)
        return count / (time.monotonic() - started)


def run(command: list[str], env: dict | None = None) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.monotonic() - started


def ours(urls: Path, out: Path, cores: int, batch_size: int = 10_000) -> tuple[float, dict]:
    if out.exists():
        shutil.rmtree(out)
    base = [sys.executable, "-m", "distributed_downloader"]
    run([*base, "prep", str(urls), "--output", str(out), "--batch-size", str(batch_size)])
    seconds = run([*base, "fetch", str(out), "--workers", str(cores),
                   "--default-rate-limit", "100000", "--max-connections-per-server", "32",
                   "--allow-network", "127.0.0.0/24"])
    summary = json.loads((out / "fetch_summary.json").read_text())
    return seconds, summary


def img2dataset(urls: Path, out: Path, cores: int) -> tuple[float, int] | None:
    binary = I2D_VENV / "bin" / "img2dataset"
    if not binary.exists():
        print(f"img2dataset not found: python3 -m venv {I2D_VENV} && "
              f"{I2D_VENV}/bin/pip install img2dataset", file=sys.stderr)
        return None
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    seconds = run([str(binary), "--url_list", str(urls), "--input_format", "txt",
                   "--output_folder", str(out), "--output_format", "parquet",
                   "--processes_count", str(cores), "--thread_count", "32",
                   "--image_size", "720", "--resize_mode", "keep_ratio_largest",
                   "--resize_only_if_bigger", "True", "--encode_quality", "95",
                   "--compute_hash", "md5", "--enable_wandb", "False",
                   "--number_sample_per_shard", "500"], env=env)
    stored = 0
    for stats in out.glob("*_stats.json"):
        stored += json.loads(stats.read_text())["successes"]
    return seconds, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    in_loopback_namespace()
    from distributed_downloader.testing.farm import Farm, ServerSpec

    cores = os.cpu_count() or 1
    bodies = photos()
    WORK.mkdir(exist_ok=True)
    print(f"{args.images} images, mean {sum(map(len, bodies)) / len(bodies) / 1e6:.2f} MB, "
          f"{cores} cores", flush=True)
    with Farm([ServerSpec(host) for host in HOSTS]) as farm:
        count = max(args.images, 10_000 if args.memory else 0)
        lines = []
        for index in range(count):
            server = farm.servers[index % len(HOSTS)]
            server.images[f"{index}.jpg"] = bodies[index % len(bodies)]
            lines.append(server.url(f"/img/{index}.jpg"))
        urls = WORK / "throughput-urls.txt"
        urls.write_text("\n".join(lines[: args.images]) + "\n")

        top = ceiling(bodies, args.images, cores)
        print(f"ceiling (decode+resize+encode, {cores} processes): {top:.1f} images/s",
              flush=True)
        seconds, summary = ours(urls, WORK / "out-ours", cores)
        mine = args.images / seconds
        print(f"ours: {mine:.1f} images/s ({summary['successes']} stored in {seconds:.1f} s), "
              f"{mine / top:.0%} of the ceiling; worker peak RSS "
              f"{summary.get('worker_peak_rss_mib')} MiB", flush=True)
        if not args.skip_img2dataset:
            result = img2dataset(urls, WORK / "out-img2dataset", cores)
            if result:
                theirs = args.images / result[0]
                print(f"img2dataset: {theirs:.1f} images/s ({result[1]} stored in "
                      f"{result[0]:.1f} s); ours is {mine / theirs:.2f}x", flush=True)
        if args.memory:
            memory_urls = WORK / "memory-urls.txt"
            memory_urls.write_text("\n".join(lines[:10_000]) + "\n")
            for batch_size in (1_000, 10_000):
                seconds, summary = ours(memory_urls, WORK / f"out-memory-{batch_size}", cores,
                                        batch_size)
                print(f"batch size {batch_size:>6,}: worker peak RSS "
                      f"{summary.get('worker_peak_rss_mib')} MiB, "
                      f"{10_000 / seconds:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
