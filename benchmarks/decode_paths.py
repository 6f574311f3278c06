"""Images per second a core turns into stored images, by decode path, and what each path costs
in quality.

    python benchmarks/decode_paths.py [--seconds 4] [--image-size 720]

Each path takes the downloaded bytes to the stored JPEG (quality 95) and hashes the original
(MD5), one thread in one process, over the camera-size mix of benchmarks/throughput.py:
  simplejpeg+cv2   libjpeg-turbo DCT scaling (any n/8) through simplejpeg, OpenCV INTER_AREA,
                   OpenCV encode (simplejpeg's encoder is as fast but 1-2 dB worse at quality 95)
  pillow-draft     Pillow draft (1/2, 1/4, 1/8) + BILINEAR, the path images.py used before
  images.py        what the downloader does today (process_image)
  pyvips           thumbnail_buffer (shrink-on-load), when pyvips is installed
Quality: PSNR (dB) of each stored image against a reference, the original decoded in full and
area-averaged to the same size in float precision.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from distributed_downloader.images import process_image
from distributed_downloader.testing.farm import make_photo

WORK = Path(__file__).parent / "work"
# The camera-size mix: (width, height) and its share of the images.
CAMERA_MIX = [((640, 480), 0.4), ((1600, 1200), 0.3), ((3000, 2000), 0.2), ((4000, 3000), 0.1)]
QUALITY = 95

Path_ = Callable[[bytes, int], bytes]


def camera_photos(count: int = 10) -> list[bytes]:
    """`count` photos in the camera mix's proportions, cached under benchmarks/work/photos."""
    folder = WORK / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for (width, height), share in CAMERA_MIX:
        for index in range(max(1, round(count * share))):
            path = folder / f"camera-{index}-{width}x{height}.jpg"
            if not path.exists():
                path.write_bytes(make_photo(width, height, seed=1000 + index))
            result.append(path.read_bytes())
    return result


def _target(width: int, height: int, image_size: int) -> tuple[int, int]:
    if max(width, height) <= image_size:
        return width, height
    scale = image_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def simplejpeg_cv2(body: bytes, image_size: int) -> bytes:
    hashlib.md5(body).hexdigest()
    height, width, _, _ = simplejpeg.decode_jpeg_header(body)
    target = _target(width, height, image_size)
    pixels = simplejpeg.decode_jpeg(body, "BGR", min_width=target[0], min_height=target[1])
    if (pixels.shape[1], pixels.shape[0]) != target:
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    stored = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()
    hashlib.md5(stored).hexdigest()
    return stored


def pillow_draft(body: bytes, image_size: int) -> bytes:
    hashlib.md5(body).hexdigest()
    image = Image.open(io.BytesIO(body))
    target = _target(*image.size, image_size)
    image.draft("RGB", target)
    image = image.convert("RGB")
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    hashlib.md5(buffer.getvalue()).hexdigest()
    return buffer.getvalue()


def images_py(body: bytes, image_size: int) -> bytes:
    stored = process_image(body, image_size, "jpeg", QUALITY)
    assert not hasattr(stored, "code"), stored
    return stored.image  # type: ignore[union-attr]


def pyvips_thumbnail(body: bytes, image_size: int) -> bytes:
    import pyvips  # optional: measured only when installed

    hashlib.md5(body).hexdigest()
    image = pyvips.Image.thumbnail_buffer(body, image_size, size="down")
    stored = image.write_to_buffer(f".jpg[Q={QUALITY}]")
    hashlib.md5(stored).hexdigest()
    return stored


def paths() -> dict[str, Path_]:
    found: dict[str, Path_] = {"simplejpeg+cv2": simplejpeg_cv2, "pillow-draft": pillow_draft,
                               "images.py": images_py}
    try:
        import pyvips

        pyvips.cache_set_max(0)
        pyvips.concurrency_set(1)
        found["pyvips"] = pyvips_thumbnail
    except (ImportError, OSError):
        pass
    return found


def per_core(path: Path_, bodies: list[bytes], image_size: int, seconds: float) -> float:
    """Images a second of this process's CPU time (all its threads), cycling through the
    bodies for at least `seconds` of it: CPU time, so that other load on the machine does not
    count against a path."""
    for body in bodies:
        path(body, image_size)  # warm caches and lazy imports
    done, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for body in bodies:
            path(body, image_size)
        done += len(bodies)
    return done / (time.process_time() - started)


def reference(body: bytes, image_size: int) -> np.ndarray:
    """Full decode, area-averaged in float: the resize every path approximates."""
    pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float32)
    target = _target(pixels.shape[1], pixels.shape[0], image_size)
    return cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)


def psnr(stored: bytes, wanted: np.ndarray) -> float:
    got = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"), dtype=np.float32)
    if got.shape != wanted.shape:  # a path that rounds the size differently
        got = cv2.resize(got, (wanted.shape[1], wanted.shape[0]), interpolation=cv2.INTER_AREA)
    error = float(np.mean((got - wanted) ** 2))
    return 99.0 if error == 0 else 10 * np.log10(255.0 ** 2 / error)


def measure(bodies: list[bytes], image_size: int, seconds: float,
            ) -> dict[str, tuple[float, float, float]]:
    """path -> (images/s on one core, mean PSNR, lowest PSNR)."""
    references = [reference(body, image_size) for body in bodies]
    results = {}
    for name, path in paths().items():
        rate = per_core(path, bodies, image_size, seconds)
        scores = [psnr(path(body, image_size), wanted)
                  for body, wanted in zip(bodies, references)]
        results[name] = (rate, sum(scores) / len(scores), min(scores))
    return results


def best_per_core(bodies: list[bytes], image_size: int = 720, seconds: float = 4.0,
                  ) -> tuple[str, float]:
    """The fastest stock path here and its images/s on one core (for throughput.py)."""
    cv2.setNumThreads(1)
    rates = {name: per_core(path, bodies, image_size, seconds)
             for name, path in paths().items() if name != "images.py"}
    name = max(rates, key=rates.__getitem__)
    return name, rates[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--image-size", type=int, default=720)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    bodies = camera_photos()
    print(f"{len(bodies)} camera-mix photos, mean {sum(map(len, bodies)) / len(bodies) / 1e6:.2f}"
          f" MB, image_size {args.image_size}, one thread")
    print("| path | images/s per core | ms/image | PSNR mean (dB) | PSNR lowest (dB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (rate, mean, low) in measure(bodies, args.image_size, args.seconds).items():
        print(f"| {name} | {rate:.1f} | {1000 / rate:.1f} | {mean:.2f} | {low:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
