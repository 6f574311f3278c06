"""The worker's budget of decoded pixels: who may decode when, in what order, never stuck."""

from __future__ import annotations

from distributed_downloader.fetch.decode_budget import DecodeBudget


def granted(*reservations) -> list[bool]:
    return [reservation.granted.is_set() for reservation in reservations]


def test_reservations_are_granted_while_they_fit_and_wait_beyond() -> None:
    budget = DecodeBudget(100)
    a, b = budget.reserve(40), budget.reserve(50)
    c = budget.reserve(20)  # 110 > 100
    assert granted(a, b, c) == [True, True, False]
    assert budget.used == 90 and budget.waiting == 1
    budget.release(a)
    assert granted(c) == [True]
    assert budget.used == 70 and budget.waiting == 0


def test_first_come_first_served_a_small_one_does_not_overtake_a_waiting_large_one() -> None:
    budget = DecodeBudget(100)
    held = budget.reserve(60)
    large = budget.reserve(70)
    small = budget.reserve(10)  # would fit now, but the large one asked first
    assert granted(held, large, small) == [True, False, False]
    budget.release(held)
    assert granted(large, small) == [True, True]
    assert budget.used == 80


def test_a_stream_of_small_ones_does_not_starve_a_large_one() -> None:
    budget = DecodeBudget(100)
    smalls = [budget.reserve(30) for _ in range(3)]
    large = budget.reserve(90)
    for _ in range(20):  # small images keep arriving while the large one waits
        smalls.append(budget.reserve(30))
        budget.release(smalls.pop(0))
        if large.granted.is_set():
            break
    assert large.granted.is_set()
    assert budget.used <= budget.limit


def test_one_larger_than_the_budget_is_decoded_alone() -> None:
    budget = DecodeBudget(100)
    small = budget.reserve(10)
    huge = budget.reserve(250)
    after = budget.reserve(1)
    assert granted(small, huge, after) == [True, False, False]
    budget.release(small)
    assert granted(huge, after) == [True, False]  # alone: nothing else while it is held
    assert budget.used == 250
    budget.release(huge)
    assert granted(after) == [True]
    assert budget.used == 1


def test_an_oversized_one_with_nothing_held_is_granted_at_once() -> None:
    budget = DecodeBudget(100)
    assert granted(budget.reserve(10_000)) == [True]


def test_withdrawing_a_waiting_reservation_lets_the_next_in() -> None:
    budget = DecodeBudget(100)
    held = budget.reserve(50)
    blocked = budget.reserve(80)
    behind = budget.reserve(40)
    assert granted(blocked, behind) == [False, False]
    budget.release(blocked)  # its image was cancelled while it waited
    assert granted(held, behind) == [True, True]
    assert budget.used == 90 and budget.waiting == 0
