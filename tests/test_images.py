"""Image processing: orientation, colour, sizes, hashes, and every way a body can be bad."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from distributed_downloader.errors import ErrorCode
from distributed_downloader.farm import make_png_bomb, make_photo, make_small_image
from distributed_downloader.images import ImageFailure, StoredImage, process_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_large_jpeg_is_resized_to_the_longest_side() -> None:
    body = make_photo(2000, 1000, seed=1)
    result = process_image(body, 720)
    assert isinstance(result, StoredImage)
    assert result.original_size == (1000, 2000)
    assert result.resized_size == (360, 720)
    assert Image.open(io.BytesIO(result.image)).size == (720, 360)
    assert result.hashsum_original == hashlib.md5(body).hexdigest()
    assert result.hashsum_resized == hashlib.md5(result.image).hexdigest()
    assert result.image_format == "jpeg"


def test_small_images_are_never_upscaled() -> None:
    result = process_image(make_small_image(1, (100, 50)), 720)
    assert isinstance(result, StoredImage)
    assert result.resized_size == result.original_size == (50, 100)


def test_size_zero_keeps_the_original_size() -> None:
    result = process_image(make_photo(1200, 900, seed=2), 0)
    assert isinstance(result, StoredImage) and result.resized_size == (900, 1200)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    body = make_small_image(3, (120, 40), exif_orientation=orientation)
    result = process_image(body, 60)
    assert isinstance(result, StoredImage)
    assert result.original_size == (120, 40)  # as displayed: a portrait
    assert result.resized_size == (60, 20)
    assert Image.open(io.BytesIO(result.image)).size == (20, 60)


def test_transparency_becomes_white_not_black() -> None:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    result = process_image(encode(image, "PNG"), 720)
    assert isinstance(result, StoredImage)
    assert Image.open(io.BytesIO(result.image)).convert("RGB").getpixel((5, 5))[0] > 240
    assert Image.open(io.BytesIO(result.image)).getpixel((5, 5))[1] > 240


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16"])
def test_other_modes_become_rgb(mode: str) -> None:
    image = Image.new(mode, (30, 20))
    fmt = "JPEG" if mode in ("L", "CMYK") else ("PNG" if mode != "P" else "GIF")
    result = process_image(encode(image, fmt), 720)
    assert isinstance(result, StoredImage)
    assert Image.open(io.BytesIO(result.image)).mode == "RGB"


def test_webp_output() -> None:
    result = process_image(make_small_image(4), 720, output_format="webp")
    assert isinstance(result, StoredImage) and result.image_format == "webp"
    assert Image.open(io.BytesIO(result.image)).format == "WEBP"


def test_original_output_keeps_the_bytes_when_no_resize_is_needed() -> None:
    body = make_small_image(5, image_format="PNG")
    result = process_image(body, 720, output_format="original")
    assert isinstance(result, StoredImage)
    assert result.image == body and result.image_format == "png"
    assert result.hashsum_resized == result.hashsum_original
    resized = process_image(make_photo(1000, 800, seed=6), 500, output_format="original")
    assert isinstance(resized, StoredImage) and resized.image_format == "jpeg"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"<html><body>Not found</body></html>", ErrorCode.NOT_AN_IMAGE),
        (b"", ErrorCode.NOT_AN_IMAGE),
        (make_png_bomb(), ErrorCode.DECOMPRESSION_BOMB),
        (make_photo(800, 600, seed=7)[:20_000], ErrorCode.TRUNCATED_IMAGE),
        (make_small_image(8)[:100], ErrorCode.TRUNCATED_IMAGE),
    ],
)
def test_bad_bodies_become_error_codes(body: bytes, code: ErrorCode) -> None:
    result = process_image(body, 720)
    assert isinstance(result, ImageFailure)
    assert result.code == code


def test_max_pixels_is_a_setting() -> None:
    result = process_image(make_photo(400, 300, seed=9), 720, max_pixels=100_000)
    assert isinstance(result, ImageFailure) and result.code == ErrorCode.DECOMPRESSION_BOMB
