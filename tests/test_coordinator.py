"""The coordinator loop over a pretend transport: a lost worker's batch goes to another and its
rows count once, a stop tells every worker and hands out nothing more, the grace period ends,
and a run whose every worker died says so (the real transports: test_fetch_stop, test_cluster).
"""

from __future__ import annotations

import pytest

from distributed_downloader.config import Settings
from distributed_downloader.executors.coordinator import Coordinator, Departure, StopRequest
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    Report,
    Stop,
    WantWork,
    WorkerStopped,
)
from distributed_downloader.schedule import Scheduler
from test_schedule import server

ROWS = 10  # per batch


class PretendWorkers:
    """Workers that finish a batch at the poll after they get it and stop when told, except
    those in `stuck`: they report part of their batch, then die at poll `stuck[worker]`; and
    those in `deaf`: they never stop."""

    def __init__(self, workers: range, stuck: dict[int, int] | None = None,
                 deaf: frozenset[int] = frozenset()) -> None:
        self.alive = set(workers)
        self.stuck = stuck or {}
        self.deaf = deaf
        self.outbox: list[tuple[int, object]] = [(w, WantWork(w)) for w in workers]
        self.sent: list[tuple[int, object]] = []
        self.polls = 0
        self.abandoned = False

    def send(self, worker: int, message: object) -> None:
        if worker not in self.alive:
            return
        self.sent.append((worker, message))
        if isinstance(message, Assign):
            batch = message.batch
            if worker in self.stuck:
                self.outbox.append((worker, Report(worker, batches={batch.key: (3, 0)})))
                return
            self.outbox += [(worker, Report(worker, batches={batch.key: (ROWS, 0)})),
                            (worker, BatchFinished(worker, batch, ROWS, 0)),
                            (worker, WantWork(worker))]
        elif isinstance(message, Stop) and worker not in self.deaf:
            self.outbox.append((worker, WorkerStopped(worker, interrupted=False)))

    def poll(self, timeout: float) -> tuple[list[object], list[Departure]]:
        self.polls += 1
        killed = [w for w, at in self.stuck.items() if at == self.polls and w in self.alive]
        messages = [m for w, m in self.outbox if w not in killed]
        self.outbox = []
        stopped = [m.worker for m in messages if isinstance(m, WorkerStopped)]
        self.alive -= {*killed, *stopped}
        return messages, [Departure(w, -9) for w in killed] + [Departure(w) for w in stopped]

    def running(self) -> bool:
        return bool(self.alive) and not self.abandoned

    def abandon(self) -> None:
        self.abandoned = True


def run(workers: PretendWorkers, batches: int, stop: bool = False,
        grace: float = 60.0) -> tuple[Scheduler, bool]:
    scheduler = Scheduler([server("s", batches, rate=100, rows=ROWS)], Settings(),
                          sorted(workers.alive), now=0)
    request = StopRequest()
    request.asked = stop
    interrupted = Coordinator(scheduler, workers, lambda s: None, request, grace).run()
    return scheduler, interrupted


def test_a_worker_killed_mid_batch_has_its_batch_fetched_by_another_and_counted_once() -> None:
    workers = PretendWorkers(range(2), stuck={0: 3})
    scheduler, interrupted = run(workers, batches=4)
    assert not interrupted and scheduler.finished
    assert scheduler.successes == 4 * ROWS  # not + the 3 rows the dead worker reported
    given_to_0 = [m.batch.key for w, m in workers.sent if w == 0 and isinstance(m, Assign)]
    given_to_1 = [m.batch.key for w, m in workers.sent if w == 1 and isinstance(m, Assign)]
    assert len(given_to_0) == 1 and given_to_0[0] in given_to_1


def test_a_stop_tells_every_worker_and_hands_out_nothing() -> None:
    workers = PretendWorkers(range(3))
    scheduler, interrupted = run(workers, batches=5, stop=True)
    assert interrupted and not scheduler.finished
    assert not [m for _, m in workers.sent if isinstance(m, Assign)]
    assert sorted(w for w, m in workers.sent if isinstance(m, Stop)) == [0, 1, 2]


def test_workers_that_do_not_stop_are_abandoned_after_the_grace_period() -> None:
    workers = PretendWorkers(range(2), deaf=frozenset({1}))
    _, interrupted = run(workers, batches=2, stop=True, grace=0.0)
    assert interrupted and workers.abandoned and 1 in workers.alive


def test_a_run_whose_every_worker_died_is_an_error() -> None:
    workers = PretendWorkers(range(2), stuck={0: 2, 1: 2})
    with pytest.raises(RuntimeError, match="every worker died"):
        run(workers, batches=4)
