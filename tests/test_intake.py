"""When a worker takes on another batch (fetch/intake.py), on a simulated clock: before the rows
it holds run out, by the time a first-contacted server needs to warm up, not once its cores
are idle."""

from __future__ import annotations

from distributed_downloader.fetch.intake import Intake, RowsPerSecond

INTAKE = Intake(decode_threads=2, max_batches=256, max_rows=50_000, lead_seconds=4.0)


def test_a_worker_without_batches_always_asks() -> None:
    assert INTAKE.wants_more(batches=0, rows_in_flight=0, rows_left=0, decoding=9,
                             rows_per_second=0.0)


def test_an_idle_decode_thread_asks_for_more() -> None:
    assert INTAKE.wants_more(batches=3, rows_in_flight=60, rows_left=60, decoding=1,
                             rows_per_second=0.0)


def test_busy_cores_ask_only_when_the_rows_on_hand_would_not_last_a_warm_up() -> None:
    busy = {"batches": 40, "rows_in_flight": 840, "decoding": 200}
    # 100 rows/s: 500 rows last 5 s, more than the 4 s a newcomer needs to reach full speed.
    assert not INTAKE.wants_more(rows_left=500, rows_per_second=100.0, **busy)
    assert INTAKE.wants_more(rows_left=399, rows_per_second=100.0, **busy)


def test_the_caps_hold_whatever_the_cores() -> None:
    assert not INTAKE.wants_more(batches=256, rows_in_flight=5000, rows_left=1, decoding=0,
                                 rows_per_second=100.0)
    assert not INTAKE.wants_more(batches=3, rows_in_flight=50_000, rows_left=1, decoding=0,
                                 rows_per_second=100.0)


def test_rows_per_second_over_a_sliding_window() -> None:
    meter = RowsPerSecond(window=3.0)
    assert meter.rate(0.0) == 0.0
    for tick in range(100):  # 50 rows/s for 10 s
        meter.add(tick * 0.1, 5)
    assert abs(meter.rate(9.9) - 50.0) < 2.0
    assert meter.rate(20.0) == 0.0  # nothing finished lately


def test_newcomers_are_taken_on_while_the_old_batches_still_fill_the_cores() -> None:
    """40 small servers of 21 rows each, finished at 100 rows/s with the decode threads busy
    all along: the worker asks for newcomers while 4 s of work are left, so their first contact
    (1 request/s, stepping up each second) overlaps the old ones' full speed. The rule it
    replaces (only an idle decode thread) asked once the rows had run out."""
    meter, rows_left, now, asked_at = RowsPerSecond(3.0), 40 * 21, 0.0, None
    while rows_left > 0:
        now += 0.1
        meter.add(now, 10)
        rows_left -= 10
        if asked_at is None and INTAKE.wants_more(40, 840, rows_left, decoding=8,
                                                  rows_per_second=meter.rate(now)):
            asked_at = now
    assert asked_at is not None and now - asked_at >= INTAKE.lead_seconds - 0.2
