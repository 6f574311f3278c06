"""One writer per run folder: the run lock, `OUT/run.lock`.

Two commands writing into one run folder store rows twice and break every later fetch, so each
command that writes into OUT holds this lock (see cli.py), and a second one is refused in one
line naming the holder. The file says who holds it (command, host, PID, since when) and is
written once; its modification time is the holder's heartbeat, renewed `HEARTBEATS_PER_LEASE`
times per lease. Under MPI, rank 0 holds it for every rank.

A lock is stale when its holder is gone: on this host, as soon as its process is; held from
another host (a shared file system, where PIDs mean nothing), once its heartbeat is older than
its lease. A holder that has missed heartbeats but whose lease still runs is waited for.

Taking over is race-free without deleting anything first: the only successor of the lock whose
token is T is the file `run.lock.T`, created whole and only if absent (a hard link), so one
contender wins. The winner checks that the chain of files from `run.lock` now ends at its own
file, then renames its file onto `run.lock`; a contender whose view was out of date finds the
chain ending elsewhere and withdraws. Releasing deletes `run.lock`: nothing is left in OUT.
"""

from __future__ import annotations

import _thread
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from distributed_downloader.errors import UserError

# The holder renews its heartbeat this often per lease: it may miss a few (a paused VM, a slow
# shared file system) before another host may take its lock.
HEARTBEATS_PER_LEASE = 4
# Rounds of looking and claiming before giving up; only contenders that keep overtaking each
# other use more than two.
CLAIM_ATTEMPTS = 20
WAIT_POLL_SECONDS = 1.0  # while waiting out the lease of a holder that stopped renewing it
LOCK_FILE_BYTES = 512  # about the size of the lock file: what a full disk refused

LIVE, FADING, STALE = "live", "fading", "stale"
State = Literal["live", "fading", "stale"]
log = logging.getLogger(__name__)


def _boot_id() -> str | None:
    """Tells two machines with one host name apart (and one machine before and after a boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> tuple[str, int] | None:
    """The state and start time (clock ticks after boot) of a process on this host, from
    /proc: a zombie is gone, and a reused PID has another start time. None: no such process
    or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Holder:
    """Who holds a run lock: the lock file's content, and its heartbeat (the file's mtime)."""

    command: str
    host: str
    pid: int
    started_at: float
    lease_seconds: float
    token: str
    boot_id: str | None = None
    pid_started: int | None = None
    slurm_job: str | None = None
    heartbeat: float = field(default=0.0, compare=False)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started_at))
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"`{self.command}` on host {self.host} (PID {self.pid}{job}) since {since}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname() and (
            self.boot_id is None or self.boot_id == _boot_id())

    def state(self, now: float | None = None) -> State:
        """live, stale (its holder is gone), or fading: held from another host by a holder
        that missed heartbeats, its lease not yet over."""
        if self.on_this_host():
            if self.pid <= 0:
                return STALE
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return STALE
            except PermissionError:
                pass  # another user's process: alive
            process = _process_start(self.pid)
            if process is not None and (process[0] == "Z" or self.pid_started not in
                                        (None, process[1])):
                return STALE
            return LIVE
        age = (time.time() if now is None else now) - self.heartbeat
        if age > self.lease_seconds:
            return STALE
        return FADING if age > 2 * self.lease_seconds / HEARTBEATS_PER_LEASE else LIVE


class RunLocked(UserError):
    """Another command is writing into the run folder."""

    def __init__(self, root: Path, holder: Holder) -> None:
        self.holder = holder
        super().__init__(f"{root} is being written by {holder.describe()}; one command writes "
                         "into a run folder at a time: wait for it to end (or stop it), then "
                         "run this again")


def _successor(lock: Path, token: str) -> Path:
    return lock.with_name(f"{lock.name}.{token}")


def _read(path: Path) -> tuple[Holder, int] | None:
    """The holder a lock file names and the file's inode; None when there is no such file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
            stat = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    try:
        values = json.loads(data)
        names = Holder.__dataclass_fields__
        holder = Holder(**{k: v for k, v in values.items() if k in names and k != "heartbeat"},
                        heartbeat=stat.st_mtime)
    except (ValueError, TypeError, AttributeError):  # not ours, or damaged: no one holds it
        holder = Holder("?", "?", 0, stat.st_mtime, 0.0,
                        hashlib.sha1(data).hexdigest()[:16], heartbeat=stat.st_mtime)
    return holder, stat.st_ino


def _chain_end(lock: Path) -> tuple[Path, Holder, int] | None:
    """The last file of the chain that starts at `lock`, its holder and inode; None: free."""
    path, read = lock, _read(lock)
    if read is None:
        return None
    for _ in range(1000):  # a chain longer than this is made by hand
        successor = _successor(lock, read[0].token)
        following = _read(successor)
        if following is None:
            return path, read[0], read[1]
        path, read = successor, following
    raise UserError(f"{lock}: too many lock files ({lock.name}.*); remove them by hand "
                    "once no command writes into the run folder")


def current_writer(lock: Path) -> Holder | None:
    """Who holds the lock now (live, or fading and waited for); None when free or stale."""
    end = _chain_end(lock)
    if end is None or end[1].state() == STALE:
        return None
    return end[1]


class RunLock:
    """This process's hold on a run lock: claimed once, renewed by a thread, released once."""

    def __init__(self, lock: Path, command: str, lease_seconds: float) -> None:
        self.path = lock
        process = _process_start(os.getpid())
        job = os.environ.get("SLURM_JOB_ID")
        self.holder = Holder(command, socket.gethostname(), os.getpid(), time.time(),
                             float(lease_seconds), secrets.token_hex(8), _boot_id(),
                             process[1] if process else None, job)
        self.fd: int | None = None
        self.inode = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Claim the lock, taking over a stale one; RunLocked when someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {k: v for k, v in asdict(self.holder).items() if k != "heartbeat"}
        scratch = self.path.with_name(f".{self.path.name}.tmp-{self.holder.token}")
        try:
            with open(scratch, "w") as handle:
                json.dump(content, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:  # a full disk: nothing half-written stays
            scratch.unlink(missing_ok=True)
            raise
        self.fd = os.open(scratch, os.O_RDONLY)
        self.inode = os.fstat(self.fd).st_ino
        try:
            self._claim(scratch)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        finally:
            scratch.unlink()
        self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
        self._thread.start()

    def _claim(self, scratch: Path) -> None:
        for _ in range(CLAIM_ATTEMPTS):
            end = _chain_end(self.path)
            if end is None:
                target = self.path
            else:
                holder = end[1]
                state = holder.state()
                if state == LIVE:
                    raise RunLocked(self.path.parent, holder)
                if state == FADING:
                    self._wait_out(holder)
                    continue
                target = _successor(self.path, holder.token)
            try:
                os.link(scratch, target)  # created whole, and only if absent
            except FileExistsError:
                time.sleep(secrets.randbelow(50) / 1000)  # another contender got there
                continue
            except OSError as exc:
                raise UserError(f"{self.path.parent}: cannot take the run lock: this file "
                                f"system refuses hard links ({exc})") from None
            mine = _chain_end(self.path)
            if mine is None or mine[2] != self.inode:  # our view was out of date
                self._remove_if_mine(target)
                continue
            if target != self.path:
                os.replace(target, self.path)
            self._remove_strays()
            return
        end = _chain_end(self.path)
        if end is not None:
            raise RunLocked(self.path.parent, end[1])
        raise UserError(f"{self.path}: could not take the run lock in {CLAIM_ATTEMPTS} "
                        "attempts (other commands keep starting); try again")

    def _wait_out(self, holder: Holder) -> None:
        """A holder on another host stopped renewing its lease: it is probably gone."""
        left = holder.heartbeat + holder.lease_seconds - time.time()
        log.warning("%s: waiting up to %.0f s for the lease of %s to run out (no heartbeat "
                    "for %.0f s)", self.path.parent, max(left, 0), holder.describe(),
                    time.time() - holder.heartbeat)
        deadline = time.monotonic() + max(left, 0) + WAIT_POLL_SECONDS
        while time.monotonic() < deadline:
            end = _chain_end(self.path)
            if end is None or end[1] != holder or end[1].state() != FADING:
                return
            time.sleep(WAIT_POLL_SECONDS)

    def _remove_if_mine(self, path: Path) -> None:
        try:
            if os.stat(path).st_ino == self.inode:
                path.unlink()
        except FileNotFoundError:
            pass

    def _remove_strays(self) -> None:
        """Successor files left by contenders that died half-way (never our own successor)."""
        keep = _successor(self.path, self.holder.token).name
        for path in self.path.parent.glob(f"{self.path.name}.*"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def still_held(self) -> bool:
        """The lock file is still ours: not taken over by a host that judged our lease over."""
        try:
            if os.stat(self.path).st_ino != self.inode:
                return False
        except FileNotFoundError:
            return False
        return not _successor(self.path, self.holder.token).exists()

    def _renew(self) -> None:
        interval = self.holder.lease_seconds / HEARTBEATS_PER_LEASE
        while not self._stop.wait(interval):
            if not self.still_held():
                log.error("%s: lost the run lock (another host took it over when this "
                          "process did not renew it in time); stopping", self.path.parent)
                _thread.interrupt_main(signal.SIGINT)  # stops like Ctrl-C: chunks flushed
                return
            try:
                os.utime(self.fd)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("%s: could not renew the run lock: %s", self.path.parent, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.fd is None:
            return
        if os.getpid() == self.holder.pid and self.still_held():
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


@contextmanager
def hold_run_lock(root: Path, command: str, lease_seconds: float,
                  on_refused: Callable[[], None] | None = None) -> Iterator[RunLock]:
    """Hold the run lock of the run folder `root` while `command` writes into it.

    Refused: `on_refused` runs, then RunLocked is raised. While held, SIGTERM (when nothing
    else handles it) stops the command like Ctrl-C, so that the lock is released on the way
    out; after `kill -9` it is stale at once on this host and after its lease elsewhere.
    """
    from distributed_downloader.storage import RunLayout, space_errors

    created = not root.exists()
    RunLayout(root).check_writable()  # a file, or read-only: one line, before any work
    lock = RunLock(RunLayout(root).run_lock, command, lease_seconds)
    try:
        with space_errors(root, LOCK_FILE_BYTES):
            lock.acquire()
    except RunLocked:
        if on_refused is not None:
            on_refused()
        raise
    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield lock
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()
        if created:
            try:
                root.rmdir()  # made for the lock, and the command wrote nothing after all
            except OSError:
                pass
