"""A loopback image farm: HTTP servers on 127.0.0.x that behave like real image hosts.

Used by the bundled example, the tests and the benchmarks. Every server binds a loopback
address (anything else is refused), so each one is a different "host" to the downloader. A
server can enforce a rate limit (429 with Retry-After over it; the limit may be changed while
the farm runs), answer one error status to everything, and its paths play the faults real hosts
have: 404s, transient 503s (with or without Retry-After), slow answers, redirects, HTML error
pages with status 200, truncated images, decompression bombs, over-size bodies and headers,
trickling bodies, connection resets. Every request is logged with its time, status and
Retry-After, so tests can check the downloader's manners.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import random
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from aiohttp import web
from PIL import Image


def make_photo(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A JPEG that costs about what a real photo of that size costs to decode (~0.4 B/pixel)."""
    rng = random.Random(seed)
    small_w, small_h = max(2, width // 64), max(2, height // 64)
    blobs = Image.frombytes(
        "RGB", (small_w, small_h), bytes(rng.getrandbits(8) for _ in range(3 * small_w * small_h))
    ).resize((width, height), Image.Resampling.BICUBIC)
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(blobs, noise, 0.25).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_small_image(seed: int, size: tuple[int, int] = (96, 64), exif_orientation: int = 0,
                     image_format: str = "JPEG") -> bytes:
    """A cheap, distinct image for tests."""
    rng = random.Random(seed)
    color = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", size, color)
    inverse = (255 - color[0], 255 - color[1], 255 - color[2])
    image.paste(inverse, (0, 0, size[0] // 3, size[1] // 2))
    buffer = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, image_format, exif=exif)
    else:
        image.save(buffer, image_format)
    return buffer.getvalue()


def make_png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims a huge image (no pixel data is ever needed to refuse it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * 16) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_scan_png(width: int, height: int, mode: str = "RGBA", seed: int = 0,
                  bit_depth: int = 8) -> bytes:
    """A large, scan-like PNG: a flat background and a few rectangles, half-transparent ones
    when there is alpha. Written row by row, so making even a 9000x9000 one needs almost no
    memory; it is a few hundred KB on the wire and width x height x 4 bytes once decoded."""
    colour_type, bands = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}[mode]
    sample = bit_depth // 8  # bytes a sample: 1 or 2
    rng = random.Random(seed)

    def colour(alpha: int) -> bytes:
        values = [rng.randrange(256) for _ in range(3 if bands >= 3 else 1)]
        return bytes(value for value in values + ([alpha] if bands in (2, 4) else [])
                     for _ in range(sample))

    background = colour(255) * width
    pixel = bands * sample
    boxes = []
    for _ in range(3):
        left, top = rng.randrange(width // 2), rng.randrange(height // 2)
        right, bottom = left + rng.randrange(1, width // 2), top + rng.randrange(1, height // 2)
        boxes.append((left, top, right, bottom, colour(rng.choice((0, 128, 255)))))
    rows: dict[tuple[int, ...], bytes] = {}
    packer, idat, previous = zlib.compressobj(6), [], None
    for y in range(height):
        inside = tuple(i for i, box in enumerate(boxes) if box[1] <= y < box[3])
        if inside not in rows:
            row = bytearray(background)
            for i in inside:
                left, _, right, _, fill = boxes[i]
                row[left * pixel:right * pixel] = fill * (right - left)
            rows[inside] = bytes(row)
        row = rows[inside]
        # A row like the one above is filtered "up": all zeros, which deflate to nothing.
        idat.append(packer.compress(b"\x02" + bytes(len(row)) if row is previous
                                    else b"\x00" + row))
        previous = row
    idat.append(packer.flush())
    data = b"".join(idat)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + b"".join(
        _png_chunk(b"IDAT", data[at:at + (1 << 20)]) for at in range(0, len(data), 1 << 20)
    ) + _png_chunk(b"IEND", b"")


HTML_ERROR_PAGE = b"<html><body><h1>Sorry</h1><p>The image is not available.</p></body></html>"
HUGE_HEADER_BYTES = 100_000  # /huge-headers/: one header line this long (clients read ~8 KB)
# Paths answered with a status alone: kind -> (status, text).
PLAIN_STATUSES: dict[str, tuple[int, str | None]] = {
    "missing": (404, "not found"), "forbidden": (403, None), "gone": (410, None)}


def peak_in_one_second(times: Iterable[float]) -> int:
    """Most of `times` that fall in any 1-second window [t, t + 1)."""
    ordered = sorted(times)
    peak, start = 0, 0
    for end, current in enumerate(ordered):
        while current - ordered[start] >= 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


@dataclass
class RequestRecord:
    time: float  # time.time() when the request arrived
    path: str
    status: int
    user_agent: str = ""
    retry_after: str | None = None  # the Retry-After header of the answer, if it had one


@dataclass
class ServerSpec:
    """How one farm server behaves."""

    host: str  # a loopback address, e.g. 127.0.0.2
    port: int = 0  # 0: any free port
    # Requests/s in any 1 s (under 1/s: 1 per 1/rate s); then 429. Read at every request, so
    # another thread may change it while the farm runs.
    rate_limit: float | None = None
    retry_after: float = 1.0
    advertise_limit: bool = False  # send the limit as a RateLimit-Policy header
    robots_tag: str | None = None  # an X-Robots-Tag header on every image (e.g. "noai")
    robots_txt: str | None = None  # served at /robots.txt, even when down (None: 404, or 503)
    robots_status: int = 200  # of /robots.txt when robots_txt is set (e.g. 503, with Retry-After)
    robots_headers: dict[str, str] = field(default_factory=dict)  # e.g. Cache-Control
    latency: float = 0.0  # seconds before every answer
    down: bool = False  # answer 503 to everything
    fail_status: int | None = None  # answer this status (no Retry-After) to all but robots.txt
    flaky_failures: int = 2  # /flaky/ paths fail this many times (or ?fails=K) before they answer
    flaky_retry_after: str | None = "0"  # Retry-After of their 503s (None: no header)
    slow_seconds: float = 2.0
    large_size: int = 3_000_000
    trickle_seconds: float = 30.0
    generate_images: bool = False  # serve a generated photo for unknown /img/ paths
    generated_size: tuple[int, int] = (800, 600)


@dataclass
class FarmServer:
    spec: ServerSpec
    images: dict[str, bytes] = field(default_factory=dict)  # name -> bytes, served at /img/name
    log: list[RequestRecord] = field(default_factory=list)
    port: int = 0
    _recent: deque = field(default_factory=deque)
    _attempts: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.spec.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def requests_to(self, prefix: str = "/") -> int:
        return sum(1 for record in self.log if record.path.startswith(prefix))

    def image_requests(self) -> list[RequestRecord]:
        """Every request but those for robots.txt."""
        return [record for record in self.log if record.path != "/robots.txt"]

    def peak_per_second(self) -> int:
        """Most requests that arrived in any 1-second window [t, t + 1)."""
        return peak_in_one_second(record.time for record in self.log)

    def status_count(self, status: int) -> int:
        return sum(1 for record in self.log if record.status == status)

    def _over_limit(self, now: float) -> bool:
        """Whether a request arriving now exceeds the limit; `_recent` holds the accepted ones.

        The limit is read afresh each time: when it drops, the requests already accepted in the
        window count against the new one (so 429s follow until the window has room).
        """
        limit = self.spec.rate_limit  # one read: another thread may change it
        if limit is None:
            self._recent.clear()  # a limit set later counts from then on
            return False
        if limit <= 0:
            return True
        window = 1.0 if limit >= 1 else 1.0 / limit  # below 1/s: one request per 1/limit s
        while self._recent and now - self._recent[0] >= window:
            self._recent.popleft()
        if len(self._recent) >= limit * window:
            return True
        self._recent.append(now)
        return False

    def add_images(self, count: int, seed: int = 0, prefix: str = "") -> list[str]:
        """Serve `count` small distinct images at /img/{prefix}{i}.jpg; their URLs."""
        urls = []
        for index in range(count):
            name = f"{prefix}{index}.jpg"
            self.images[name] = make_small_image(seed + index)
            urls.append(self.url(f"/img/{name}"))
        return urls

    def image_named(self, name: str) -> bytes | None:
        if name in self.images:
            return self.images[name]
        if self.spec.generate_images:
            seed = int.from_bytes(hashlib.md5(f"{self.spec.host}/{name}".encode()).digest()[:4],
                                  "big")
            self.images[name] = make_photo(*self.spec.generated_size, seed=seed)
            return self.images[name]
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        path = request.path
        try:
            response = await self._answer(request, path, now)
        except web.HTTPException as answer:  # the redirects: logged like any other answer
            self.log.append(RequestRecord(now, path, answer.status,
                                          request.headers.get("User-Agent", "")))
            raise
        if response is not None and self.spec.advertise_limit and self.spec.rate_limit \
                and not response.prepared:
            response.headers["RateLimit-Policy"] = f'"limit";q={self.spec.rate_limit:g};w=1'
        self.log.append(RequestRecord(now, path, response.status if response else 0,
                                      request.headers.get("User-Agent", ""),
                                      response.headers.get("Retry-After") if response else None))
        if response is None:  # a reset: no answer at all
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return response

    async def _answer(self, request: web.Request, path: str,
                      now: float) -> web.StreamResponse | None:
        """What the server does to every request first (its limit, latency, robots.txt, being
        down or failing), then what the path asks for: /KIND/NAME (None: a reset)."""
        answer = await self._server_wide(request, path, now)
        if answer is not None:
            return answer
        kind, _, name = path.lstrip("/").partition("/")
        if kind in PLAIN_STATUSES:
            status, text = PLAIN_STATUSES[kind]
            return web.Response(status=status, text=text)
        by_path = self.PATH_ANSWERS.get(kind)
        if by_path is None:
            return web.Response(status=404)
        return await by_path(self, request, path, name)

    async def _server_wide(self, request: web.Request, path: str,
                           now: float) -> web.Response | None:
        """The answer whatever the path, if the server's state decides it (None: the path
        decides)."""
        spec = self.spec
        if self._over_limit(now):
            return web.Response(status=429, headers={"Retry-After": f"{spec.retry_after:g}"})
        if spec.latency:
            await asyncio.sleep(spec.latency)
        if path == "/robots.txt" and spec.robots_txt is not None:  # answered even when down
            headers = dict(spec.robots_headers)
            if spec.robots_status in (429, 503):
                headers["Retry-After"] = f"{spec.retry_after:g}"
            return web.Response(status=spec.robots_status, text=spec.robots_txt,
                                headers=headers)
        if spec.down:
            return web.Response(status=503, text="down for maintenance")
        if spec.fail_status is not None and path != "/robots.txt":  # robots.txt: 404
            return web.Response(status=spec.fail_status, text="internal error")
        return None

    # --- what each kind of path plays: (request, path, name) -> answer ------------------------

    async def _image(self, request: web.Request, path: str, name: str) -> web.Response:
        body = self.image_named(name)
        headers = {"X-Robots-Tag": self.spec.robots_tag} if self.spec.robots_tag else {}
        return web.Response(body=body, content_type="image/jpeg", headers=headers) \
            if body else web.Response(status=404)

    async def _opted_out(self, request: web.Request, path: str, name: str) -> web.Response:
        """This one image opts out, whatever the server does."""
        return web.Response(body=self.image_named(name), content_type="image/jpeg",
                            headers={"X-Robots-Tag": request.query.get("tag", "noai")})

    async def _flaky(self, request: web.Request, path: str, name: str) -> web.Response:
        """503 for the first `fails` attempts at this path, then the image."""
        count = self._attempts.get(path, 0) + 1
        self._attempts[path] = count
        failures = int(request.query.get("fails", self.spec.flaky_failures))
        if count <= failures:
            headers = {} if self.spec.flaky_retry_after is None \
                else {"Retry-After": self.spec.flaky_retry_after}
            return web.Response(status=503, headers=headers)
        return web.Response(body=self.image_named(name), content_type="image/jpeg")

    async def _slow(self, request: web.Request, path: str, name: str) -> web.Response:
        await asyncio.sleep(self.spec.slow_seconds)
        return web.Response(body=self.image_named(name), content_type="image/jpeg")

    async def _redirect(self, request: web.Request, path: str, name: str) -> web.Response:
        raise web.HTTPFound(f"/img/{name}")

    async def _redirect_loop(self, request: web.Request, path: str, name: str) -> web.Response:
        raise web.HTTPFound(path)

    async def _redirect_to(self, request: web.Request, path: str, name: str) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    async def _html(self, request: web.Request, path: str, name: str) -> web.Response:
        return web.Response(body=HTML_ERROR_PAGE, content_type="text/html")

    async def _truncated(self, request: web.Request, path: str, name: str) -> web.Response:
        body = self.image_named(name) or b""
        return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")

    async def _bomb(self, request: web.Request, path: str, name: str) -> web.Response:
        return web.Response(body=make_png_bomb(), content_type="image/png")

    async def _huge_headers(self, request: web.Request, path: str, name: str) -> web.Response:
        return web.Response(body=self.image_named(name), content_type="image/jpeg",
                            headers={"X-Padding": "a" * HUGE_HEADER_BYTES})

    async def _large(self, request: web.Request, path: str, name: str) -> web.Response:
        return web.Response(body=b"\xff" * self.spec.large_size, content_type="image/jpeg")

    async def _large_chunked(self, request: web.Request, path: str,
                             name: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(self.spec.large_size // 65536 + 1):
            await response.write(b"\xff" * 65536)
        await response.write_eof()
        return response

    async def _trickle(self, request: web.Request, path: str, name: str) -> web.StreamResponse:
        """10 bytes every half second of the promised 100,000, for `trickle_seconds`."""
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg",
                                               "Content-Length": "100000"})
        await response.prepare(request)
        deadline = time.monotonic() + self.spec.trickle_seconds
        try:
            while time.monotonic() < deadline:
                await response.write(b"\xff" * 10)
                await asyncio.sleep(0.5)
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def _reset(self, request: web.Request, path: str, name: str) -> None:
        return None  # handle() aborts the connection

    PATH_ANSWERS: ClassVar[dict[str, Callable[[FarmServer, web.Request, str, str],
                                     Awaitable[web.StreamResponse | None]]]] = {
        "img": _image, "optout": _opted_out, "flaky": _flaky, "slow": _slow,
        "redirect": _redirect, "redirect-loop": _redirect_loop, "redirect-to": _redirect_to,
        "html": _html, "truncated": _truncated, "bomb": _bomb, "huge-headers": _huge_headers,
        "large": _large, "large-chunked": _large_chunked, "trickle": _trickle, "reset": _reset,
    }


class Farm:
    """Several farm servers, served from a background thread's event loop."""

    def __init__(self, specs: list[ServerSpec]) -> None:
        for spec in specs:
            if not ipaddress.ip_address(spec.host).is_loopback:
                raise ValueError(f"farm servers bind loopback addresses only, not {spec.host}")
        self.servers = [FarmServer(spec) for spec in specs]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> Farm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_all(), self._loop).result(timeout=30)

    async def _start_all(self) -> None:
        for server in self.servers:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", server.handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, server.spec.host, server.spec.port)
            await site.start()
            server.port = runner.addresses[0][1]
            self._runners.append(runner)

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self._runners:
                await runner.cleanup()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __getitem__(self, host: str) -> FarmServer:
        return next(server for server in self.servers if server.spec.host == host)
