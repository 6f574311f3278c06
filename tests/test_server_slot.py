"""A worker's share of a server: `take_send_time` is `pace` when it would not wait (a request
that waited for body room takes its new send time at once, or gives the room back to pace)."""

from __future__ import annotations

import asyncio
import time

from distributed_downloader.fetch.politeness import ServerSlot


def test_a_send_time_is_taken_at_once_only_when_it_has_come() -> None:
    async def scenario() -> None:
        slot = ServerSlot("a", rate=2.0, connections=1)  # one request every ~0.5 s
        assert slot.take_send_time()  # the first one: due
        assert not slot.take_send_time()  # the next one is ~0.5 s away
        started = time.monotonic()
        await slot.pace()  # it waits for it
        assert time.monotonic() - started >= 0.45
        slot.pause(60)
        await asyncio.sleep(0.55)
        assert not slot.take_send_time()  # due, but the server asked for a pause
        slot.paused_until = 0.0
        assert slot.take_send_time()
        slot.dead = True
        await asyncio.sleep(0.55)
        assert not slot.take_send_time()

    asyncio.run(scenario())
