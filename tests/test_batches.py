"""The batch runner behind tools and verify: results in the batches' order, and after a failure
no batch is handed out and the failure is raised (MPI ranks: test_cluster)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from distributed_downloader.executors.batches import Returned, farm_out, run_batches


def square_after(delay_ms: int, value: int) -> int:
    time.sleep(delay_ms / 1000)
    return value * value


def test_results_come_in_the_order_of_the_batches_on_local_processes() -> None:
    arguments = [(30, 1), (0, 2), (10, 3), (0, 4)]
    assert run_batches(square_after, arguments, workers=2) == [1, 4, 9, 16]
    assert run_batches(square_after, []) == []


class OneAtATime:
    """One pretend worker that runs each batch at once."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.back: Returned | None = None

    def free(self) -> bool:
        return self.back is None

    def busy(self) -> bool:
        return self.back is not None

    def start(self, index: int, function: Any, args: tuple) -> None:
        self.started.append(index)
        try:
            self.back = (index, function(*args), None)
        except ValueError as exc:
            self.back = (index, None, exc)

    def wait(self) -> Returned:
        back, self.back = self.back, None
        assert back is not None
        return back


def fail_on_two(value: int) -> int:
    if value == 2:
        raise ValueError("two")
    return value


def test_after_a_failure_no_batch_is_handed_out_and_the_failure_is_raised() -> None:
    workers = OneAtATime()
    with pytest.raises(ValueError, match="two"):
        farm_out(fail_on_two, [(1,), (2,), (3,), (4,)], workers)
    assert workers.started == [0, 1]
