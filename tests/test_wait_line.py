"""The decode backlog's gate (fetch/wait_line.py): a freed place wakes one waiting consumer,
not all of them, and room is handed out in the order the consumers came."""

from __future__ import annotations

import asyncio

from conftest import cancel, settled
from distributed_downloader.fetch.wait_line import Gate


class Backlog:
    """Bodies being decoded against a limit; counts how often a consumer looked for room."""

    def __init__(self, decoding: int, limit: int) -> None:
        self.decoding = decoding
        self.limit = limit
        self.looks = 0
        self.gate = Gate(self.has_room)

    def has_room(self) -> bool:
        self.looks += 1
        return self.decoding < self.limit

    async def consumer(self, name: int, passed: list[int], takes_room: bool) -> None:
        await self.gate.enter()
        passed.append(name)
        if takes_room:
            self.decoding += 1  # its body went to a decode thread

    def decoded(self) -> None:
        self.decoding -= 1
        self.gate.room_freed()


def test_a_decoded_image_lets_one_consumer_in_and_wakes_no_other() -> None:
    """A backlog that stays full: each consumer let in sends a body to decode at once."""
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        waiting = [asyncio.create_task(backlog.consumer(n, passed, True)) for n in range(500)]
        await settled()
        backlog.looks = 0
        backlog.decoded()
        await settled()
        assert passed == [0]
        assert backlog.looks <= 3  # the one let in (before and after), and the next: no room
        backlog.decoded()  # the next image decoded: the consumer first in line goes next
        await settled()
        assert passed == [0, 1]
        await cancel(waiting)

    asyncio.run(scenario())


def test_room_freed_while_nothing_takes_it_lets_every_consumer_through_in_order() -> None:
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        waiting = [asyncio.create_task(backlog.consumer(n, passed, False)) for n in range(50)]
        await settled()
        backlog.decoded()
        await settled()
        assert passed == list(range(50))
        assert all(task.done() for task in waiting) and len(backlog.gate.line) == 0

    asyncio.run(scenario())


def test_room_for_three_is_taken_by_three_in_the_order_they_came() -> None:
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        waiting = [asyncio.create_task(backlog.consumer(n, passed, True)) for n in range(10)]
        await settled()
        backlog.decoding -= 2  # two decoded at once, one wake between them ...
        backlog.decoded()  # ... and a third: the turn is passed on while room remains
        await settled()
        assert passed == [0, 1, 2] and backlog.decoding == 8
        await cancel(waiting)

    asyncio.run(scenario())


def test_a_woken_consumer_cancelled_before_it_runs_passes_its_turn_on() -> None:
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        first, second = (asyncio.create_task(backlog.consumer(n, passed, True)) for n in range(2))
        await settled()
        backlog.decoded()  # wakes the first ...
        first.cancel()  # ... whose batch stops before it could go in
        await settled()
        assert passed == [1] and first.cancelled()

    asyncio.run(scenario())


def test_a_consumer_cancelled_while_asleep_leaves_the_line_and_the_next_goes_in() -> None:
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        first, second = (asyncio.create_task(backlog.consumer(n, passed, True)) for n in range(2))
        await settled()
        first.cancel()  # its batch stops while it sleeps
        await settled()
        assert first.cancelled() and len(backlog.gate.line) == 1
        backlog.decoded()
        await settled()
        assert passed == [1] and len(backlog.gate.line) == 0

    asyncio.run(scenario())


def test_a_woken_consumer_that_finds_the_room_taken_goes_in_first_at_the_next_image() -> None:
    async def scenario() -> None:
        backlog, passed = Backlog(decoding=8, limit=8), []
        waiting = [asyncio.create_task(backlog.consumer(n, passed, True)) for n in range(3)]
        await settled()
        backlog.decoded()  # wakes consumer 0 ...
        backlog.decoding += 1  # ... but a first contact's body takes the place before it runs
        await settled()
        assert passed == [] and len(backlog.gate.line) == 3 and backlog.gate.line.asleep == 3
        backlog.decoded()
        await settled()
        assert passed == [0]
        await cancel(waiting)
        assert len(backlog.gate.line) == 0

    asyncio.run(scenario())
