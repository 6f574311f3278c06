"""Bytes in, stored image out: decode, orient, resize, encode and hash.

In two steps, so that a worker can budget memory before any pixel exists: `open_image` reads the
header only (size, mode, orientation) and says how many bytes decoding will hold at its worst
moment (`OpenedImage.cost`); `finish_image` decodes, resizes, encodes and hashes, in a worker's
decode threads (every library here releases the GIL while it decodes, resizes and encodes),
never on the network loop. `process_image` does both.

Baseline and progressive RGB or grey JPEGs, most of what is downloaded, take the fast path:
libjpeg-turbo through simplejpeg decodes at the smallest n/8 scale still at least the target,
OpenCV area-averages to the target and encodes. Per core it beats Pillow's draft + bilinear,
at the same quality against a float reference (benchmarks/decode_paths.py). Everything else,
and any JPEG the fast path rejects, goes through Pillow, as below.

An image larger than the target is decoded at reduced size where the format allows, which is
most of the speed and what keeps large scans within a worker's memory:
- JPEG: libjpeg's DCT scaling (Pillow's `draft`) decodes at the smallest 1/2, 1/4 or 1/8 scale
  still at least the target. A progressive JPEG still holds every DCT coefficient of the full
  image while it decodes (2 bytes a sample); the cost counts them.
- JPEG 2000: OpenJPEG decodes a lower resolution level (Pillow's `reduce`), as many levels down
  as the codestream has and the target allows.
- PNG with 8-bit samples (grey, RGB, palette, with or without alpha; not interlaced, not
  animated: nearly all large ones): decoded a strip of rows at a time, each strip box-reduced by
  the integer factor that keeps it at least the target, so the whole image never exists in
  memory; the result equals decoding it whole and calling `reduce`. Pillow itself has no reduced
  decoding for PNG.
- Everything else (WebP, TIFF, GIF, BMP; interlaced, 16-bit or 1/2/4-bit PNG, the latter one
  byte a pixel once decoded): decoded in full whatever the target, as Pillow offers nothing
  smaller; WebP's decoder holds about four copies meanwhile. The cost says so, and a worker
  decodes an image costlier than its whole budget alone.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zlib
from dataclasses import dataclass

import cv2
import simplejpeg
from PIL import Image, UnidentifiedImageError

from distributed_downloader.errors import ErrorCode, Failure

# A worker's decode threads are its parallelism; OpenCV's own pool would oversubscribe the cores
# and hold a stack and buffers per core in every worker.
cv2.setNumThreads(1)
# Pillow's own bomb check would warn or raise at its default size; ours is explicit instead.
Image.MAX_IMAGE_PIXELS = None

# After reduced decoding the remaining factor is under 2, where Pillow's antialiased
# triangle filter loses little to bicubic and costs a third less (benchmarks/throughput.py).
RESAMPLE = Image.Resampling.BILINEAR
ENCODINGS = {"jpeg": "JPEG", "webp": "WEBP"}
ORIGINAL_REENCODING = {"png": "PNG", "gif": "PNG", "tiff": "PNG", "webp": "WEBP"}
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The same EXIF transposes on an OpenCV image (rows, columns, channels); flips happen in place.
UPRIGHT_CV2 = {
    2: lambda pixels: cv2.flip(pixels, 1, dst=pixels),
    3: lambda pixels: cv2.flip(pixels, -1, dst=pixels),
    4: lambda pixels: cv2.flip(pixels, 0, dst=pixels),
    5: cv2.transpose,
    6: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE),
    7: lambda pixels: cv2.flip(cv2.transpose(pixels), -1),
    8: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# Pillow JPEG modes the fast path decodes: RGB (YCbCr in the file) and grey; CMYK goes to Pillow.
FAST_JPEG_MODES = ("RGB", "L")

# Decoded pixels of one PNG strip: small beside a worker's budget, large enough that the
# per-strip work (a few Pillow calls) is lost in the decoding.
PNG_STRIP_BYTES = 4 << 20
# Compressed input handed to zlib at once: its unconsumed tail is copied at every call.
INFLATE_PIECE = 1 << 16
# Samples a pixel, by PNG colour type: grey, RGB, palette, grey and alpha, RGBA.
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Allocator slack and small buffers (zlib, libjpeg, encoder state) counted for every image.
COST_OVERHEAD = 2 << 20


@dataclass
class StoredImage:
    image: bytes
    image_format: str  # jpeg | webp | png | ... (lower case)
    original_size: tuple[int, int]  # (height, width), as oriented by EXIF
    resized_size: tuple[int, int]
    hashsum_original: str
    hashsum_resized: str


@dataclass
class PngLayout:
    """What a PNG's chunks say, read without decoding: enough to decode it in strips."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool
    animated: bool
    idat: list[memoryview]
    exif: bytes | None  # an eXIf chunk, which may come after the pixels

    @property
    def in_strips(self) -> bool:
        """Decodable in strips: rows one after the other, one byte a sample."""
        return not self.interlaced and not self.animated and self.bit_depth == 8 \
            and self.colour_type in PNG_CHANNELS

    @property
    def row_bytes(self) -> int:
        return (self.width * PNG_CHANNELS[self.colour_type] * self.bit_depth + 7) // 8


@dataclass
class OpenedImage:
    """A body whose header has been read; no pixel is decoded yet."""

    body: bytes
    image: Image.Image  # lazy; set to decode at reduced size where the format allows
    size: tuple[int, int]  # (width, height) in the file
    source_format: str  # lower case
    original_size: tuple[int, int]  # (height, width), as displayed
    orientation: int  # EXIF orientation, 1 when none
    target: tuple[int, int] | None  # (width, height) to resize to; None: kept as it is
    output_format: str
    png_factor: int  # > 1: a PNG decoded in strips, box-reduced by this factor
    png: PngLayout | None
    cost: int  # bytes of memory decoding, resizing and encoding it hold at the worst moment


def process_image(
    body: bytes,
    image_size: int,
    output_format: str = "jpeg",
    quality: int = 95,
    max_pixels: int = 89_478_485,
) -> StoredImage | Failure:
    """Turn a downloaded body into the stored image, or say why it cannot be one."""
    opened = open_image(body, image_size, output_format, max_pixels)
    if isinstance(opened, Failure):
        return opened
    return finish_image(opened, quality)


def open_image(
    body: bytes,
    image_size: int,
    output_format: str = "jpeg",
    max_pixels: int = 89_478_485,
) -> OpenedImage | Failure:
    """Read the header: refuse bombs, choose how to decode, and say what decoding will cost."""
    try:
        image = Image.open(io.BytesIO(body))
    except UnidentifiedImageError:
        return Failure(ErrorCode.NOT_AN_IMAGE, "not an image Pillow can identify")
    except Exception as exc:  # a damaged or cut-off header
        return _decode_failure(exc)
    width, height = image.size
    if width * height > max_pixels:
        return Failure(
            ErrorCode.DECOMPRESSION_BOMB,
            f"{width}x{height} is {width * height:,} pixels, over max_image_pixels {max_pixels:,}",
        )
    try:
        png = _png_layout(body) if image.format == "PNG" else None
        orientation = _orientation(image, png)
        original_size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
        target, png_factor = None, 0
        if image_size > 0 and max(width, height) > image_size:
            scale = image_size / max(width, height)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            factor = min(width // target[0], height // target[1])
            if png is not None and png.in_strips and factor > 1 and image.tile and \
                    image.tile[0].args == image.mode:  # 8-bit samples, as Pillow read them
                png_factor = factor
            else:
                _decode_smaller(image, body, target)
        opened = OpenedImage(body, image, (width, height), (image.format or "unknown").lower(),
                             original_size, orientation, target, output_format, png_factor,
                             png, 0)
        opened.cost = decode_cost(opened)
    except Exception as exc:  # a header Pillow could read that makes no sense
        return _decode_failure(exc)
    return opened


def finish_image(opened: OpenedImage, quality: int = 95) -> StoredImage | Failure:
    """Decode, orient, resize, encode and hash an opened image: the costly part."""
    body, image, target = opened.body, opened.image, opened.target
    hashsum_original = hashlib.md5(body).hexdigest()
    if opened.output_format == "original" and target is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()  # proves the body decodes completely
        except Exception as exc:
            return _decode_failure(exc)
        return StoredImage(bytes(body), opened.source_format, opened.original_size,
                           opened.original_size, hashsum_original, hashsum_original)

    if _fast_path_fits(opened):
        fast = _finish_jpeg_fast(opened, quality, hashsum_original)
        if fast is not None:
            return fast

    try:
        if opened.png_factor:
            assert opened.png is not None
            image = _decode_png_reduced(image, opened.png, opened.png_factor)
        else:
            image.load()
        if target is not None and image.size != target:
            image = image.resize(target, RESAMPLE)
    except Exception as exc:
        return _decode_failure(exc)

    try:
        if opened.orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[opened.orientation])
        image = _flatten(image)
        # "original" but resized: keep the source's kind of encoding where we can.
        encoding = ENCODINGS.get(opened.output_format) or \
            ORIGINAL_REENCODING.get(opened.source_format, "JPEG")
        buffer = io.BytesIO()
        options = {"quality": quality} if encoding in ("JPEG", "WEBP") else {}
        image.save(buffer, format=encoding, **options)
    except Exception as exc:
        return Failure(ErrorCode.IMAGE_ERROR, f"cannot convert or encode: {exc}")
    stored = buffer.getvalue()
    width, height = image.size
    return StoredImage(
        image=stored,
        image_format=encoding.lower(),
        original_size=opened.original_size,
        resized_size=(height, width),
        hashsum_original=hashsum_original,
        hashsum_resized=hashlib.md5(stored).hexdigest(),
    )


def _fast_path_fits(opened: OpenedImage) -> bool:
    """A JPEG stored as JPEG, in a colour model libjpeg-turbo turns into RGB itself."""
    encoding = ENCODINGS.get(opened.output_format) or \
        ORIGINAL_REENCODING.get(opened.source_format, "JPEG")
    return opened.source_format == "jpeg" and encoding == "JPEG" and \
        opened.image.mode in FAST_JPEG_MODES


def _finish_jpeg_fast(opened: OpenedImage, quality: int,
                      hashsum_original: str) -> StoredImage | None:
    """libjpeg-turbo decode at a reduced scale, area resize, upright, encode; None when any
    step refuses the file (damaged, cut off, arithmetic coding...): Pillow then decides."""
    width, height = opened.target or opened.size
    try:
        pixels = simplejpeg.decode_jpeg(opened.body, "BGR", min_width=width, min_height=height)
        if pixels.shape[1] != width or pixels.shape[0] != height:
            pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
        if opened.orientation in UPRIGHT_CV2:
            pixels = UPRIGHT_CV2[opened.orientation](pixels)
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except (ValueError, cv2.error):
        return None
    if not ok:
        return None
    stored = encoded.tobytes()
    return StoredImage(
        image=stored,
        image_format="jpeg",
        original_size=opened.original_size,
        resized_size=(pixels.shape[0], pixels.shape[1]),
        hashsum_original=hashsum_original,
        hashsum_resized=hashlib.md5(stored).hexdigest(),
    )


# --- what decoding costs -------------------------------------------------------------------


def pixel_bytes(mode: str) -> int:
    """Bytes a pixel takes in Pillow's memory: it keeps every multi-band mode in 4 bytes."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_cost(opened: OpenedImage) -> int:
    """Bytes `finish_image` holds at once for this image, at its worst moment.

    Counted from the header alone: the decoded pixels (at the size decoding will produce), what
    the decoder holds beside them, and the copies resizing, orienting, flattening and encoding
    make. Checked against measured peaks by `benchmarks/decode_memory.py --formats`. A JPEG on
    the fast path holds less (3 bytes a pixel, at a scale no larger than Pillow's draft), so
    Pillow's cost bounds both.
    """
    image, target = opened.image, opened.target
    if opened.png_factor:
        return _png_strips_cost(opened)
    width, height = _decoded_size(image)
    decoded = width * height * pixel_bytes(image.mode)
    loading = _decoder_bytes(opened, decoded)
    if target is not None:
        after = decoded + _resizing_bytes(image.mode, (width, height), target)
    elif opened.output_format == "original":
        after = 0  # kept as downloaded: decoded only to prove it decodes
    else:  # stored at full size: flattened over white, oriented and encoded whole
        after = decoded + 2 * width * height  # the encoded output, generously
        if image.mode != "RGB":
            after += width * height * 4 * (2 if _has_alpha(image) else 1)
        if opened.orientation in UPRIGHT:
            after += width * height * 4
    return max(loading, after) + COST_OVERHEAD


def _decoder_bytes(opened: OpenedImage, decoded: int) -> int:
    """What loading holds at its worst moment, the decoded pixels included."""
    image = opened.image
    if image.format == "WEBP":  # libwebp's canvases beside Pillow's own copy
        return decoded * 9 // 2
    if image.format == "JPEG2000":  # OpenJPEG: a 32-bit plane a component, the stream copied
        return decoded * 5 + 2 * len(opened.body) + (8 << 20)
    if image.format == "TIFF":  # libtiff's strip buffers
        return decoded * 11 // 10 + (4 << 20)
    return decoded + _coefficient_bytes(image, opened.size)


def _resizing_bytes(mode: str, size: tuple[int, int], target: tuple[int, int]) -> int:
    """Resizing to the target, and what follows at that size (orient, flatten, encode)."""
    extra = 4 * 4 * target[0] * target[1]
    if mode in ("RGBA", "LA", "PA"):
        extra += size[0] * size[1] * 4  # resize works on a premultiplied copy
    if size[0] != target[0] and size[1] != target[1]:
        extra += target[0] * size[1] * pixel_bytes(mode)  # the horizontal pass, then vertical
    return extra


def _png_strips_cost(opened: OpenedImage) -> int:
    """A PNG decoded in strips: one strip's copies, the reduced image, and resizing that."""
    assert opened.png is not None and opened.target is not None
    png, factor, mode = opened.png, opened.png_factor, opened.image.mode
    # inflated, joined to the row above, as stored blocks; then decoded
    per_row = 3 * (png.row_bytes + 1) + png.width * pixel_bytes(mode)
    if mode == "P":
        per_row += png.width * 4  # converted to RGB(A)
    if _has_alpha(opened.image):
        per_row += png.width * 4  # reduce works on a premultiplied copy
    working = _strips_mode(opened.image)
    reduced = (-(-png.width // factor), -(-png.height // factor))
    return _strip_rows(png.width, factor) * per_row + \
        reduced[0] * reduced[1] * pixel_bytes(working) + \
        _resizing_bytes(working, reduced, opened.target) + COST_OVERHEAD


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or \
        (image.mode == "P" and "transparency" in image.info)


def _decoded_size(image: Image.Image) -> tuple[int, int]:
    """The size `load` will give: JPEG's draft already set it, JPEG 2000's reduce sets it then."""
    reduce = getattr(image, "_reduce", 0) if image.format == "JPEG2000" else 0
    if not reduce:
        return image.size
    power = 1 << reduce
    return ((image.size[0] + power // 2) // power, (image.size[1] + power // 2) // power)


def _coefficient_bytes(image: Image.Image, size: tuple[int, int]) -> int:
    """A progressive JPEG's DCT coefficients, held whole while it decodes, whatever the scale."""
    if image.format != "JPEG" or not image.info.get("progressive"):
        return 0
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    most_h = max(1, *(layer[1] for layer in layers))
    most_v = max(1, *(layer[2] for layer in layers))
    width, height = size
    blocks = sum(-(-width * h // (most_h * 8)) * -(-height * v // (most_v * 8))
                 for _, h, v, _ in layers)
    return blocks * 64 * 2


def _decode_smaller(image: Image.Image, body: bytes, target: tuple[int, int]) -> None:
    """Set a lazy image to decode at the smallest size its format allows, still >= target."""
    if image.format == "JPEG":
        image.draft("RGB", target)
    elif image.format == "JPEG2000":
        width, height = image.size
        levels, reduce = _j2k_levels(body), 0
        while reduce < levels:
            power = 1 << (reduce + 1)
            if (width + power // 2) // power < target[0] or \
                    (height + power // 2) // power < target[1]:
                break
            reduce += 1
        if reduce:
            image.reduce = reduce  # type: ignore[method-assign,assignment]


def _j2k_levels(body: bytes) -> int:
    """Resolution levels a JPEG 2000 codestream can drop: its fewest decomposition levels
    (COD, or a component's COC, in the main header); 0 when they cannot be read."""
    start = 0 if body.startswith(b"\xff\x4f\xff\x51") else body.find(b"jp2c\xff\x4f\xff\x51") + 4
    if start < 0 or start == 3:
        return 0
    position, levels, components = start + 2, None, 0
    while position + 4 <= len(body) and body[position] == 0xFF:
        marker = body[position + 1]
        if marker in (0x90, 0xD9):  # start of a tile, end of the codestream
            break
        length = int.from_bytes(body[position + 2:position + 4], "big")
        segment = body[position + 4:position + 2 + length]
        if marker == 0x51 and len(segment) >= 36:  # SIZ: how many components
            components = int.from_bytes(segment[34:36], "big")
        elif marker == 0x52 and len(segment) >= 6:  # COD
            levels = segment[5] if levels is None else min(levels, segment[5])
        elif marker == 0x53:  # COC: one component's own levels
            at = (1 if components < 257 else 2) + 1
            if len(segment) > at:
                levels = segment[at] if levels is None else min(levels, segment[at])
        position += 2 + length
    return levels or 0


# --- PNG in strips -------------------------------------------------------------------------


def _png_layout(body: bytes) -> PngLayout | None:
    """Walk a PNG's chunks (no pixel decoded); None when they do not make sense."""
    view = memoryview(body)
    position, header, idat, exif, animated = 8, None, [], None, False
    while position + 8 <= len(body):
        length = int.from_bytes(view[position:position + 4], "big")
        kind = bytes(view[position + 4:position + 8])
        data = view[position + 8:position + 8 + length]  # shorter when the body is cut off
        if kind == b"IHDR" and len(data) >= 13:
            header = data
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"acTL":
            animated = True
        elif kind == b"eXIf":
            exif = bytes(data)
        elif kind == b"IEND":
            break
        position += 12 + length
    if header is None:
        return None
    return PngLayout(
        width=int.from_bytes(header[0:4], "big"), height=int.from_bytes(header[4:8], "big"),
        bit_depth=header[8], colour_type=header[9], interlaced=header[12] != 0,
        animated=animated, idat=idat, exif=exif)


def _strip_rows(width: int, factor: int) -> int:
    """Rows of one strip: a multiple of the factor, so no box of the reduction spans two."""
    return max(1, PNG_STRIP_BYTES // (width * 4) // factor) * factor


class _Inflater:
    """The filtered rows of a PNG, inflated a given number of bytes at a time."""

    def __init__(self, chunks: list[memoryview]) -> None:
        self._pieces = (chunk[at:at + INFLATE_PIECE] for chunk in chunks
                        for at in range(0, len(chunk), INFLATE_PIECE))
        self._zlib = zlib.decompressobj()
        self._input: bytes | memoryview = b""

    def read(self, size: int) -> bytes:
        parts, missing = [], size
        while missing:
            if self._zlib.eof:
                raise EOFError("PNG image data ends before its last row")
            if not self._input:
                self._input = next(self._pieces, b"")
                if not self._input:
                    raise EOFError("PNG image data is truncated")
            out = self._zlib.decompress(self._input, missing)
            self._input = self._zlib.unconsumed_tail
            parts.append(out)
            missing -= len(out)
        return b"".join(parts)


def _strips_mode(image: Image.Image) -> str:
    """Mode strips are reduced in: a palette's colours, not its indices, are averaged."""
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return image.mode


def _stored_zlib(data: bytes) -> bytes:
    """`data` as a zlib stream of stored blocks, without the trailing checksum, which the PNG
    decoder never reads: it stops at its last row. A copy, where deflating at level 0 would
    also checksum."""
    view, parts = memoryview(data), [b"\x78\x01"]
    for at in range(0, len(data), 0xFFFF):
        block = view[at:at + 0xFFFF]
        last = at + 0xFFFF >= len(data)
        parts += [bytes((last,)), len(block).to_bytes(2, "little"),
                  (0xFFFF ^ len(block)).to_bytes(2, "little"), block]
    return b"".join(parts)


def _decode_png_reduced(image: Image.Image, png: PngLayout, factor: int) -> Image.Image:
    """The PNG decoded a strip of rows at a time, each box-reduced by `factor` as it comes.

    Equal to decoding it whole and calling `reduce(factor)`: strips are a whole number of boxes
    high, and each strip's first row, filtered against the row above it, is decoded after that
    row given unfiltered (8-bit samples pack back into exactly the bytes they came from).
    Palette images become RGB (RGBA with transparency) before reducing, since averaging
    indices means nothing.
    """
    width, height, row_bytes = png.width, png.height, png.row_bytes
    mode = image.mode
    rawmode = image.tile[0].args if image.tile else mode
    working = _strips_mode(image)
    rows = _strip_rows(width, factor)
    reduced = Image.new(working, (-(-width // factor), -(-height // factor)))
    inflater = _Inflater(png.idat)
    above = b""  # the row above this strip, unfiltered, with filter type 0 ("none")
    for top in range(0, height, rows):
        count = min(rows, height - top)
        carried = count + bool(above)
        strip = Image.new(mode, (width, carried), None)  # None: not filled, decoded into
        strip.frombytes(_stored_zlib(above + inflater.read(count * (row_bytes + 1))), "zip",
                        rawmode)
        above = b"\x00" + strip.crop((0, carried - 1, width, carried)).tobytes("raw", rawmode)
        if mode == "P":
            strip.putpalette(image.palette)  # type: ignore[arg-type]
            if "transparency" in image.info:
                strip.info["transparency"] = image.info["transparency"]
            strip = strip.convert(working)
        box = (0, carried - count, width, carried)
        reduced.paste(strip.reduce(factor, box), (0, top // factor))
    return reduced


# --- orientation and colour ------------------------------------------------------------------


def _orientation(image: Image.Image, png: PngLayout | None) -> int:
    """EXIF orientation from the header alone (Pillow would decode a PNG to find its eXIf)."""
    try:
        if png is not None:
            if png.exif is not None and "exif" not in image.info:
                image.info["exif"] = b"Exif\x00\x00" + png.exif
            exif = Image.Image.getexif(image)  # not PngImageFile's, which decodes first
        else:
            exif = image.getexif()
        orientation = exif.get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth refusing the image for
        return 1
    return orientation if orientation in UPRIGHT else 1


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


def _decode_failure(exc: Exception) -> Failure:
    text = str(exc)
    if isinstance(exc, EOFError) or any(
        sign in text.lower() for sign in ("truncated", "premature end")
    ):
        return Failure(ErrorCode.TRUNCATED_IMAGE, f"truncated image: {text}")
    return Failure(ErrorCode.NOT_AN_IMAGE, f"cannot decode: {text}")
