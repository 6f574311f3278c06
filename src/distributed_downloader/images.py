"""Bytes in, stored image out: decode, orient, resize, encode and hash.

JPEGs are decoded at reduced scale when the target is smaller (libjpeg's DCT scaling through
Pillow's `draft`), which is most of the speed: decoding a 12 MP photo in full costs several times
what decoding it at 1/4 scale does. Runs in a worker's decode threads (Pillow releases the GIL
while it decodes, resizes and encodes), never on the network loop.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from distributed_downloader.errors import ErrorCode

# Pillow's own bomb check would warn or raise at its default size; ours is explicit instead.
Image.MAX_IMAGE_PIXELS = None

# After DCT-domain scaling the remaining factor is under 2, where Pillow's antialiased
# triangle filter loses little to bicubic and costs a third less (benchmarks/throughput.py).
RESAMPLE = Image.Resampling.BILINEAR
ENCODINGS = {"jpeg": "JPEG", "webp": "WEBP"}
ORIGINAL_REENCODING = {"png": "PNG", "gif": "PNG", "tiff": "PNG", "webp": "WEBP"}


@dataclass
class StoredImage:
    image: bytes
    image_format: str  # jpeg | webp | png | ... (lower case)
    original_size: tuple[int, int]  # (height, width), as oriented by EXIF
    resized_size: tuple[int, int]
    hashsum_original: str
    hashsum_resized: str


@dataclass
class ImageFailure:
    code: ErrorCode
    message: str


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) as displayed: EXIF orientations 5-8 swap the axes."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth refusing the image for
        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB; transparency is composed over white rather than dropped to black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def process_image(
    body: bytes,
    image_size: int,
    output_format: str = "jpeg",
    quality: int = 95,
    max_pixels: int = 89_478_485,
) -> StoredImage | ImageFailure:
    """Turn a downloaded body into the stored image, or say why it cannot be one."""
    hashsum_original = hashlib.md5(body).hexdigest()
    try:
        image = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        return ImageFailure(ErrorCode.NOT_AN_IMAGE, "not an image Pillow can identify")
    except Exception as exc:  # a damaged or cut-off header
        return _decode_failure(exc)
    width, height = image.size
    if width * height > max_pixels:
        return ImageFailure(
            ErrorCode.DECOMPRESSION_BOMB,
            f"{width}x{height} is {width * height:,} pixels, over max_image_pixels {max_pixels:,}",
        )
    source_format = (image.format or "unknown").lower()
    original_size = _oriented_size(image)
    needs_resize = image_size > 0 and max(width, height) > image_size

    if output_format == "original" and not needs_resize:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()  # proves the body decodes completely
        except Exception as exc:
            return _decode_failure(exc)
        return StoredImage(body, source_format, original_size, original_size,
                           hashsum_original, hashsum_original)

    try:
        if needs_resize:
            scale = image_size / max(width, height)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            # JPEG: let libjpeg decode at the smallest 1/2, 1/4 or 1/8 scale still >= target.
            image.draft("RGB", target)
            image.load()
            image = image.resize(target, RESAMPLE)
        else:
            image.load()
    except Exception as exc:
        return _decode_failure(exc)

    try:
        image = ImageOps.exif_transpose(image) or image
        image = _flatten(image)
        # "original" but resized: keep the source's kind of encoding where we can.
        encoding = ENCODINGS.get(output_format) or ORIGINAL_REENCODING.get(source_format, "JPEG")
        buffer = io.BytesIO()
        options = {"quality": quality} if encoding in ("JPEG", "WEBP") else {}
        image.save(buffer, format=encoding, **options)
    except Exception as exc:
        return ImageFailure(ErrorCode.IMAGE_ERROR, f"cannot convert or encode: {exc}")
    stored = buffer.getvalue()
    width, height = image.size
    return StoredImage(
        image=stored,
        image_format=encoding.lower(),
        original_size=original_size,
        resized_size=(height, width),
        hashsum_original=hashsum_original,
        hashsum_resized=hashlib.md5(stored).hexdigest(),
    )


def _decode_failure(exc: Exception) -> ImageFailure:
    text = str(exc)
    if isinstance(exc, EOFError) or any(
        sign in text.lower() for sign in ("truncated", "premature end")
    ):
        return ImageFailure(ErrorCode.TRUNCATED_IMAGE, f"truncated image: {text}")
    return ImageFailure(ErrorCode.NOT_AN_IMAGE, f"cannot decode: {text}")
