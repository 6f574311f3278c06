"""The worker's body budget: requests are admitted only while their answers' bodies fit, and a
body whose Content-Length is more than its request expected goes before any new request."""

from __future__ import annotations

import asyncio

from conftest import cancel, settled
from distributed_downloader.fetch.client import BodyBudget, Claim

KIB = 1 << 10


def test_requests_in_flight_are_bounded_by_what_their_bodies_are_expected_to_take() -> None:
    budget = BodyBudget(1024 * KIB)  # room for four requests of the first 256 KiB expected
    admitted = [budget.try_admit() for _ in range(5)]
    assert admitted[:4] == [256 * KIB] * 4 and admitted[4] is None
    assert budget.used == 1024 * KIB


def test_a_request_expects_the_mean_body_but_at_least_a_read_buffer() -> None:
    async def scenario() -> None:
        budget = BodyBudget(10 << 20)
        for _ in range(200):  # 1 KiB thumbnails
            claim = Claim(budget.try_admit() or 0)
            await budget.settle(claim, KIB)
            assert claim.amount == KIB
            budget.release(claim.amount)
        assert budget.used == 0
        assert budget.try_admit() == BodyBudget.LEAST_EXPECTED

    asyncio.run(scenario())


def test_a_body_larger_than_expected_waits_for_room_before_new_requests() -> None:
    async def scenario() -> None:
        budget = BodyBudget(1024 * KIB)
        held = Claim(await budget.admit())
        await budget.settle(held, 600 * KIB)  # a body read, waiting to be decoded
        big = Claim(await budget.admit())  # 256 KiB expected: fits
        growing = asyncio.create_task(budget.settle(big, 700 * KIB))
        await asyncio.sleep(0)
        assert not growing.done() and big.amount == 0  # it gave back what it held, and waits
        request = asyncio.create_task(budget.admit())
        await asyncio.sleep(0)
        assert not request.done()  # room now, but the waiting body goes first
        budget.release(held.amount)
        await growing
        assert big.amount == 700 * KIB
        expected = await request  # then the request, once the body had its room
        assert budget.used == 700 * KIB + expected <= budget.limit

    asyncio.run(scenario())


def test_a_body_larger_than_the_whole_budget_goes_through_alone() -> None:
    async def scenario() -> None:
        budget = BodyBudget(100 * KIB)
        claim = Claim()
        await asyncio.wait_for(budget.settle(claim, 10 << 20), 1)
        assert claim.amount == 10 << 20
        budget.release(claim.amount)
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_first_contacts_request_goes_ahead_of_the_others_for_room() -> None:
    """Its answers raise its server's pace: they must not queue behind the bodies of servers
    already at full speed, waiting to be decoded."""
    async def scenario() -> None:
        budget = BodyBudget(512 * KIB)  # room for two requests
        held = [await budget.admit(), await budget.admit()]
        others = [asyncio.create_task(budget.admit()) for _ in range(3)]
        await asyncio.sleep(0)
        first_contact = asyncio.create_task(budget.admit(ahead=True))
        await asyncio.sleep(0)
        budget.release(held.pop())  # room for one: the first contact's, though it came last
        await asyncio.sleep(0)
        assert first_contact.done() and not any(task.done() for task in others)
        budget.release(held.pop())  # then the others, as before
        await asyncio.sleep(0)
        assert sum(task.done() for task in others) == 1
        await cancel(others)

    asyncio.run(scenario())


class CountingBudget(BodyBudget):
    """Counts the tries for room: each is a waiter woken (or a request arriving)."""

    tries = 0

    def try_admit(self, ahead: bool = False) -> int | None:
        self.tries += 1
        return super().try_admit(ahead)


def test_a_freed_place_wakes_one_waiting_request_not_all_of_them() -> None:
    async def scenario() -> None:
        budget = CountingBudget(1024 * KIB)  # four requests of 256 KiB
        held = [budget.try_admit() for _ in range(4)]
        waiting = [asyncio.create_task(budget.admit()) for _ in range(500)]
        await settled()
        budget.tries = 0
        budget.release(held.pop())
        await settled()
        assert [task.done() for task in waiting].count(True) == 1 and waiting[0].done()
        assert budget.tries <= 2  # the one admitted, and the next finding no room
        await cancel(waiting)

    asyncio.run(scenario())


def test_room_for_several_is_taken_by_as_many_waiters_in_order() -> None:
    async def scenario() -> None:
        budget = BodyBudget(1024 * KIB)
        held = [budget.try_admit() for _ in range(4)]
        waiting = [asyncio.create_task(budget.admit()) for _ in range(10)]
        await settled()
        budget.used -= sum(held[:3])  # three places at once (as a body's whole reservation)
        budget.release(held[3])  # ... and a fourth: one wake, passed on while room remains
        await settled()
        assert [task.done() for task in waiting] == [True] * 4 + [False] * 6
        assert budget.used == 1024 * KIB
        await cancel(waiting)

    asyncio.run(scenario())


def test_a_woken_waiter_cancelled_before_it_runs_passes_its_turn_on() -> None:
    async def scenario() -> None:
        budget = BodyBudget(1024 * KIB)
        held = [budget.try_admit() for _ in range(4)]
        first, second = (asyncio.create_task(budget.admit()) for _ in range(2))
        await settled()
        budget.release(held.pop())  # wakes the first ...
        first.cancel()  # ... which goes before it could take the room
        await settled()
        assert second.done() and budget.used == 1024 * KIB
        assert first.cancelled()

    asyncio.run(scenario())


def test_a_waiting_body_too_large_for_the_room_freed_does_not_hold_the_others_forever() -> None:
    async def scenario() -> None:
        budget = BodyBudget(1024 * KIB)
        held = [Claim(budget.try_admit() or 0) for _ in range(4)]
        large, small = Claim(), Claim()
        waiting_large = asyncio.create_task(budget.settle(large, 900 * KIB))
        waiting_small = asyncio.create_task(budget.settle(small, 200 * KIB))
        request = asyncio.create_task(budget.admit())
        await settled()
        assert not (waiting_large.done() or waiting_small.done() or request.done())
        for claim in held:  # bodies decoded one after the other
            budget.release(claim.amount)
            await settled()
        await asyncio.wait_for(waiting_large, 1)  # in the order they came
        assert large.amount == 900 * KIB and not waiting_small.done()
        budget.release(large.amount)
        await asyncio.wait_for(waiting_small, 1)
        assert small.amount == 200 * KIB
        expected = await asyncio.wait_for(request, 1)  # and the request after the bodies
        assert budget.used == small.amount + expected

    asyncio.run(scenario())
