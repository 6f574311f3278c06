"""A fetch worker: one event loop for the network, a few threads for the images.

Each batch is a chain, read in order in `_run_batch`:

1. request filters (filters.py): rows already committed, reused from `--previous`, disallowed
   by robots.txt: none of them is requested;
2. fetch with retry: each row under its share of the server's budget (politeness.py), failed
   ones again later (frontier.py, retry.py);
3. response checks: opt-out (X-Robots-Tag), then the image, decoded off the loop;
4. sink: the batch's `BatchWriter`, which commits results in chunks.

The worker asks the scheduler for batches while its decode threads keep up, or before the rows
on hand run out (intake.py: a newcomer's first contact is slow), and *reports* what it sees of
each server (news.py); every decision about a server (its rate, pauses, the breaker,
giving it up, an opted-out server) is the scheduler's (`ServerPolicy` in policy.py). The one thing
the worker does at once is honour a pause the server itself asked for (Retry-After), until the
scheduler's word arrives. On SIGINT, SIGTERM or
SIGUSR1 (remembered from its first instruction on: see stop_signals.remember_stop_signals), on the
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
from typing import Any, Protocol

import pyarrow as pa

from distributed_downloader.config import Settings
from distributed_downloader.errors import ErrorCode, Failure, OutOfSpace
from distributed_downloader.stop_signals import STOP_SIGNALS, stop_signalled
from distributed_downloader.fetch.client import Body, BodyBudget, HttpClient
from distributed_downloader.fetch.decode_budget import DecodeBudget
from distributed_downloader.fetch.filters import Filtered, RobotsRules, reuse_earlier, rows_not_done
from distributed_downloader.fetch.frontier import Frontier, Pending
from distributed_downloader.fetch.handoff import ResultHandoff
from distributed_downloader.fetch.intake import Intake, RowsPerSecond
from distributed_downloader.fetch.news import NewsBook
from distributed_downloader.fetch.opt_out import opted_out
from distributed_downloader.fetch.politeness import ServerDead, ServerSlot
from distributed_downloader.fetch.retry import RetryPolicy
from distributed_downloader.fetch.rows import error_row, success_row
from distributed_downloader.fetch.wait_line import Gate
from distributed_downloader.images import StoredImage, finish_image, open_image
from distributed_downloader.policy import SERVER_KEPT_FAILING, Signal
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    BatchRef,
    Budget,
    DiskFull,
    NoWorkYet,
    Report,
    Stop,
    WantWork,
    WorkerStopped,
)
from distributed_downloader.storage import RunLayout
from distributed_downloader.writers import BatchWriter, BufferBudget, remove_stale_temporaries

log = logging.getLogger(__name__)

REPORT_SECONDS = 1.0
TICK_SECONDS = 0.2
# Rows of the batches in flight, at most (a first batch goes whatever its size): their pending
# rows are held in memory, so large batches are taken a few at a time.
MAX_ROWS_IN_FLIGHT = 50_000
# Seconds over which the rows a worker finishes per second are measured (intake.py): a few
# reports' worth, so that one slow second does not make it take on a crowd of servers.
THROUGHPUT_WINDOW = 3.0
# Bodies waiting for a decode thread, per thread: beyond this no new request starts, so a
# fast network cannot pile up bodies in memory faster than the cores decode them.
DECODE_BACKLOG_PER_THREAD = 4
# Allocations from this size up get their own mapping, returned when freed. glibc would raise
# the threshold to the largest block freed (up to 32 MiB), after which decoders' buffers come
# from the heap and their holes stay resident: a mix of large images then peaked at 660 MiB
# instead of 300 (benchmarks/decode_memory.py --scenario mix). Not lower: every mapping is
# fresh pages that the kernel zeroes and faults in, and at 128 KiB each web image's bodies and
# pixel buffers were mappings: 1 ms of system time per light image, 10% of the worker's CPU.
MMAP_THRESHOLD = 2 << 20
# Free memory at the top of the heap kept for the next images rather than given back at once
# (fixing MMAP_THRESHOLD also fixes this at glibc's 128 KiB, which gave back and faulted in
# again the pages of nearly every image); a bound on what a worker keeps unused.
TRIM_THRESHOLD = 8 << 20
GIVEN_UP = Failure(ErrorCode.SERVER_UNAVAILABLE, "server given up")


class Channel(Protocol):
    """The worker's line to the scheduler (a pipe locally, MPI messages on a cluster)."""

    def send(self, message: object) -> None: ...

    def listen(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None],
               closed: Callable[[], None]) -> None: ...


def tune_allocator() -> None:
    """Few malloc arenas: each decode thread would otherwise keep its own high-water mark; a
    fixed mmap threshold, so that large freed pixel buffers go back to the system at once; and
    a little free heap kept, so that a web image's buffers are reused, not faulted in again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; fixing it stops glibc raising it
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
    # Arrow's own pool keeps freed chunk buffers for reuse; the system's gives them back.
    pa.set_memory_pool(pa.system_memory_pool())


class Worker:
    def __init__(self, worker_id: int, settings: Settings, channel: Channel) -> None:
        self.id = worker_id
        self.settings = settings
        self.layout = RunLayout(settings.paths.run_folder("fetch"))
        self.channel = channel
        self.retry = RetryPolicy.from_settings(settings.politeness)
        self.slots: dict[str, ServerSlot] = {}
        self.book = NewsBook(settings.politeness.breaker_failures)
        self.robots = RobotsRules(self.layout, settings.politeness.respect_robots, worker_id)
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.rows_in_flight = 0  # rows of the batches in `tasks`
        self.writers: dict[tuple[str, int], BatchWriter] = {}  # until their last report
        self.budget = BufferBudget(settings.store.max_output_memory)
        # One thread more than the worker's cores: Pillow releases the GIL while it decodes, so
        # the spare one keeps the cores busy, and a worker left alone with the last batch
        # uses the cores its idle neighbours freed.
        self.decode_threads = settings.cluster.cpu_per_worker + 1
        self.backlog_limit = self.decode_threads * DECODE_BACKLOG_PER_THREAD
        # A first-contacted server reaches its full rate after one report per warm-up step,
        # plus the first: that long before its end, the rows on hand call for newcomers.
        self.intake = Intake(self.decode_threads, settings.cluster.batches_per_worker,
                             MAX_ROWS_IN_FLIGHT,
                             (settings.politeness.warm_up_steps + 1) * REPORT_SECONDS)
        self.finished_rows = RowsPerSecond(THROUGHPUT_WINDOW)
        self.decoding = 0  # bodies handed to the decode threads, not yet back
        # Decoded pixels dwarf the bodies: each image reserves its cost, read from its header.
        self.pixels = DecodeBudget(settings.images.max_decode_memory)
        self._decode_gate = Gate(lambda: self.decoding < self.backlog_limit)
        self.handoff = ResultHandoff()  # decoded images back to the loop, many per wake-up
        self.asking = False  # a WantWork is unanswered, or the scheduler holds us as hungry
        self.interrupted = False
        self.out_of_space: OutOfSpace | None = None  # set: this worker writes nothing more
        self._stop = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> bool:
        """Work until told to stop; True when stopped early (a signal, the scheduler gone)."""
        loop = asyncio.get_running_loop()
        self._catch_stop_signals(loop)
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
            self._say_stopped()
        return self.interrupted

    def _catch_stop_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, self.interrupt)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if stop_signalled():  # while the worker was starting
            self.interrupt()

    def _say_stopped(self) -> None:
        try:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.channel.send(WorkerStopped(self.id, self.interrupted, round(peak, 1)))
        except (OSError, EOFError, BrokenPipeError):
            pass

    def interrupt(self) -> None:
        self.interrupted = True
        self._stop.set()

    def deliver(self, message: object) -> None:
        """Do what the scheduler says: a batch to fetch, a server's new budget, stop."""
        if isinstance(message, Assign):
            self.asking = False
            if self._stop.is_set():
                return  # stopping: the batch stays unfinished and is fetched on resume
            task = asyncio.get_running_loop().create_task(
                self._run_batch(message.batch, message.give_up))
            self.tasks[message.batch.key] = task
            self.rows_in_flight += message.batch.rows
            self._ask_for_work()  # more at once while there is room, not one per tick
        elif isinstance(message, Budget):
            self._slot(message.server_name).update(
                message.rate, message.connections, message.paused_until, message.dead,
                message.give_up, message.probing, message.first_contact)
        elif isinstance(message, NoWorkYet):
            pass  # the scheduler keeps us as hungry and assigns when it can
        elif isinstance(message, Stop):
            self._stop.set()

    async def _tick_forever(self) -> None:
        last_report = 0.0
        while True:
            self._ask_for_work()
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

    def _ask_for_work(self) -> None:
        if self._wants_more_work():
            self.asking = True
            self.channel.send(WantWork(self.id))

    def _wants_more_work(self) -> bool:
        """Another batch while this worker has room now (a decode thread idle) or will run
        short before a newcomer is warm (intake.py), under the caps on batches and rows."""
        if self.asking or self._stop.is_set():
            return False
        return self.intake.wants_more(len(self.tasks), self.rows_in_flight, self._rows_left(),
                                      self.decoding, self.finished_rows.rate(time.monotonic()))

    def _rows_left(self) -> int:
        """Rows of the batches in flight not finished yet (rows committed by an earlier run
        count as left: on a resume the worker asks a little later, never sooner)."""
        finished = sum(sum(self.writers[key].rows_added) for key in self.tasks
                       if key in self.writers)
        return self.rows_in_flight - finished

    def _send_report(self, urgent: bool = False) -> None:
        taken = self.book.hand_over()
        if taken is None:
            return
        batches = {key: writer.rows_added for key, writer in self.writers.items()}
        for key in [key for key in self.writers if key not in self.tasks]:
            del self.writers[key]  # finished or stopped: these were its last counts
        report = Report(self.id, taken[0], taken[1], urgent, batches)
        try:
            self.channel.send(report)
        except (OSError, EOFError, BrokenPipeError):
            self.interrupt()

    def _slot(self, server: str) -> ServerSlot:
        if server not in self.slots:
            self.slots[server] = ServerSlot(server, self.settings.politeness.default_rate_limit,
                                            self.settings.politeness.max_connections_per_server)
        return self.slots[server]

    # --- a batch: request filters -> fetch with retry -> response checks -> sink -------------

    async def _run_batch(self, batch: BatchRef, give_up: Failure | None) -> None:
        writer: BatchWriter | None = None
        try:
            writer = self._open_writer(batch)
            earlier, rows = await self._rows_to_request(batch, writer, give_up is None)
            if give_up is not None:
                for row in rows:
                    self._write_error(writer, batch.server_name,
                                      error_row(row, give_up.code, give_up.message, 0))
            else:
                await self._fetch_rows(rows, batch.server_name, writer)
            self._finish(batch, writer, earlier)
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
            if self.tasks.pop(batch.key, None) is not None:
                self.rows_in_flight -= batch.rows
            if not any(key[0] == batch.server_name for key in self.tasks):
                self.book.left(batch.server_name)

    def _open_writer(self, batch: BatchRef) -> BatchWriter:
        """The batch's sink. Chunk names say which worker wrote them:
        successes-w{worker}.{random}-{seq}.parquet"""
        files = self.layout.batch_files(batch.server_name, batch.partition_id)
        writer = BatchWriter(files, self.settings.prep.keep_columns, self.budget,
                             f"w{self.id}.{secrets.token_hex(3)}",
                             self.settings.store.output_format)
        self.writers[batch.key] = writer
        return writer

    async def _rows_to_request(self, batch: BatchRef, writer: BatchWriter, robots: bool,
                               ) -> tuple[tuple[int, int], list[dict[str, Any]]]:
        """The request filters, in order: already done, reused from `--previous`, robots.txt.
        Also returns the (successes, errors) committed by an earlier run: not this one's."""
        files = self.layout.batch_files(batch.server_name, batch.partition_id)
        remove_stale_temporaries(files)
        done, earlier = writer.take_stock()
        rows = rows_not_done(self.layout, batch, done)
        left = await reuse_earlier(rows, writer, self.settings.prep.previous_mode == "copy",
                                   self.pool)
        self._count(batch.server_name, left)
        if robots:
            left = self.robots.filter(left.rows, batch.server_name, writer)
            self._count(batch.server_name, left)
        return earlier, left.rows

    def _count(self, server: str, filtered: Filtered) -> None:
        if not (filtered.successes or filtered.errors):
            return
        news = self.book.of(server)
        news.successes += filtered.successes
        news.errors += filtered.errors

    async def _fetch_rows(self, rows: list[dict[str, Any]], server: str,
                          writer: BatchWriter) -> None:
        """Fetch every row, each through the checks into the sink, on the server's
        connections of this worker's share."""
        frontier = Frontier.of(rows)
        slot = self._slot(server)
        permitted = self.robots.permitted(slot.name)
        consumers = min(len(rows), self.settings.politeness.max_connections_per_server)
        await asyncio.gather(*(self._consume(frontier, slot, writer, permitted)
                               for _ in range(consumers)))

    def _finish(self, batch: BatchRef, writer: BatchWriter, earlier: tuple[int, int]) -> None:
        counts = writer.complete(batch.rows)
        self.channel.send(BatchFinished(self.id, batch, counts["successes"] - earlier[0],
                                        counts["errors"] - earlier[1]))

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

    # --- fetch with retry ---------------------------------------------------------------------

    async def _consume(self, frontier: Frontier, slot: ServerSlot, writer: BatchWriter,
                       permitted: Callable[[str], bool] | None) -> None:
        while True:
            if not slot.first_contact:  # its few answers raise its pace: they do not queue
                await self._decode_gate.enter()
            item = await frontier.take(slot)
            if item is None:
                return
            await self._attempt(item, frontier, slot, writer, permitted)

    async def _attempt(self, item: Pending, frontier: Frontier, slot: ServerSlot,
                       writer: BatchWriter, permitted: Callable[[str], bool] | None) -> None:
        """One request and, when final, its row written. A step of its own so that the body
        goes with its frame: a consumer waiting for its next row holds none (as a local of
        the loop, each of a worker's hundreds of consumers kept its last body, 170 MiB)."""
        outcome = await self._request(item, slot, permitted)
        if outcome is None:
            frontier.retry_later(item, self.retry.wait_before(item))
            return
        try:
            await self._record(item, outcome, slot, writer)
        finally:
            frontier.done()

    async def _request(self, item: Pending, slot: ServerSlot,
                       permitted: Callable[[str], bool] | None) -> Body | Failure | None:
        """One attempt at a row's URL: its outcome, or None when it should be retried later."""
        try:
            reserved = await self._send_time(slot)
        except ServerDead:
            return GIVEN_UP
        item.attempts += 1
        started = time.monotonic()
        try:
            outcome = await self.client.get(item.row["identifier"], pace=slot.pace,
                                            permitted=permitted, reserved=reserved)
        except ServerDead:
            outcome = GIVEN_UP
        finally:
            slot.release()
        seen = self.book.observe(slot, outcome, time.monotonic() - started, item)
        if seen.urgent:
            self._send_report(urgent=True)
        if isinstance(outcome, Body):
            return outcome
        if self.retry.again(item, outcome.code, seen.signal is Signal.THROTTLED,
                            slot.name in self.book.answered):
            return None
        return outcome

    async def _send_time(self, slot: ServerSlot) -> int:
        """Wait for a connection of the server's share, its next send time and room for the
        answer in the body budget; returns the bytes reserved for it. When room had to be
        awaited, so is a new send time: a request never leaves long after its own, too close
        to the next one's. Nothing is reserved while waiting: a server paused for minutes
        holds no room that other servers' answers need. A first contact's request goes ahead
        of the others for room, then holds it while it waits for its send time (one of its
        slow intervals): its answers raise its pace, so they do not queue behind the bodies
        of servers already at full speed."""
        await slot.acquire()
        budget, reserved = self.client.budget, None
        try:
            while (reserved := budget.try_admit(slot.first_contact)) is None:
                if slot.first_contact:
                    reserved = await budget.admit(ahead=True)
                    await slot.pace()
                    break
                reserved = await budget.admit()  # in line: then it paces again
                if slot.take_send_time():
                    break
                budget.release(reserved)  # its next send time is not yet: wait holding nothing
                reserved = None
                await slot.pace()
        except BaseException:
            if reserved is not None:
                budget.release(reserved)
            slot.release()
            raise
        return reserved

    # --- response checks and the sink ---------------------------------------------------------

    async def _record(self, item: Pending, outcome: Body | Failure, slot: ServerSlot,
                      writer: BatchWriter) -> None:
        """Write a row's final outcome: an error, or the image once its checks pass."""
        row, attempts = item.row, item.attempts
        if isinstance(outcome, Failure):
            if outcome.code == ErrorCode.SERVER_UNAVAILABLE:  # the scheduler gave it up
                reason = slot.give_up or SERVER_KEPT_FAILING
                self._write_error(writer, slot.name,
                                  error_row(row, reason.code, reason.message, attempts))
            else:
                self._write_error(writer, slot.name, error_row(
                    row, outcome.code, outcome.message, attempts, outcome.http_status))
            return
        if self._opted_out(item, outcome, slot.name, writer):
            return
        image = await self._decode_body(outcome)
        if isinstance(image, Failure):
            self._write_error(writer, slot.name, error_row(row, image.code, image.message,
                                                           attempts, outcome.status))
        else:
            writer.add_success(success_row(row, image))
            self.book.of(slot.name).successes += 1
            self.finished_rows.add(time.monotonic())

    def _write_error(self, writer: BatchWriter, server: str, row: dict[str, Any]) -> None:
        writer.add_error(row)
        self.book.of(server).errors += 1
        self.finished_rows.add(time.monotonic())

    def _opted_out(self, item: Pending, body: Body, server: str, writer: BatchWriter) -> bool:
        """The opt-out check: an opted-out image is an error, reported at once (the scheduler
        decides whether the whole server opted out). True when the row is written."""
        tag = opted_out(body.headers, self.settings.politeness.opt_out_directives)
        if tag is not None and not self.settings.politeness.ignore_opt_out:
            self.client.budget.release(body.reserved)
            self._write_error(writer, server, error_row(
                item.row, ErrorCode.OPTED_OUT, f"X-Robots-Tag: {tag}", item.attempts,
                body.status))
            self.book.of(server).opted_out += 1
            self._send_report(urgent=True)
            return True
        news = self.book.of(server)
        if tag is None:
            news.opt_in += 1
        else:
            news.opt_outs_ignored += 1
        return False

    async def _decode_body(self, body: Body) -> StoredImage | Failure:
        """The image check: decode, counted as decode back-pressure; the body's memory is
        given back once decoded."""
        self.decoding += 1
        try:
            return await self._decode(body.data)
        finally:
            self.decoding -= 1
            self._decode_gate.room_freed()
            self.client.budget.release(body.reserved)

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
            return await self.handoff.run(self.pool, finish_image, opened,
                                          settings.images.image_quality)
        finally:
            self.pixels.release(reservation)


def run_worker(worker_id: int, settings: Settings, channel: Channel) -> bool:
    tune_allocator()
    return asyncio.run(Worker(worker_id, settings, channel).run())
