"""End-to-end download speed against img2dataset and against the machine's decode ceiling.

    python benchmarks/throughput.py --mix camera [--images 6000] [--skip-img2dataset] [--memory]
    python benchmarks/throughput.py --mix light [--images 4000] [--default-politeness]
    python benchmarks/throughput.py --mix small --skip-img2dataset --default-politeness

A loopback farm without limits serves JPEG photos (~0.4 bytes/pixel, like camera photos) under
N distinct URLs:
  camera   4 servers; 40% 640x480, 30% 1600x1200, 20% 3000x2000, 10% 4000x3000 (6,000 images)
  light    10 servers; 800x600 to 1280x960, a few hundred KB each (4,000 images)
  small    10 servers; 320x240 (~25 KB, 3,000 images): cheap to decode, so that with
           --default-politeness the servers' rates, not the cores, are what binds
Reported, on the same cores and images, with image_size 720, in one run:
  best path      the fastest stock decode+resize+encode+MD5 path on one core
                 (benchmarks/decode_paths.py, CPU time); the ceiling is that path run in one
                 process per core, timed by the clock like the downloads (so that other load
                 on the machine weighs on both alike)
  ours           `distributed-downloader download` as a user runs it (prep and start-up
                 included; the farm's servers have no limits, so neither do we); with
                 --default-politeness, with no rate flag at all (default_rate_limit 10/s,
                 the climb above it that fast servers earn: max_rate_factor)
  img2dataset    the same URL list; installed from PyPI into benchmarks/work/img2dataset-venv
                 when missing
Also printed: the CPU time of ours (user + system, workers included), which other load on the
machine weighs on less than on the clock; with --timeline, the requests per 0.5 s of its run.
With --memory it downloads the same URLs again with batch sizes of a tenth and all of them,
and reports the peak RSS of the busiest worker for each.

Run as root, it re-runs itself inside a network namespace holding only loopback
(`unshare -n`), so that nothing, img2dataset included, can reach beyond this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from decode_paths import CAMERA_MIX, best_per_core, camera_photos, paths

from distributed_downloader.testing.netns import in_loopback_namespace

WORK = Path(__file__).parent / "work"
LIGHT_SIZES = [(800, 600), (1024, 768), (1280, 960)]
MIXES = {"camera": (4, 6000), "light": (10, 4000), "small": (10, 3000)}  # servers, images
I2D_VENV = WORK / "img2dataset-venv"


def light_photos(count: int = 12, sizes: list[tuple[int, int]] = LIGHT_SIZES) -> list[bytes]:
    from distributed_downloader.testing.farm import make_photo

    folder = WORK / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        path = folder / f"light-{index}-{width}x{height}.jpg"
        if not path.exists():
            path.write_bytes(make_photo(width, height, seed=2000 + index))
        result.append(path.read_bytes())
    return result


def _best_path(job: tuple[str, bytes]) -> None:
    paths()[job[0]](job[1], 720)


def ceiling(path: str, bodies: list[bytes], cores: int) -> float:
    """Images/s of `path` in one process per core, nothing else: 2x the best path, measured."""
    work = [(path, bodies[index % len(bodies)]) for index in range(100 * cores)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_best_path, work[:cores])  # start-up and imports, not timed
        started = time.monotonic()
        pool.map(_best_path, work, chunksize=4)
        return len(work) / (time.monotonic() - started)


def run(command: list[str], env: dict | None = None) -> float:
    started = time.monotonic()
    with open(WORK / "throughput.log", "a") as log:  # progress lines, kept out of the table
        subprocess.run(command, check=True, stdout=log, stderr=log, env=env)
    return time.monotonic() - started


def children_cpu() -> float:
    """CPU seconds (user + system) of the commands run so far, their workers included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timeline(farm, started: float, seconds: float) -> None:  # noqa: ANN001
    """Requests the farm received per half second of the run, robots.txt included: where the
    run waits (start-up, first contact, bursts, the tail)."""
    times = sorted(record.time - started for server in farm.servers for record in server.log)
    counts = [0] * (int(seconds * 2) + 1)
    for moment in times:
        counts[min(len(counts) - 1, max(0, int(moment * 2)))] += 1
    print(f"first request {times[0]:.2f} s, last {times[-1]:.2f} s, exit {seconds:.2f} s; "
          "requests per 0.5 s:", flush=True)
    for row in range(0, len(counts), 20):
        print(f"  {row / 2:5.1f} s: " + " ".join(f"{count:3d}" for count in counts[row:row + 20]),
              flush=True)


def ours(urls: Path, out: Path, cores: int, batch_size: int = 10_000,
         default_politeness: bool = False) -> tuple[float, dict]:
    """`download` as a user runs it, timed from the command to its exit."""
    if out.exists():
        shutil.rmtree(out)
    rates = [] if default_politeness else ["--default-rate-limit", "100000",
                                           "--max-connections-per-server", "32"]
    seconds = run([sys.executable, "-m", "distributed_downloader", "download", str(urls),
                   "--output", str(out), "--batch-size", str(batch_size),
                   "--workers", str(cores), *rates, "--allow-network", "127.0.0.0/24"])
    summary = json.loads((out / "fetch_summary.json").read_text())
    return seconds, summary


def install_img2dataset() -> Path | None:
    """img2dataset from PyPI in its own venv (once); None when it cannot be installed."""
    binary = I2D_VENV / "bin" / "img2dataset"
    if not binary.exists():
        print(f"installing img2dataset into {I2D_VENV}", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
            subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"],
                           check=True)
        except subprocess.CalledProcessError as exc:
            print(f"img2dataset could not be installed: {exc}", file=sys.stderr)
            return None
    return binary


def img2dataset(urls: Path, out: Path, cores: int) -> tuple[float, int] | None:
    binary = install_img2dataset()
    if binary is None:
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


def mix_photos(mix: str) -> list[bytes]:
    if mix == "light":
        return light_photos()
    if mix == "small":
        return light_photos(sizes=[(320, 240)])
    photos = camera_photos(20)
    assert len(photos) == 20 and CAMERA_MIX[0][1] == 0.4
    return photos


def serve(farm, bodies: list[bytes], count: int) -> list[str]:  # noqa: ANN001
    """`count` distinct URLs over the farm's servers, cycling through the bodies."""
    lines = []
    for index in range(count):
        server = farm.servers[index % len(farm.servers)]
        server.images[f"{index}.jpg"] = bodies[index % len(bodies)]
        lines.append(server.url(f"/img/{index}.jpg"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mix", choices=sorted(MIXES), default="camera")
    parser.add_argument("--images", type=int)
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--timeline", action="store_true",
                        help="also print the requests the farm received per 0.5 s of ours")
    parser.add_argument("--default-politeness", action="store_true",
                        help="ours without rate flags, as a user who sets none")
    args = parser.parse_args()
    if not args.skip_img2dataset:
        install_img2dataset()  # from PyPI: before the namespace, which reaches only loopback
    in_loopback_namespace()
    from distributed_downloader.testing.farm import Farm, ServerSpec

    servers, default_images = MIXES[args.mix]
    images = args.images or default_images
    cores = os.cpu_count() or 1
    bodies = mix_photos(args.mix)
    WORK.mkdir(exist_ok=True)
    print(f"mix {args.mix}: {images} images over {servers} servers, mean "
          f"{sum(map(len, bodies)) / len(bodies) / 1e6:.2f} MB, {cores} cores", flush=True)
    best, per_core = best_per_core(bodies)
    top = ceiling(best, bodies, cores)
    print(f"best path {best}: {per_core:.1f} images/s per core of CPU time; {cores} processes "
          f"of it: {top:.1f} images/s", flush=True)
    hosts = [f"127.0.0.{31 + index}" for index in range(servers)]
    with Farm([ServerSpec(host) for host in hosts]) as farm:
        lines = serve(farm, bodies, images)
        urls = WORK / f"throughput-{args.mix}-urls.txt"
        urls.write_text("\n".join(lines[:images]) + "\n")
        cpu, wall = children_cpu(), time.time()
        seconds, summary = ours(urls, WORK / "out-ours", cores,
                                default_politeness=args.default_politeness)
        cpu = children_cpu() - cpu
        mine = images / seconds
        print(f"ours: {mine:.1f} images/s ({summary['successes']} stored in {seconds:.1f} s), "
              f"{mine / top:.0%} of {cores}x the best path; worker peak RSS "
              f"{summary.get('worker_peak_rss_mib')} MiB; CPU {cpu:.1f} s "
              f"({cpu / images * 1000:.1f} ms per image)", flush=True)
        if args.timeline:
            timeline(farm, wall, seconds)
        if not args.skip_img2dataset:
            result = img2dataset(urls, WORK / "out-img2dataset", cores)
            if result:
                theirs = images / result[0]
                print(f"img2dataset: {theirs:.1f} images/s ({result[1]} stored in "
                      f"{result[0]:.1f} s); ours is {mine / theirs:.2f}x", flush=True)
        if args.memory:
            for batch_size in (images // 10, images):
                seconds, summary = ours(urls, WORK / f"out-memory-{batch_size}", cores,
                                        batch_size)
                print(f"batch size {batch_size:>6,}: worker peak RSS "
                      f"{summary.get('worker_peak_rss_mib')} MiB, "
                      f"{images / seconds:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
