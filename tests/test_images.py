"""Image processing: orientation, colour, sizes, hashes, and every way a body can be bad."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from distributed_downloader import images
from distributed_downloader.errors import ErrorCode, Failure
from distributed_downloader.testing.farm import (
    make_photo,
    make_png_bomb,
    make_scan_png,
    make_small_image,
)
from distributed_downloader.images import (
    OpenedImage,
    StoredImage,
    finish_image,
    open_image,
    process_image,
)


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
    assert isinstance(result, Failure)
    assert result.code == code


def test_max_pixels_is_a_setting() -> None:
    result = process_image(make_photo(400, 300, seed=9), 720, max_pixels=100_000)
    assert isinstance(result, Failure) and result.code == ErrorCode.DECOMPRESSION_BOMB


# --- large images: decoded at reduced size, at a cost known from the header ---------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png_with_every_filter(image: Image.Image, exif_after_pixels: bytes | None = None) -> bytes:
    """`image` (8-bit L, LA, RGB, RGBA or P) as a PNG whose rows use PNG's five filter types in
    turn (Pillow's encoder picks one), with an eXIf chunk after the pixels when given."""
    colour_type = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6, "P": 3}[image.mode]
    unit = 1 if image.mode == "P" else len(image.mode)
    stride, raw = image.width * unit, image.tobytes()
    rows, prior = [], bytes(stride)
    for y in range(image.height):
        row, kind, out = raw[y * stride:(y + 1) * stride], y % 5, bytearray()
        for x, value in enumerate(row):
            a = row[x - unit] if x >= unit else 0
            b, c = prior[x], (prior[x - unit] if x >= unit else 0)
            out.append((value - (0, a, b, (a + b) // 2, paeth(a, b, c))[kind]) & 0xFF)
        rows.append(bytes([kind]) + bytes(out))
        prior = row
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", image.width, image.height, 8,
                                             colour_type, 0, 0, 0))]
    if image.mode == "P":
        chunks.append(png_chunk(b"PLTE", bytes(image.getpalette() or [])))
        if isinstance(image.info.get("transparency"), bytes):
            chunks.append(png_chunk(b"tRNS", image.info["transparency"]))
    data = zlib.compress(b"".join(rows))
    chunks += [png_chunk(b"IDAT", data[:len(data) // 2]), png_chunk(b"IDAT", data[len(data) // 2:])]
    if exif_after_pixels is not None:
        chunks.append(png_chunk(b"eXIf", exif_after_pixels))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")


def varied(mode: str, size: tuple[int, int] = (203, 157)) -> Image.Image:
    """Noise in every band, so that every filter has work to do."""
    photo = Image.open(io.BytesIO(make_photo(*size, seed=11)))
    if mode == "P":
        return photo.quantize(200)
    if mode == "P+alpha":
        image = photo.quantize(200)
        image.info["transparency"] = bytes(range(0, 256, 2)) * 2
        return image
    image = photo.convert("L" if mode.startswith("L") else "RGB")
    if mode.endswith("A"):
        image.putalpha(Image.effect_noise(size, 80).convert("L"))
    return image


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "P+alpha"])
def test_a_png_decoded_in_strips_equals_decoding_it_whole_then_reducing(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    body = png_with_every_filter(varied(mode))
    # strips of 9 rows: 18 of them, the last one 4 rows high, not a whole number of boxes
    monkeypatch.setattr(images, "PNG_STRIP_BYTES", 203 * 4 * 10)
    opened = open_image(body, 60)
    assert isinstance(opened, OpenedImage) and opened.png is not None
    assert opened.png_factor == 3  # guard: the strips path was taken
    got = images._decode_png_reduced(opened.image, opened.png, opened.png_factor)

    whole = Image.open(io.BytesIO(body))
    if whole.mode == "P":
        whole = whole.convert("RGBA" if "transparency" in whole.info else "RGB")
    expected = whole.reduce(3)
    assert got.mode == expected.mode and got.size == expected.size == (68, 53)
    assert got.tobytes() == expected.tobytes()


def test_a_large_png_costs_a_strip_not_its_decoded_size() -> None:
    body = make_scan_png(9000, 9000, "RGBA", seed=1)  # 309 MiB once decoded
    opened = open_image(body, 720)
    assert isinstance(opened, OpenedImage)
    assert opened.png_factor == 12
    assert opened.cost < 48 << 20
    result = finish_image(opened)
    assert isinstance(result, StoredImage)
    assert result.original_size == (9000, 9000) and result.resized_size == (720, 720)
    assert Image.open(io.BytesIO(result.image)).size == (720, 720)


MEASURE = """
import io, json, sys
from PIL import Image
from distributed_downloader.images import finish_image, open_image

def high_water():  # this process's own: ru_maxrss would start at its parent's RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

body = open(sys.argv[1], "rb").read()
kind = Image.open(io.BytesIO(body))
warm = io.BytesIO()
Image.new(kind.mode, (64, 48)).save(warm, kind.format)
finish_image(open_image(warm.getvalue(), 32))  # the format's code loaded, not counted
opened = open_image(body, 720)
before = high_water()
stored = finish_image(opened)
print(json.dumps({"cost": opened.cost, "used": high_water() - before,
                  "size": list(stored.resized_size)}))
"""


@pytest.mark.parametrize("kind", ["png in strips", "16-bit png", "progressive jpeg", "webp"])
def test_the_cost_read_from_the_header_covers_the_memory_decoding_takes(kind: str,
                                                                       tmp_path) -> None:
    """The budget is only as good as the cost: measured in a fresh process, decoding must not
    raise its peak memory by more than `open_image` said it would."""
    if kind == "png in strips":
        body = make_scan_png(6000, 4500, "RGBA", seed=2)
    elif kind == "16-bit png":
        body = make_scan_png(4000, 3000, "RGB", seed=3, bit_depth=16)
    else:
        photo = Image.open(io.BytesIO(make_photo(4000, 3000, seed=4)))
        body = encode(photo, "JPEG", quality=90, progressive=True) if kind == "progressive jpeg" \
            else encode(photo, "WEBP", quality=80)
    path = tmp_path / "image"
    path.write_bytes(body)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                          text=True, check=True)
    measured = json.loads(done.stdout)
    assert measured["size"] == [540, 720]
    assert measured["used"] > 4 << 20  # guard: decoding really was measured
    assert measured["used"] <= measured["cost"]


def test_pngs_that_cannot_be_decoded_in_strips_are_decoded_whole_and_costed_so() -> None:
    body = make_scan_png(4000, 3000, "RGB", seed=5, bit_depth=16)
    opened = open_image(body, 720)
    assert isinstance(opened, OpenedImage) and opened.png_factor == 0
    assert opened.cost > 4000 * 3000 * 4  # Pillow keeps it as 8-bit RGB, 4 bytes a pixel
    result = finish_image(opened)
    assert isinstance(result, StoredImage) and result.resized_size == (540, 720)


def test_a_png_orientation_written_after_its_pixels_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    body = png_with_every_filter(varied("RGB", (240, 90)), exif_after_pixels=exif.tobytes())
    result = process_image(body, 60)
    assert isinstance(result, StoredImage)
    assert result.original_size == (240, 90)  # (height, width) as displayed: a portrait
    assert result.resized_size == (60, 22)
    assert Image.open(io.BytesIO(result.image)).size == (22, 60)


def test_a_truncated_png_decoded_in_strips_is_a_truncated_image() -> None:
    body = make_scan_png(3000, 3000, "RGB", seed=6)
    result = process_image(body[:len(body) * 2 // 3], 720)
    assert isinstance(result, Failure) and result.code == ErrorCode.TRUNCATED_IMAGE


def test_the_pixel_cap_refuses_a_large_png_before_any_decoding() -> None:
    body = make_scan_png(9000, 9000, "RGBA", seed=1)  # 81 million pixels
    result = process_image(body, 720, max_pixels=80_000_000)
    assert isinstance(result, Failure) and result.code == ErrorCode.DECOMPRESSION_BOMB
    assert "max_image_pixels" in result.message
    assert isinstance(process_image(body, 720, max_pixels=81_000_000), StoredImage)


@pytest.mark.parametrize("resolutions", [6, 2])
def test_jpeg_2000_is_decoded_at_a_lower_resolution_level_it_has(resolutions: int) -> None:
    """Two levels down would suit a 300-pixel target; a codestream with one level gets one."""
    body = encode(Image.open(io.BytesIO(make_photo(1600, 1200, seed=7))), "JPEG2000",
                  num_resolutions=resolutions, quality_mode="rates", quality_layers=[20])
    result = process_image(body, 300)
    assert isinstance(result, StoredImage), result
    assert result.original_size == (1200, 1600) and result.resized_size == (225, 300)
    reduced, whole = open_image(body, 300), open_image(body, 0, "original")
    assert isinstance(reduced, OpenedImage) and isinstance(whole, OpenedImage)
    assert reduced.cost < whole.cost
