"""Thread-pool results reach the loop in batches: every waiter gets its own result or error,
and calls that finish while the loop is busy share one wake-up."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from distributed_downloader.fetch.handoff import ResultHandoff


def test_each_waiter_gets_its_result_or_its_error() -> None:
    def work(value: int) -> int:
        if value == 3:
            raise ValueError("three")
        return value * 10

    async def main() -> list:
        handoff = ResultHandoff()
        with ThreadPoolExecutor(3) as pool:
            return await asyncio.gather(*(handoff.run(pool, work, value) for value in range(6)),
                                        return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], ValueError)


def test_results_finished_while_the_loop_is_busy_share_one_wake_up() -> None:
    started = threading.Barrier(5)

    def work(value: int) -> int:
        started.wait()
        return value

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        handoff = ResultHandoff()
        wakes = 0
        deliver = handoff._deliver

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            deliver()

        handoff._deliver = counted  # type: ignore[method-assign]
        with ThreadPoolExecutor(4) as pool:
            waits = [loop.create_task(handoff.run(pool, work, value)) for value in range(4)]
            await asyncio.sleep(0)  # the calls are submitted
            started.wait()  # all four run at once...
            time.sleep(0.2)  # ...and finish while the loop is held here
            results = await asyncio.gather(*waits)
        return results, wakes

    results, wakes = asyncio.run(main())
    assert results == [0, 1, 2, 3]
    assert wakes == 1


def test_cancelling_a_wait_withdraws_a_call_not_yet_started() -> None:
    ran: list[int] = []
    gate = threading.Event()

    def work(value: int) -> int:
        gate.wait(5)
        ran.append(value)
        return value

    async def main() -> None:
        handoff = ResultHandoff()
        with ThreadPoolExecutor(1) as pool:
            first = asyncio.create_task(handoff.run(pool, work, 1))
            second = asyncio.create_task(handoff.run(pool, work, 2))
            await asyncio.sleep(0.05)
            second.cancel()
            await asyncio.sleep(0)
            gate.set()
            assert await first == 1
            with pytest.raises(asyncio.CancelledError):
                await second

    asyncio.run(main())
    assert ran == [1]
