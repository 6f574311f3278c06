"""A fetch worker: one event loop for the network, a few threads for the images.

The worker asks the scheduler for batches while its decode threads keep up, fetches each batch's
rows under its share of the server's budget (see politeness.py), retries what can succeed later
(see frontier.py and retry.py), decodes off the loop, and commits results in chunks. It reports
what it sees of each server; every decision about a server (its rate, pauses, giving it up) is
the scheduler's (see policy.py). The one thing the worker does at once is honour a pause the
server itself asked for (Retry-After), until the scheduler's word arrives. On SIGINT, SIGTERM or
SIGUSR1 (remembered from its first instruction on: see executors.remember_stop_signals), on the
scheduler's Stop, or when its scheduler vanishes, it stops cleanly: finished rows are committed,
requests in flight are dropped (a resumed run fetches them again).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.config import Settings
from distributed_downloader.errors import ErrorCode, Failure, OutOfSpace
from distributed_downloader.executors import STOP_SIGNALS, stop_signalled
from distributed_downloader.fetch.client import Body, BodyBudget, HttpClient
from distributed_downloader.fetch.decode_budget import DecodeBudget
from distributed_downloader.fetch.frontier import Frontier, Pending
from distributed_downloader.fetch.opt_out import PRODUCT_TOKEN, opted_out
from distributed_downloader.fetch.politeness import ServerDead, ServerSlot
from distributed_downloader.fetch.retry import (
    ATTEMPTS_ON_A_SILENT_SERVER,
    RetryPolicy,
)
from distributed_downloader.fetch.robots import RobotsFile, load_robots
from distributed_downloader.formats import read_successes
from distributed_downloader.images import StoredImage, finish_image, open_image
from distributed_downloader.policy import (
    DEFAULT_THROTTLE_PAUSE,
    Signal,
    advertised_rate,
    quota_pause,
    signal_of,
)
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    BatchRef,
    Budget,
    DiskFull,
    NoWorkYet,
    Report,
    ServerNews,
    Stop,
    WantWork,
    WorkerStopped,
)
from distributed_downloader.schedule import SERVER_KEPT_FAILING
from distributed_downloader.schema import REUSE_NAMES
from distributed_downloader.storage import RunLayout
from distributed_downloader.writers import (
    BatchWriter,
    BufferBudget,
    chunk_row_counts,
    committed_uuids,
    remove_stale_temporaries,
)

log = logging.getLogger(__name__)

REPORT_SECONDS = 1.0
TICK_SECONDS = 0.2
# Bodies waiting for a decode thread, per thread: beyond this no new request starts, so a
# fast network cannot pile up bodies in memory faster than the cores decode them.
DECODE_BACKLOG_PER_THREAD = 4
# Allocations from this size up get their own mapping, returned when freed. glibc would raise
# the threshold to the largest block freed (up to 32 MiB), after which decoders' buffers come
# from the heap and their holes stay resident: a mix of large images then peaked at 660 MiB
# instead of 300 (benchmarks/decode_memory.py --scenario mix).
MMAP_THRESHOLD = 1 << 20


class Channel(Protocol):
    """The worker's line to the scheduler (a pipe locally, MPI messages on a cluster)."""

    def send(self, message: object) -> None: ...

    def listen(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None],
               closed: Callable[[], None]) -> None: ...


def tune_allocator() -> None:
    """Few malloc arenas: each decode thread would otherwise keep its own high-water mark; and
    a fixed mmap threshold, so that freed pixel buffers go back to the system at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; fixing it stops glibc raising it
    except (OSError, AttributeError):
        pass
    # Arrow's own pool keeps freed chunk buffers for reuse; the system's gives them back.
    pa.set_memory_pool(pa.system_memory_pool())


def error_row(row: dict[str, Any], code: ErrorCode, message: str, attempts: int,
              http_status: int | None = None) -> dict[str, Any]:
    return {"uuid": row["uuid"], "identifier": row["identifier"], "retry_count": attempts,
            "error_code": str(code), "error_msg": message[:1000], "http_status": http_status}


def success_row(row: dict[str, Any], image: StoredImage) -> dict[str, Any]:
    return {
        **row,
        "original_size": list(image.original_size),
        "resized_size": list(image.resized_size),
        "hashsum_original": image.hashsum_original,
        "hashsum_resized": image.hashsum_resized,
        "image": image.image,
        "image_format": image.image_format,
    }


class Worker:
    def __init__(self, worker_id: int, settings: Settings, channel: Channel) -> None:
        self.id = worker_id
        self.settings = settings
        self.layout = RunLayout(settings.paths.run_folder("fetch"))
        self.channel = channel
        self.retry = RetryPolicy.from_settings(settings.politeness)
        self.slots: dict[str, ServerSlot] = {}
        self.news: dict[str, ServerNews] = {}
        # server -> the URLs that failed since its last good answer: how many different URLs
        # failed in a row (a few bad URLs retried over and over are not a server down)
        self.failing: dict[str, set[str]] = {}
        self.advertised: dict[str, float] = {}  # server -> its latest RateLimit-Policy rate
        self.answered: set[str] = set()  # servers that answered well at least once here
        self.robots: dict[str, RobotsFile | None] = {}
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.writers: dict[tuple[str, int], BatchWriter] = {}  # until their last report
        self.budget = BufferBudget(settings.store.max_output_memory)
        # One thread more than the worker's cores: Pillow releases the GIL while it decodes, so
        # the spare one keeps the cores busy, and a worker left alone with the last batch
        # uses the cores its idle neighbours freed.
        self.decode_threads = settings.cluster.cpu_per_worker + 1
        self.backlog_limit = self.decode_threads * DECODE_BACKLOG_PER_THREAD
        self.decoding = 0  # bodies handed to the decode threads, not yet back
        # Decoded pixels dwarf the bodies: each image reserves its cost, read from its header.
        self.pixels = DecodeBudget(settings.images.max_decode_memory)
        self._decode_room = asyncio.Event()
        self.asking = False  # a WantWork is unanswered, or the scheduler holds us as hungry
        self.bytes = 0
        self.interrupted = False
        self.out_of_space: OutOfSpace | None = None  # set: this worker writes nothing more
        self._stop = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> bool:
        """Work until told to stop; True when stopped early (a signal, the scheduler gone)."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, self.interrupt)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if stop_signalled():  # while the worker was starting
            self.interrupt()
        network = self.settings.network
        self.client = HttpClient(network, BodyBudget(network.max_body_memory))
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.channel.listen(loop, self.deliver, self.interrupt)
        ticker = asyncio.create_task(self._tick_forever())
        try:
            await self._stop.wait()
        finally:
            ticker.cancel()
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), ticker, return_exceptions=True)
            self._send_report()
            await self.client.close()
            self.pool.shutdown(wait=True, cancel_futures=True)
            try:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.channel.send(WorkerStopped(self.id, self.interrupted, round(peak, 1)))
            except (OSError, EOFError, BrokenPipeError):
                pass
        return self.interrupted

    def interrupt(self) -> None:
        self.interrupted = True
        self._stop.set()

    def deliver(self, message: object) -> None:
        if isinstance(message, Assign):
            self.asking = False
            if self._stop.is_set():
                return  # stopping: the batch stays unfinished and is fetched on resume
            task = asyncio.get_running_loop().create_task(
                self._run_batch(message.batch, message.give_up))
            self.tasks[message.batch.key] = task
        elif isinstance(message, Budget):
            self._slot(message.server_name).update(
                message.rate, message.connections, message.paused_until, message.dead,
                message.give_up, message.probing)
        elif isinstance(message, NoWorkYet):
            pass  # the scheduler keeps us as hungry and assigns when it can
        elif isinstance(message, Stop):
            self._stop.set()

    async def _tick_forever(self) -> None:
        last_report = 0.0
        while True:
            if self._wants_more_work():
                self.asking = True
                self.channel.send(WantWork(self.id))
            now = time.monotonic()
            if now - last_report >= REPORT_SECONDS:
                self._send_report()
                last_report = now
            for writer in list(self.budget.writers):
                try:
                    writer.flush_if_old()
                except OutOfSpace as exc:
                    self._disk_full(exc)
            await asyncio.sleep(TICK_SECONDS)

    def _wants_more_work(self) -> bool:
        if self.asking or self._stop.is_set():
            return False
        if not self.tasks:
            return True
        # More batches only while the decode threads keep up and nothing waits on the network
        # for lack of batches: a backlog of decodes means this worker's cores are full.
        return len(self.tasks) < self.settings.cluster.batches_per_worker \
            and self.decoding < self.decode_threads

    async def _wait_for_decode_room(self) -> None:
        while self.decoding >= self.backlog_limit:
            self._decode_room.clear()
            await self._decode_room.wait()

    def _send_report(self, urgent: bool = False) -> None:
        for name, urls in self.failing.items():
            self.news.setdefault(name, ServerNews()).failures = len(urls)
        if not self.news and not self.bytes:
            return
        batches = {key: writer.rows_added for key, writer in self.writers.items()}
        for key in [key for key in self.writers if key not in self.tasks]:
            del self.writers[key]  # finished or stopped: these were its last counts
        report = Report(self.id, self.news, self.bytes, urgent, batches)
        self.news, self.bytes = {}, 0
        try:
            self.channel.send(report)
        except (OSError, EOFError, BrokenPipeError):
            self.interrupt()

    def _slot(self, server: str) -> ServerSlot:
        if server not in self.slots:
            self.slots[server] = ServerSlot(server, self.settings.politeness.default_rate_limit,
                                            self.settings.politeness.max_connections_per_server)
        return self.slots[server]

    def _news(self, server: str) -> ServerNews:
        return self.news.setdefault(server, ServerNews())

    # --- batches ------------------------------------------------------------------------------

    async def _run_batch(self, batch: BatchRef, give_up: Failure | None) -> None:
        files = self.layout.batch_files(batch.server_name, batch.partition_id)
        writer: BatchWriter | None = None
        try:
            # Chunk names say which worker wrote them: successes-w{worker}.{random}-{seq}.parquet
            writer = BatchWriter(files, self.settings.prep.keep_columns, self.budget,
                                 f"w{self.id}.{secrets.token_hex(3)}",
                                 self.settings.store.output_format)
            self.writers[batch.key] = writer
            remove_stale_temporaries(files)
            done = committed_uuids(files)
            earlier = chunk_row_counts(files)  # committed by an earlier run: not this one's
            rows = [row for path in self.layout.prepared_chunks(batch.server_name,
                                                                batch.partition_id)
                    for row in pq.read_table(path).to_pylist() if row["uuid"] not in done]
            rows = await self._reuse_earlier(rows, batch.server_name, writer)
            if give_up is not None:
                for row in rows:
                    self._give_up_row(row, batch.server_name, writer, 0, give_up)
            else:
                rows = self._robots_filter(rows, batch.server_name, writer)
                frontier = Frontier.of(rows)
                slot = self._slot(batch.server_name)
                permitted = self._permitted(slot.name)
                consumers = min(len(rows), self.settings.politeness.max_connections_per_server)
                await asyncio.gather(*(self._consume(frontier, slot, writer, permitted)
                                       for _ in range(consumers)))
            counts = writer.complete(batch.rows)
            self.channel.send(BatchFinished(self.id, batch, counts["successes"] - earlier[0],
                                            counts["errors"] - earlier[1]))
        except asyncio.CancelledError:
            self._close(writer)  # commit what is finished; the rest is fetched on resume
            raise
        except OutOfSpace as exc:
            self._disk_full(exc)
        except Exception:
            log.exception("worker %s: batch %s failed", self.id, batch.key)
            self.interrupt()  # first: the batch is released even if closing fails too
            self._close(writer)
            raise
        finally:
            self.tasks.pop(batch.key, None)
            if not any(key[0] == batch.server_name for key in self.tasks):
                self.failing.pop(batch.server_name, None)  # no stale streak once we leave

    def _close(self, writer: BatchWriter | None) -> None:
        """Commit a batch's finished rows on the way out; a full disk stops the worker
        instead of raising again."""
        if writer is None:
            return
        try:
            writer.close()
        except OutOfSpace as exc:
            self._disk_full(exc)

    def _disk_full(self, exc: OutOfSpace) -> None:
        """No room for results: write nothing more (rows not yet written are fetched by the
        next run), tell the scheduler, which stops every worker, and stop."""
        for writer in list(self.budget.writers):
            writer.discard()
        if self.out_of_space is None:
            self.out_of_space = exc
            log.warning("worker %s: out of space in %s; stopping", self.id, exc.folder)
            try:
                self.channel.send(DiskFull(self.id, str(exc.folder), exc.needed, exc.free,
                                           exc.rows_in_write))
            except (OSError, EOFError, BrokenPipeError):
                pass
        self._stop.set()

    async def _reuse_earlier(self, rows: list[dict[str, Any]], server: str,
                             writer: BatchWriter) -> list[dict[str, Any]]:
        """Write the rows an earlier download already holds (`--previous`), without a request;
        returns the rows left to fetch."""
        to_fetch, reused = [], []
        for row in rows:
            earlier = {name: row.pop(name, None) for name in REUSE_NAMES}
            if earlier["reuse_error_code"]:
                writer.add_error(error_row(row, earlier["reuse_error_code"],
                                           earlier["reuse_error_msg"] or "",
                                           0, earlier["reuse_http_status"]))
                self._news(server).errors += 1
            elif earlier["reuse_from"]:
                reused.append((row, earlier["reuse_from"], earlier["reuse_uuid"]))
            else:
                to_fetch.append(row)
        if not reused:
            return to_fetch
        copy = self.settings.prep.previous_mode == "copy"
        wanted: dict[str, set[str]] = {}
        for _, folder, uuid in reused:
            wanted.setdefault(folder, set()).add(uuid)
        stored = await asyncio.get_running_loop().run_in_executor(
            self.pool, _read_earlier, wanted, copy)
        for row, folder, uuid in reused:
            before = stored.get((folder, uuid))
            if before is None:  # the earlier download lost it since prep: fetch it after all
                to_fetch.append(row)
                continue
            writer.add_success({
                **row, **{name: before[name] for name in REUSED_COLUMNS},
                "image": before["image"] if copy else None,
                "linked_from": None if copy else folder, "linked_uuid": None if copy else uuid,
            })
            self._news(server).successes += 1
        return to_fetch

    def _robots(self, server: str) -> RobotsFile | None:
        """The server's robots.txt, as the coordinator fetched it before releasing the server."""
        if not self.settings.politeness.respect_robots:
            return None
        if server not in self.robots:
            self.robots[server] = load_robots(self.layout, server)
            if self.robots[server] is None:
                log.warning("worker %s: no robots.txt on record for %s", self.id, server)
        return self.robots[server]

    def _robots_filter(self, rows: list[dict[str, Any]], server: str,
                       writer: BatchWriter) -> list[dict[str, Any]]:
        """The rows robots.txt allows; the others become errors, never requested."""
        robots = self._robots(server) if rows else None
        if robots is None:
            return rows
        allowed = []
        for row in rows:
            if robots.allows(row["identifier"]):
                allowed.append(row)
            else:
                writer.add_error(error_row(row, ErrorCode.ROBOTS_DISALLOWED,
                                           f"{robots.url} disallows it for {PRODUCT_TOKEN}", 0))
                self._news(server).errors += 1
        return allowed

    def _permitted(self, server: str) -> Callable[[str], bool] | None:
        """For redirects: may this URL be fetched, as far as its server's robots.txt says?"""
        robots = self._robots(server)
        if robots is None:
            return None
        return robots.permits_redirect(server)

    def _opt_out_seen(self, slot: ServerSlot) -> None:
        """Count an opted-out image, and say so at once: the scheduler decides whether the
        whole server opted out."""
        news = self._news(slot.name)
        news.opted_out += 1
        news.errors += 1
        self._send_report(urgent=True)

    def _give_up_row(self, row: dict[str, Any], server: str, writer: BatchWriter,
                     attempts: int, reason: Failure = SERVER_KEPT_FAILING) -> None:
        writer.add_error(error_row(row, reason.code, reason.message, attempts))
        self._news(server).errors += 1

    async def _consume(self, frontier: Frontier, slot: ServerSlot, writer: BatchWriter,
                       permitted: Callable[[str], bool] | None) -> None:
        while True:
            await self._wait_for_decode_room()
            item = await frontier.take(slot)
            if item is None:
                return
            outcome = await self._request(item, slot, permitted)
            if outcome is None:
                frontier.retry_later(item, self._retry_delay(item))
                continue
            try:
                await self._record(item, outcome, slot, writer)
            finally:
                frontier.done()

    def _retry_delay(self, item: Pending) -> float:
        # A throttled URL waits in the slot's pause, not here.
        return self.retry.delay(item.failures) if item.failures and not item.throttles else 0.0

    async def _request(self, item: Pending, slot: ServerSlot,
                       permitted: Callable[[str], bool] | None) -> Body | Failure | None:
        """One attempt at a row's URL: its outcome, or None when it should be retried later."""
        try:
            await slot.acquire()
        except ServerDead:
            return Failure(ErrorCode.SERVER_UNAVAILABLE, "server given up")
        item.attempts += 1
        started = time.monotonic()
        try:
            outcome = await self.client.get(item.row["identifier"], pace=slot.pace,
                                            permitted=permitted)
        except ServerDead:
            outcome = Failure(ErrorCode.SERVER_UNAVAILABLE, "server given up")
        finally:
            slot.release()
        signal = self._observe(slot, outcome, time.monotonic() - started, item)
        if isinstance(outcome, Body):
            return outcome
        if signal is Signal.THROTTLED:
            item.throttles += 1
            return None if item.throttles < self.settings.politeness.max_throttles else outcome
        item.throttles = 0
        item.failures += 1
        # A server that has not answered once here gets fewer tries per URL: it may be down.
        attempts = self.retry.max_attempts if slot.name in self.answered else \
            min(self.retry.max_attempts, ATTEMPTS_ON_A_SILENT_SERVER)
        if outcome.code != ErrorCode.SERVER_UNAVAILABLE and \
                self.retry.should_retry(outcome.code, item.failures, attempts):
            return None
        return outcome

    async def _record(self, item: Pending, outcome: Body | Failure, slot: ServerSlot,
                      writer: BatchWriter) -> None:
        """Write a row's final outcome: an error, or the image once decoded."""
        row, attempts, settings = item.row, item.attempts, self.settings
        if isinstance(outcome, Failure):
            if outcome.code == ErrorCode.SERVER_UNAVAILABLE:
                self._give_up_row(row, slot.name, writer, attempts,
                                  slot.give_up or SERVER_KEPT_FAILING)
                return
            writer.add_error(error_row(row, outcome.code, outcome.message, attempts,
                                       outcome.http_status))
            self._news(slot.name).errors += 1
            return
        tag = opted_out(outcome.headers, settings.politeness.opt_out_directives)
        if tag is not None and not settings.politeness.ignore_opt_out:
            self.client.budget.release(outcome.reserved)
            writer.add_error(error_row(row, ErrorCode.OPTED_OUT, f"X-Robots-Tag: {tag}",
                                       attempts, outcome.status))
            self._opt_out_seen(slot)
            return
        news = self._news(slot.name)
        if tag is None:
            news.opt_in += 1
        else:
            news.opt_outs_ignored += 1
        self.decoding += 1
        try:
            image = await self._decode(outcome.data)
        finally:
            self.decoding -= 1
            self._decode_room.set()
            self.client.budget.release(outcome.reserved)
        # News objects are handed over at every report: look it up after the await.
        if isinstance(image, Failure):
            writer.add_error(error_row(row, image.code, image.message, attempts, outcome.status))
            self._news(slot.name).errors += 1
        else:
            writer.add_success(success_row(row, image))
            self._news(slot.name).successes += 1

    async def _decode(self, body: bytes) -> StoredImage | Failure:
        """Decode off the loop once the memory the image will hold fits in the worker's budget.

        The header is read here, on the loop (tens of microseconds), so that waiting for room
        costs no decode thread."""
        settings = self.settings
        opened = open_image(body, settings.images.image_size, settings.images.output_image_format,
                            settings.images.max_image_pixels)
        if isinstance(opened, Failure):
            return opened
        reservation = self.pixels.reserve(opened.cost)
        try:
            await reservation.granted.wait()
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, finish_image, opened, settings.images.image_quality)
        finally:
            self.pixels.release(reservation)

    def _observe(self, slot: ServerSlot, outcome: Body | Failure, seconds: float,
                 item: Pending) -> Signal:
        """Count what an answer says about the server; honour a pause it asked for at once."""
        news = self._news(slot.name)
        if isinstance(outcome, Body):
            self.bytes += len(outcome.data)
            signal = signal_of(None, None)
        else:
            signal = signal_of(outcome.code, outcome.retry_after)
        advertised = advertised_rate(outcome.headers)
        news_of_limit = advertised is not None and self.advertised.get(slot.name) != advertised
        if advertised is not None:
            news.advertised = self.advertised[slot.name] = advertised
        pause = quota_pause(outcome.headers)
        if signal is Signal.THROTTLED:
            news.throttled += 1
            retry_after = outcome.retry_after  # type: ignore[union-attr]
            pause = max(pause or 0.0, DEFAULT_THROTTLE_PAUSE if retry_after is None
                        else retry_after)
        if pause is not None:
            news.retry_after_until = max(news.retry_after_until, slot.pause(pause))
        failing = 0
        if signal is Signal.FAILED:
            news.failed += 1
            news.failed_urls += item.attempts == 1
            urls = self.failing.setdefault(slot.name, set())
            urls.add(item.row["identifier"])
            failing = len(urls)
        elif signal is Signal.ANSWERED:
            self.failing.pop(slot.name, None)
            self.answered.add(slot.name)
            news.answered += 1
            news.latency_sum += seconds
            news.latency_count += 1
        if signal is Signal.THROTTLED or pause is not None or news_of_limit or \
                failing >= self.settings.politeness.breaker_failures:
            self._send_report(urgent=True)
        return signal


# What a reused row takes from the earlier download's row (the rest is this input's).
REUSED_COLUMNS = ("original_size", "resized_size", "hashsum_original", "hashsum_resized",
                  "image_format")


def _read_earlier(wanted: dict[str, set[str]], with_images: bool,
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """(earlier batch folder, uuid) -> that success row; its image only when copying."""
    found = {}
    for folder, uuids in wanted.items():
        rows = read_successes(Path(folder), uuids, follow_links=False, with_images=with_images)
        found.update({(folder, row["uuid"]): row for row in rows})
    return found


def run_worker(worker_id: int, settings: Settings, channel: Channel) -> bool:
    tune_allocator()
    return asyncio.run(Worker(worker_id, settings, channel).run())
