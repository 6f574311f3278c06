"""The JPEG fast path (simplejpeg + OpenCV) stores what Pillow would: same sizes, orientation,
hashes of the original, quality close to a float reference; and anything it cannot read goes
to Pillow, failing with the error code Pillow gives."""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from distributed_downloader import images
from distributed_downloader.errors import Failure
from distributed_downloader.images import StoredImage, finish_image, open_image, process_image
from distributed_downloader.testing.farm import make_photo


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_fast_path_fits", lambda opened: False)


def pixels(stored: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"), dtype=np.float32)


def psnr(got: np.ndarray, wanted: np.ndarray) -> float:
    error = float(np.mean((got - wanted) ** 2))
    return 99.0 if error == 0 else 10 * np.log10(255.0 ** 2 / error)


def reference(body: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decoded whole, area-averaged in float precision."""
    full = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float32)
    return cv2.resize(full, size, interpolation=cv2.INTER_AREA)


def fast(body: bytes, image_size: int = 720, output_format: str = "jpeg") -> StoredImage | None:
    opened = open_image(body, image_size, output_format)
    assert not isinstance(opened, Failure)
    if not images._fast_path_fits(opened):
        return None
    return images._finish_jpeg_fast(opened, 95, hashlib.md5(body).hexdigest())


@pytest.mark.parametrize("size", [(640, 480), (1600, 1200), (3000, 2000), (1000, 3000)])
def test_fast_path_sizes_hashes_and_quality(size: tuple[int, int]) -> None:
    body = make_photo(*size, seed=sum(size))
    result = fast(body)
    assert isinstance(result, StoredImage), "the fast path took this JPEG"
    scale = min(1.0, 720 / max(size))
    target = (round(size[0] * scale), round(size[1] * scale))
    assert result.original_size == (size[1], size[0])
    assert result.resized_size == (target[1], target[0])
    assert Image.open(io.BytesIO(result.image)).size == target
    assert result.hashsum_original == hashlib.md5(body).hexdigest()
    assert result.hashsum_resized == hashlib.md5(result.image).hexdigest()
    assert result.image_format == "jpeg"
    assert process_image(body, 720) == result  # what process_image stores
    assert psnr(pixels(result.image), reference(body, target)) > 37


def test_fast_path_is_as_good_as_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    body = make_photo(2400, 1800, seed=5)
    fast_result = process_image(body, 720)
    pillow_only(monkeypatch)
    pillow_result = process_image(body, 720)
    assert isinstance(fast_result, StoredImage) and isinstance(pillow_result, StoredImage)
    assert fast_result.resized_size == pillow_result.resized_size
    wanted = reference(body, (720, 540))
    assert psnr(pixels(fast_result.image), wanted) > psnr(pixels(pillow_result.image), wanted) - 0.5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_orientation_matches_pillow(orientation: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Four differently coloured quadrants: any wrong flip or turn moves a colour.
    picture = Image.new("RGB", (1200, 800), (255, 0, 0))
    picture.paste((0, 255, 0), (600, 0, 1200, 400))
    picture.paste((0, 0, 255), (0, 400, 600, 800))
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = encode(picture, exif=exif, quality=95)
    fast_result = fast(body, 600)
    assert fast_result is not None
    pillow_only(monkeypatch)
    pillow_result = process_image(body, 600)
    assert isinstance(pillow_result, StoredImage)
    assert fast_result.original_size == pillow_result.original_size
    assert fast_result.resized_size == pillow_result.resized_size
    assert psnr(pixels(fast_result.image), pixels(pillow_result.image)) > 30


def test_progressive_and_grey_jpegs_take_the_fast_path() -> None:
    photo = Image.open(io.BytesIO(make_photo(1600, 1200, seed=3)))
    for body in (encode(photo, progressive=True), encode(photo.convert("L"))):
        result = fast(body)
        assert result is not None and result.resized_size == (540, 720)
        assert Image.open(io.BytesIO(result.image)).mode == "RGB"


def test_cmyk_jpeg_and_webp_output_go_to_pillow() -> None:
    photo = Image.open(io.BytesIO(make_photo(1600, 1200, seed=4)))
    cmyk = encode(photo.convert("CMYK"))
    assert fast(cmyk) is None
    stored = process_image(cmyk, 720)
    assert isinstance(stored, StoredImage) and stored.resized_size == (540, 720)
    assert stored.hashsum_original == hashlib.md5(cmyk).hexdigest()
    body = encode(photo)
    assert fast(body, output_format="webp") is None
    webp = process_image(body, 720, "webp")
    assert isinstance(webp, StoredImage) and webp.image_format == "webp"


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_a_damaged_jpeg_fails_as_it_did_with_pillow(damage: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    body = make_photo(1600, 1200, seed=6)
    if damage == "truncated":
        body = body[: len(body) // 2]
    else:  # entropy-coded data overwritten with markers libjpeg cannot read
        body = body[:2000] + b"\xff\xd0\xff\x01" * 2000 + body[10000:]
    opened = open_image(body, 720)
    assert not isinstance(opened, Failure)
    assert images._finish_jpeg_fast(opened, 95, "") is None, "the fast path refuses it"
    ours = finish_image(opened, 95)
    pillow_only(monkeypatch)
    before = process_image(body, 720)
    assert type(ours) is type(before)
    if isinstance(before, Failure):
        assert isinstance(ours, Failure) and ours.code == before.code
