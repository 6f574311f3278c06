"""Worker memory on large images: the decoded-pixel budget and reduced decoding, measured.

    python benchmarks/decode_memory.py [--scenario pngs|mix] [--copies 8] [--cpu-per-worker 3]
                                       [--max-decode-memory BYTES]
    python benchmarks/decode_memory.py --formats

A loopback server serves large images, each under --copies URLs, and one worker with
--cpu-per-worker cores (so that many + 1 decode threads) fetches them all with image_size 720.
Reported: the worker's peak RSS (getrusage in the worker, from fetch_summary.json), the images
stored, and the seconds taken (prep and profile included).
  pngs  herbarium-like scans: 9000x9000 RGBA (362 KB on the wire, 309 MiB once decoded) and
        6000x9000 RGB PNGs, mostly uniform
  mix   those, plus 12 MP progressive JPEGs (bodies of ~4 MB, so the body budget fills too),
        a 6 MP WebP and a 12 MP TIFF, decoded in full
--formats instead decodes one image of each kind in a fresh process and prints the measured
peak beside the cost `open_image` predicted from the header (the cost must not be lower).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.41"


def scan(width: int, height: int, mode: str, seed: int) -> object:
    """A scan-like image: a flat background with a few shapes (compresses to a few 100 KB)."""
    from PIL import Image, ImageDraw

    def colour(*values: int) -> tuple[int, ...] | int:
        return values[0] if mode in ("L", "P") else values[: len(mode)]

    image = Image.new(mode, (width, height), colour(30 + seed, 120, 60, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 9, height // 9, width // 2, height * 7 // 9),
                   fill=colour(200, 10 + seed, 10, 128))
    draw.ellipse((width * 5 // 9, height // 5, width * 8 // 9, height * 17 // 18),
                 fill=colour(10, 10, 200, 0))
    return image


def encode(image: object, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)  # type: ignore[attr-defined]
    return buffer.getvalue()


def photo(width: int, height: int, seed: int, **options: object) -> bytes:
    from PIL import Image

    from distributed_downloader.testing.farm import make_photo

    return encode(Image.open(io.BytesIO(make_photo(width, height, seed))), "JPEG", quality=90,
                  **options)


def scenario_images(name: str) -> dict[str, bytes]:
    from distributed_downloader.testing.farm import make_scan_png

    images = {"square.png": make_scan_png(9000, 9000, "RGBA", seed=1),
              "portrait.png": make_scan_png(6000, 9000, "RGB", seed=2)}
    if name == "mix":
        images["progressive.jpg"] = photo(4000, 3000, 3, progressive=True)
        images["photo.webp"] = encode(scan(3000, 2000, "RGB", 4), "WEBP", quality=80)
        images["scan.tif"] = encode(scan(4000, 3000, "RGB", 5), "TIFF", compression="tiff_lzw")
    return images


def fetch_run(args: argparse.Namespace) -> None:
    from distributed_downloader.testing.farm import Farm, ServerSpec

    images = scenario_images(args.scenario)
    with Farm([ServerSpec(HOST)]) as farm, tempfile.TemporaryDirectory() as tmp:
        server = farm[HOST]
        lines = []
        for name, body in images.items():
            for copy in range(args.copies):
                server.images[f"{copy}-{name}"] = body
                lines.append(server.url(f"/img/{copy}-{name}"))
        urls = Path(tmp) / "urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        out = Path(tmp) / "out"
        budget = ["--max-decode-memory", str(args.max_decode_memory)] \
            if args.max_decode_memory else []
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "distributed_downloader", "download", str(urls),
                        "--output", str(out), "--workers", "1",
                        "--cpu-per-worker", str(args.cpu_per_worker), *budget,
                        "--default-rate-limit", "1000", "--allow-network", "127.0.0.0/24"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.monotonic() - started
        summary = json.loads((out / "fetch_summary.json").read_text())
        sizes = ", ".join(f"{name} {len(body) / 1e3:,.0f} KB" for name, body in images.items())
        print(f"{args.scenario}: {len(lines)} URLs ({sizes}), 1 worker, --cpu-per-worker "
              f"{args.cpu_per_worker}{' ' + ' '.join(budget) if budget else ''}: stored "
              f"{summary['successes']}, errors {summary['errors']}, worker peak RSS "
              f"{summary['worker_peak_rss_mib']} MiB, {seconds:.1f} s")


def _photo_image(width: int, height: int) -> object:
    from PIL import Image

    from distributed_downloader.testing.farm import make_photo

    return Image.open(io.BytesIO(make_photo(width, height, seed=1)))


def _scan_png(width: int, height: int, mode: str) -> bytes:
    from distributed_downloader.testing.farm import make_scan_png

    return make_scan_png(width, height, mode, seed=1)


FORMAT_CASES = {
    "PNG RGBA 9000x9000 (strips)": lambda: _scan_png(9000, 9000, "RGBA"),
    "PNG RGB 4000x3000 (strips)": lambda: encode(scan(4000, 3000, "RGB", 1), "PNG"),
    "PNG palette 4000x3000 (strips)": lambda: encode(_photo_image(4000, 3000).quantize(256),
                                                     "PNG"),
    "PNG 2-bit palette 4000x3000": lambda: encode(scan(4000, 3000, "RGB", 1).quantize(4), "PNG"),
    "PNG 16-bit grey 4000x3000": lambda: encode(scan(4000, 3000, "L", 1).convert("I;16"), "PNG"),
    "JPEG 4000x3000": lambda: photo(4000, 3000, 1),
    "JPEG progressive 4000x3000": lambda: photo(4000, 3000, 1, progressive=True),
    "JPEG 2000 4000x3000": lambda: encode(scan(4000, 3000, "RGB", 1), "JPEG2000"),
    "WebP RGBA 4000x3000": lambda: encode(scan(4000, 3000, "RGBA", 1), "WEBP"),
    "TIFF LZW 4000x3000": lambda: encode(scan(4000, 3000, "RGB", 1), "TIFF",
                                         compression="tiff_lzw"),
    "GIF 4000x3000": lambda: encode(scan(4000, 3000, "RGB", 1).quantize(64), "GIF"),
    "BMP 4000x3000": lambda: encode(scan(4000, 3000, "RGB", 1), "BMP"),
}


def measure_one(path: str, image_size: int) -> None:
    """In this (fresh) process: decode once small to load the format's code, then measure."""
    from PIL import Image

    from distributed_downloader.images import finish_image, open_image

    body = Path(path).read_bytes()
    kind = Image.open(io.BytesIO(body))
    warm = encode(Image.new(kind.mode, (64, 48)), kind.format or "PNG")
    finish_image(open_image(warm, 32))  # type: ignore[arg-type]
    opened = open_image(body, image_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = finish_image(opened)  # type: ignore[arg-type]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"cost": opened.cost, "peak": peak * 1024,  # type: ignore[union-attr]
                      "ok": type(result).__name__ == "StoredImage"}))


def formats() -> None:
    print(f"{'image':32} {'cost (MiB)':>11} {'peak (MiB)':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in FORMAT_CASES:
            path = Path(tmp) / "image"
            subprocess.run([sys.executable, __file__, "--make", name, str(path)], check=True)
            done = subprocess.run([sys.executable, __file__, "--measure", str(path), "720"],
                                  check=True, capture_output=True, text=True)
            result = json.loads(done.stdout)
            flag = "" if result["ok"] and result["cost"] >= result["peak"] else "  <- !"
            print(f"{name:32} {result['cost'] / 2**20:11.1f} "
                  f"{result['peak'] / 2**20:11.1f}{flag}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("pngs", "mix"), default="pngs")
    parser.add_argument("--copies", type=int, default=8, help="URLs serving each image")
    parser.add_argument("--cpu-per-worker", type=int, default=3)
    parser.add_argument("--max-decode-memory", type=int, default=0, help="(default: the setting's)")
    parser.add_argument("--formats", action="store_true")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        Path(args.make[1]).write_bytes(FORMAT_CASES[args.make[0]]())
    elif args.measure:
        measure_one(args.measure[0], int(args.measure[1]))
    elif args.formats:
        formats()
    else:
        fetch_run(args)


if __name__ == "__main__":
    main()
