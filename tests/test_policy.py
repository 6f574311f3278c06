"""Rate control on a simulated clock: a server with a hidden limit (429 beyond it, as the farm
and many real hosts count: requests in the last second) and sporadic failures, a client that
paces evenly, reports every second (at once after a throttle) and obeys the policy. Hours of
simulated time run in a second; nothing sleeps."""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from distributed_downloader.config import Settings
from distributed_downloader.testing.farm import peak_in_one_second
from distributed_downloader.policy import (
    CLIMB_STEP,
    LearnedRate,
    RatePolicy,
    ServerPolicy,
    advertised_rate,
    quota_pause,
)
from distributed_downloader.protocol import ServerNews

PACING_MARGIN = 1.05  # as fetch/politeness.py
REPORT_SECONDS, TICK_SECONDS, URGENT_DELAY = 1.0, 0.1, 0.05


@dataclass
class Run:
    """What the server saw: (time, status) of every request, and the rate over time."""

    requests: list[tuple[float, int]] = field(default_factory=list)
    rates: list[tuple[float, float]] = field(default_factory=list)  # (time, rate) at each tick

    def count(self, status: int, start: float = -1e18, end: float = 1e18) -> int:
        return sum(1 for t, s in self.requests if s == status and start <= t < end)

    def total(self, start: float = -1e18, end: float = 1e18) -> int:
        return sum(1 for t, _ in self.requests if start <= t < end)

    def rate_at(self, when: float) -> float:
        """The rate the server sees at `when`: the policy's, paced with its margin."""
        return [rate for t, rate in self.rates if t <= when][-1] / PACING_MARGIN

    def share_of_time_within(self, low: float, high: float, start: float, end: float) -> float:
        inside = [low <= rate / PACING_MARGIN <= high for t, rate in self.rates
                  if start <= t < end]
        return sum(inside) / len(inside)

    def peak(self, start: float, end: float) -> int:
        return peak_in_one_second(t for t, _ in self.requests if start <= t < end)


def simulate(server: ServerPolicy, seconds: float, limit: Callable[[float], float],
             start: float = 0.0, fail_share: float = 0.0, always_fail: bool = False,
             retry_after: float = 1.0, seed: int = 7,
             latency: Callable[[float], float] | None = None,
             client_max: float = float("inf")) -> Run:
    """Drive `server` for `seconds` against a server that allows `limit(t)` requests in any
    1-s window (429 with Retry-After beyond) and fails `fail_share` of the others (503
    without Retry-After); with `latency`, each good answer takes `latency(rate)` seconds at
    the rate the client sends (reported as the workers do); the client sends at most
    `client_max` requests/s whatever its budget (its connections or cores are the limit)."""
    rng = random.Random(seed)
    run = Run()
    accepted: deque[float] = deque()
    news = ServerNews()
    streak = 0
    rate = server.rate  # the worker's copy, updated when a budget reaches it
    paused_until = 0.0
    end = start + seconds
    events: list[tuple[float, int, str]] = [(start, 0, "send"), (start + REPORT_SECONDS, 1,
                                            "report"), (start + TICK_SECONDS, 2, "tick")]
    order = 3
    while events:
        now, _, kind = heapq.heappop(events)
        if now >= end:
            break
        if kind == "send":
            if now < max(paused_until, server.pause_end()):
                heapq.heappush(events, (max(paused_until, server.pause_end()), order, "send"))
                order += 1
                continue
            while accepted and now - accepted[0] >= 1.0:
                accepted.popleft()
            if len(accepted) >= limit(now):
                status = 429
                news.throttled += 1
                paused_until = now + retry_after
                news.retry_after_until = paused_until
                heapq.heappush(events, (now + URGENT_DELAY, order, "report"))
                order += 1
            else:
                accepted.append(now)
                if always_fail or rng.random() < fail_share:
                    status, streak = 503, streak + 1
                    news.failed += 1
                    news.failed_urls += 1  # every simulated request is a URL of its own
                else:
                    status, streak = 200, 0
                    news.answered += 1
                    if latency is not None:
                        seconds_taken = latency(rate)
                        news.latency_sum += seconds_taken
                        news.latency_count += 1
                        news.latency_min = min(news.latency_min, seconds_taken)
            run.requests.append((now, status))
            heapq.heappush(events, (now + PACING_MARGIN / min(rate, client_max), order, "send"))
        elif kind == "report":
            news.failures = streak
            server.observe(0, news, now)
            rate, news = server.rate, ServerNews()
            if now + REPORT_SECONDS < end:
                heapq.heappush(events, (now + REPORT_SECONDS, order, "report"))
        else:
            server.tick(now)
            rate = server.rate
            run.rates.append((now, rate))
            heapq.heappush(events, (now + TICK_SECONDS, order, "tick"))
        order += 1
    return run


def fresh(rate: float = 10.0, run_max: float = 1000.0, **settings: float) -> ServerPolicy:
    """A server's policy with the default settings (or `settings`), at time 0."""
    policy = RatePolicy.from_settings(Settings(**settings).politeness)
    return ServerPolicy.start(policy, rate, run_max, 0.0)


def test_transient_failures_leave_the_rate_alone() -> None:
    """2% of URLs answer 503 without Retry-After, at half the server's limit: for ten minutes
    the rate stays where it was."""
    server = fresh(rate=50, run_max=50)
    run = simulate(server, 600, limit=lambda t: 100, fail_share=0.02)
    assert run.count(503) > 400  # the failures happened
    assert min(rate for _, rate in run.rates) >= 0.9 * 50  # (nominal: no decrease at all)
    assert run.count(429) == 0


def test_converges_below_a_hidden_limit_and_stays_there_for_an_hour() -> None:
    server = fresh(rate=10)
    run = simulate(server, 3720, limit=lambda t: 100, fail_share=0.02)
    assert 80 <= run.rate_at(120) <= 100
    # Above the limit only while a try of the throttled rate lasts (a second or so each).
    assert run.share_of_time_within(80, 100, 120, 3720) >= 0.97
    assert run.count(429, 120, 3720) <= 0.01 * run.total(120, 3720)
    assert run.count(429) <= 0.01 * run.total()
    # The hour was used: at least 80% of what the limit allowed was asked and answered.
    assert run.count(200, 120, 3720) + run.count(503, 120, 3720) >= 0.8 * 100 * 3600


def test_a_limit_that_halves_then_doubles_is_followed() -> None:
    def limit(t: float) -> float:
        return 50 if 600 <= t < 1200 else 100

    server = fresh(rate=10)
    run = simulate(server, 1500, limit=limit, fail_share=0.02)
    assert 80 <= run.rate_at(590) <= 100
    assert 40 <= run.rate_at(630) <= 50  # within half a minute of the halving
    assert run.count(429, 600, 1200) <= 0.01 * run.total(600, 1200) + 10
    assert run.rate_at(1200 + 300) >= 0.8 * 100  # back up within five minutes


def test_a_doubled_limit_is_found_within_five_minutes() -> None:
    server = fresh(rate=10)
    run = simulate(server, 3600 + 300, limit=lambda t: 100 if t < 3600 else 200)
    assert 80 <= run.rate_at(3599) <= 100  # an hour of failed tries first: the longest wait
    assert run.rate_at(3600 + 300) >= 0.8 * 200


def test_a_restart_from_saved_state_sends_no_burst() -> None:
    """A Slurm period ends; the next one starts from what servers.csv kept."""
    first = fresh(rate=10, max_rate_limit=1000)  # rates the user vouched for restart as held
    simulate(first, 900, limit=lambda t: 100, fail_share=0.02)
    learned = first.control.learned()
    assert learned.held is not None and learned.throttled is not None
    start = first.control.start_rate(10.0)

    again = fresh(rate=10, max_rate_limit=1000)
    again.control.started = 930.0
    again.control.remember(learned, start)
    again.control.start_interval(930.0)
    run = simulate(again, 120, limit=lambda t: 100, start=930.0, fail_share=0.02)
    assert run.count(429, 930, 960) == 0
    assert run.peak(930, 960) <= 100
    assert run.rate_at(935) >= 80  # and it starts at speed, not from the default


def test_a_slow_server_met_at_the_default_rate_costs_a_few_429s() -> None:
    """A server allowing 2 requests/s, asked at 10/s: the rate falls at once to what it took."""
    server = fresh(rate=10)
    run = simulate(server, 300, limit=lambda t: 2)
    assert run.count(429, 0, 30) <= 4
    assert 1.6 <= run.rate_at(60) <= 2
    assert run.count(429) <= 0.02 * run.total()


def test_first_contact_starts_as_a_probe_and_reaches_the_default_in_seconds() -> None:
    """A server nothing is known of: its first requests at first_contact_rate (as profile's
    probe), the rate doubling with each good answer, at the default within a few seconds."""
    server = fresh(rate=10)
    server.control.first_contact()
    assert server.rate == 1.0
    run = simulate(server, 60, limit=lambda t: 1000)
    assert run.total(0, 1.0) <= 2  # the first second is a probe's
    assert run.rate_at(5) >= 10 / PACING_MARGIN - 1e-9  # then the default, soon
    assert run.count(429) == 0


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7])
def test_first_contact_with_a_slow_server_meets_its_limit_gently(limit: int) -> None:
    """A server allowing a few requests/s: the careful start never bursts above twice its
    limit, costs a few 429s, and settles just below the limit."""
    server = fresh(rate=10)
    server.control.first_contact()
    run = simulate(server, 300, limit=lambda t: limit)
    assert run.peak(0, 10) <= 2 * limit
    assert run.count(429, 0, 10) <= 3
    assert run.count(429) <= max(6, 0.02 * run.total())  # five minutes: tries of the limit too
    assert 0.85 * limit <= run.rate_at(200) <= limit


def test_first_contact_reaches_a_high_default_in_a_few_reports() -> None:
    """Told servers take 1000/s, a fresh one is still met at 1/s, but the rate reaches 1000 in
    three reports of good answers, not ten doublings."""
    server = fresh(rate=1000)
    server.control.first_contact()
    run = simulate(server, 30, limit=lambda t: 100_000)
    assert run.total(0, 1.0) <= 2
    assert run.rate_at(4) >= 1000 / PACING_MARGIN - 1e-6
    assert run.count(429) == 0


def test_a_server_known_from_before_has_no_first_contact() -> None:
    server = fresh(rate=10)
    server.control.remember(LearnedRate(4.0, None, None), 10.0)
    server.control.first_contact()
    assert server.rate == 4.0 and server.control.warm_up_to is None


def test_the_wait_before_trying_again_carries_over_a_restart() -> None:
    first = fresh(rate=10)
    simulate(first, 900, limit=lambda t: 100)
    learned = first.control.learned()
    assert learned.wait is not None and learned.wait > 60  # tries failed: it grew

    again = fresh(rate=10)
    again.control.started = 905.0
    again.control.remember(learned, learned.held or 10)
    again.control.start_interval(905.0)
    run = simulate(again, 60, limit=lambda t: 100, start=905.0)
    assert run.count(429) == 0  # no try of the throttled rate within the first minute


def test_old_evidence_is_tried_again_soon() -> None:
    """A rate that drew a 429 a day ago (or a collapsed value from an older servers.csv) is
    not a permanent cap."""
    server = fresh(rate=10)
    server.control.remember(LearnedRate(None, 0.2, 0.0), 0.18)
    server.control.start_interval(86400.0)
    run = simulate(server, 240, limit=lambda t: 100, start=86400.0)
    assert run.rate_at(86400 + 240) >= 50


def test_an_always_failing_server_is_paused_then_given_up() -> None:
    server = fresh(rate=10, server_down_after=120)
    run = simulate(server, 200, limit=lambda t: 100, always_fail=True)
    assert server.breaker.down(200)
    # Paused with growing back-off and probed: a few dozen requests, not 10/s for 2 minutes.
    assert run.total() <= 40
    assert run.total(60, 200) <= 8


@pytest.mark.parametrize(("header", "rate"), [
    ('"burst";q=100;w=10, "daily";q=1000;w=86400', 1000 / 86400),
    ("10;w=1", 10.0),
    ('"default";q=5', 5.0),  # w left out: one second
    ('"bytes";q=1000000;w=1;qu="content-bytes"', None),  # not a rate of requests
    ('"mixed";q=50;w=10, "bytes";q=9;w=1;qu="content-bytes"', 5.0),
    ("nonsense", None),
])
def test_advertised_policies(header: str, rate: float | None) -> None:
    assert advertised_rate({"RateLimit-Policy": header}) == pytest.approx(rate)


def test_no_quota_left_pauses() -> None:
    assert quota_pause({"RateLimit": '"default";r=0;t=7'}) == 7
    assert quota_pause({"RateLimit": '"default";r=3;t=7'}) is None
    assert quota_pause({"RateLimit-Remaining": "0", "RateLimit-Reset": "4"}) == 4
    assert quota_pause({}) is None


def test_a_hard_cap_below_the_rate_floor_is_kept() -> None:
    """robots.txt's Crawl-delay: 60 allows one request a minute, below MIN_RATE."""
    server = fresh(rate=10)
    server.control.set_cap("robots", 1 / 60)
    assert server.rate <= 1 / 60
    server.control.throttled(5.0)
    assert server.rate <= 1 / 60


def test_only_the_first_throttle_trusts_what_the_server_took() -> None:
    server = fresh(rate=8)
    control = server.control
    control.held = 8.0
    control.asked(10.0, 8, 8)
    control.throttled(10.0)  # at the rate that held: the limit fell, halve
    assert control.rate == 4.0
    control.asked(11.3, 1, 1)  # one answer right after the pause
    control.throttled(11.3)
    assert control.rate == 2.0  # halved again, not cut to the single answer seen


def test_an_overload_is_not_saved_as_what_the_server_tolerates() -> None:
    server = fresh(rate=10, overload_min_failures=5)
    for second in range(1, 10):
        server.observe(0, ServerNews(answered=5, failed=5, failed_urls=5), now=second)
    assert server.rate < 10
    assert server.control.learned().throttled is None


# --- the climb above the default rate (max_rate_factor) ----------------------------------------

DEFAULT, CLIMB_MAX = 10.0, 40.0  # default_rate_limit and the default max_rate_factor of 4


def first_met() -> ServerPolicy:
    """A server nothing is known of, in a run at the default settings (no max_rate_limit)."""
    settings = Settings()
    assert settings.politeness.effective_max_rate == CLIMB_MAX
    server = fresh(rate=DEFAULT, run_max=settings.politeness.effective_max_rate)
    server.control.first_contact()
    return server


def quick(rate: float) -> float:
    return 0.01  # 10 ms at any rate: the server has room


def test_a_fast_clean_server_climbs_to_the_higher_ceiling_within_25_seconds() -> None:
    """First contact (1/s, the default in three reports), then a step of 20% every
    rate_increase_interval (2 s): 10 to 40 in eight steps."""
    server = first_met()
    run = simulate(server, 120, limit=lambda t: 100_000, latency=quick)
    assert run.total(0, 1.0) <= 2  # first contact as before
    assert run.rate_at(25) >= CLIMB_MAX / PACING_MARGIN - 1e-9
    assert max(rate for _, rate in run.rates) <= CLIMB_MAX  # and never past it
    assert run.count(429) == 0


def test_no_latency_reported_climbs_as_well() -> None:
    """Answers with no timing (none reported) are no sign of strain."""
    server = first_met()
    run = simulate(server, 60, limit=lambda t: 100_000)
    assert run.rate_at(25) >= CLIMB_MAX / PACING_MARGIN - 1e-9


@pytest.mark.parametrize("limit", [3, 6, 9])
def test_a_hidden_limit_below_the_default_is_never_pushed_past_for_long(limit: int) -> None:
    server = first_met()
    run = simulate(server, 600, limit=lambda t: limit, latency=quick)
    assert run.peak(0, 600) <= 2 * limit
    assert run.count(429) <= max(6, 0.01 * run.total())
    # Above the limit only while a try of the throttled rate lasts (a second or so a minute).
    assert run.share_of_time_within(0, limit, 30, 600) >= 0.97
    assert run.rate_at(300) >= 0.8 * limit  # and the limit is used


@pytest.mark.parametrize("limit", [10, 12, 25])
def test_a_hidden_limit_above_the_default_sees_at_most_a_step_past_it(limit: int) -> None:
    """The climb meets the limit with a step of 20% at most: a 429, a peak of 1.2 times the
    limit at most, then a rest below it (tried again once a quiet minute or more)."""
    server = first_met()
    run = simulate(server, 600, limit=lambda t: limit, latency=quick)
    assert run.peak(0, 600) <= 1.2 * limit
    assert run.count(429) <= max(6, 0.01 * run.total())
    assert run.share_of_time_within(0.75 * limit, limit, 60, 600) >= 0.95


def test_a_server_whose_answers_slow_down_stops_climbing() -> None:
    """The server queues beyond 20 requests/s: its quickest answer grows from 10 ms, by 10 ms
    per request/s above that. The rate steps back and stays below where it slowed."""
    def queueing(rate: float) -> float:
        return 0.01 + 0.01 * max(0.0, rate / PACING_MARGIN - 20)

    server = first_met()
    run = simulate(server, 600, limit=lambda t: 100_000, latency=queueing)
    # Above 30/s only while a try lasts, once a minute (throttle_memory): a step and back.
    assert run.share_of_time_within(DEFAULT / PACING_MARGIN, 30, 30, 600) >= 0.95
    assert run.count(429) == 0
    assert server.control.held is not None and server.control.held <= 30


def test_a_burst_of_failures_stops_the_climb_at_the_default() -> None:
    """10% of URLs fail (503 without Retry-After): too few for an overload, too many to climb."""
    server = first_met()
    run = simulate(server, 300, limit=lambda t: 100_000, fail_share=0.1, latency=quick)
    # At most a step above it while the first answers are too few to tell, then back.
    assert run.share_of_time_within(0, DEFAULT, 30, 300) >= 0.95
    assert run.rate_at(300) <= DEFAULT / PACING_MARGIN
    assert run.rate_at(30) >= 0.9 * DEFAULT / PACING_MARGIN  # the default itself is kept


def test_a_429_after_the_climb_falls_back_to_what_held() -> None:
    """A fast server whose limit drops to 12/s once the run climbed to the ceiling."""
    server = first_met()
    run = simulate(server, 300, limit=lambda t: 100_000 if t < 60 else 12, latency=quick)
    assert run.rate_at(59) >= CLIMB_MAX / PACING_MARGIN - 1e-9
    first = min(t for t, status in run.requests if status == 429)
    assert run.rate_at(first + 1.5) <= 0.9 * CLIMB_MAX  # fell back at once
    assert run.rate_at(first + 30) <= 12
    assert run.count(429) <= 8
    assert run.share_of_time_within(0.7 * 12, 12, 120, 300) >= 0.95


def test_a_rate_our_side_cannot_carry_is_not_climbed_on() -> None:
    """Our connections or cores send at most 12/s: the rate steps once past what the server
    saw (a 20% step), not on to twice that; and only rates used in full count as held."""
    server = first_met()
    simulate(server, 180, limit=lambda t: 100_000, latency=quick, client_max=12)
    assert server.control.rate <= 12 * CLIMB_STEP + 1e-9
    assert server.control.held is not None and server.control.held <= 12


@pytest.mark.parametrize(("max_rate_limit", "restart"), [(None, DEFAULT), (40.0, 34.6)])
def test_a_climb_is_earned_again_in_the_next_run(max_rate_limit: float | None,
                                                 restart: float) -> None:
    """A rate the engine climbed to on its own restarts at the default (how the server was
    then says little of how it is now); under a max_rate_limit the user set, as it held."""
    settings = {} if max_rate_limit is None else {"max_rate_limit": max_rate_limit}
    server = fresh(rate=DEFAULT, run_max=CLIMB_MAX, **settings)
    server.control.remember(LearnedRate(34.6, None, None), DEFAULT)
    assert server.control.rate == restart


def test_a_hand_set_rate_is_a_ceiling_the_climb_never_passes() -> None:
    server = fresh(rate=7.0, run_max=7.0)  # fetch's override: rate and run ceiling both 7
    run = simulate(server, 120, limit=lambda t: 100_000, latency=quick)
    assert max(rate for _, rate in run.rates) <= 7.0


def test_max_rate_factor_and_rate_multiplier_set_the_ceiling() -> None:
    assert Settings(max_rate_factor=1).politeness.effective_max_rate == DEFAULT
    assert Settings(max_rate_limit=15).politeness.effective_max_rate == 15
    settings = Settings(default_rate_limit=5, max_rate_factor=3, rate_multiplier=0.5)
    politeness = settings.politeness
    assert politeness.effective_max_rate * politeness.rate_multiplier == 7.5
