"""How fast each server may be asked, and when it counts as down: pure logic on a given clock.

One `ServerPolicy` per server, fed what the workers saw (`ServerNews`) and the time; the
scheduler turns its state into every worker's budget. No I/O, no sleeping: the tests run hours
of simulated time in milliseconds. The rules:

- **Throttling is the server's signal.** A 429, or a 503 with `Retry-After`, pauses the server
  for the time asked and lowers its rate. A `RateLimit` field with no quota left pauses it too.
- **A failed URL is not.** A 5xx without `Retry-After`, a timeout or a reset is retried later by
  the worker and leaves the rate alone, unless the server looks overloaded: at least
  `overload_failure_share` of its answers of the last `overload_window` seconds were failures
  of URLs asked for the first time (retries of a dead link do not count), and at least
  `overload_min_failures` of them. A server answering 98% of requests well is not. An overload
  lowers the rate for this run only: it is not saved as what the server tolerates.
- **The rate searches the limit, and every decrease can be undone** (`RateController`): it grows
  while nothing is known, bisects between the highest rate that held and the lowest recent rate
  that drew a throttle, and rests just below the latter. That evidence has an age: after
  `throttle_memory` quiet seconds the throttled rate is tried again (the wait doubling while
  tries keep drawing 429s, at most `throttle_memory_max`), so a limit that rises is found again.
  A throttle above a rate that held falls back to that rate instead of halving, and never
  to one within `CEILING_SHARE` of the limit the throttle showed.
- **Above the default rate, the server must earn each step** (`RateController.tick`): the
  engine raises a server past `default_rate_limit` (up to `max_rate_limit`, by default
  `max_rate_factor` times the default) by `CLIMB_STEP` at most (`rate_growth_factor` up to a
  `max_rate_limit` the user set), and only after an interval in which the rate was used in
  full (`CLIMB_USED_SHARE`), no throttle came, few first attempts failed (no burst of 5xx or
  timeouts: at most `CLIMB_FAILURE_SHARE`, counted from `CLIMB_MIN_FAILURES`) and its quickest
  answers were not slower than its quickest ever (LEDBAT's base delay: queueing at the server
  shows there first). Answers that slow down, or failures beyond
  `CLIMB_FAILURE_SHARE`, step the rate back and stop the climb for `throttle_memory`; a
  throttle falls back as below the default. Connections never grow
  (`max_connections_per_server`): the climb stops where they cannot carry the rate. Why: the
  default is what the user accepted for any server; more is our initiative, so it stops at
  the first sign of strain, before the server has to say so, and is earned again in each run.
- **A server failing everything is down** (`Breaker`): `breaker_failures` different URLs failing
  in a row, with no good answer between, open the breaker: the server is paused with growing
  back-off and probed one request at a time; a good answer closes it; after
  `server_down_after` seconds of failing it is given up.
- **Advertised limits** (`RateLimit-Policy`), hand-set rates and robots.txt's Crawl-delay are
  hard caps (`RateController.caps`): the rate never exceeds them.
- **When a server is given up** (`ServerPolicy.give_up`): its breaker stayed open for
  `server_down_after` seconds, it asked for a pause longer than that, or its first
  `opt_out_server_after` images all opted out (X-Robots-Tag).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from distributed_downloader.config import PolitenessSettings
from distributed_downloader.errors import SERVER_FAILURES, ErrorCode, Failure
from distributed_downloader.protocol import ServerNews

# Constants below are the rate controller's own mechanics, not knobs: a user tunes it through
# the politeness settings (PolitenessSettings), which these only keep sound.
# An interval counts as "held" only if the server was really asked at about that rate: a rate
# nobody used says nothing about the server (TCP's congestion-window validation, RFC 7661).
USED_SHARE = 0.5
# Above the default rate an interval shows room only if it used nearly all of it (pacing runs a
# little under the budget): a rate that our connections or cores cannot carry says nothing of
# the server, and climbing on half-used rates would reach twice what the server ever saw.
# (Judged over the time the interval's reports cover, not the interval: a 2-s interval may hold
# three 1-s reports. 0.85: a step's first report still shows the rate before it, paced 5% under.)
CLIMB_USED_SHARE = 0.85
# An interval spans at least this many requests, so slow servers are judged on enough answers.
REQUESTS_PER_INTERVAL = 4
# The rate rests this far below the lowest rate that drew a throttle: close enough to use the
# server's allowance, far enough that the pacing of several workers sharing it (which drift
# apart and sometimes meet in one second) does not cross its limit.
CEILING_SHARE = 0.9
DECREASE_COOLDOWN = 1.0  # seconds: one burst of 429s, seen by several workers, lowers once
DEFAULT_THROTTLE_PAUSE = 1.0  # seconds, for a 429 without Retry-After
MIN_RATE = 0.02  # requests/s: even a very touchy server keeps being asked, slowly
RECENT_THROTTLE = 30.0  # seconds during which a lowered rate is named as a reason for waiting
# Answers of the last second tell how much a server takes: after a first throttle the rate falls
# at most to that (a server allowing 1 request/s, asked at 10/s, goes to ~1/s at once). That
# count is the limit itself (a strict limit answers exactly that many a second), so the rate
# rests CEILING_SHARE below it, not at it.
ACCEPTED_WINDOW = 2.0
# The engine's own climb above the default (max_rate_factor) raises the rate by at most this
# much a step: a server whose hidden limit lies above the default then sees at most 1.2 times
# its limit in the second before its 429, the peak the project allows (benchmarks/politeness.py).
# A max_rate_limit set by the user vouches for the rates below it: steps of rate_growth_factor.
CLIMB_STEP = 1.2
# First attempts failing beyond this share of the answers of the last `overload_window` seconds
# (and at least CLIMB_MIN_FAILURES of them: a few answers are no share) stop the climb: 2%
# flaky URLs do not; a burst of 5xx or timeouts does, long before it counts as overload.
CLIMB_FAILURE_SHARE = 0.05
CLIMB_MIN_FAILURES = 5
# The quickest answer of an interval counts as slower when above this many times the quickest
# ever, plus a margin for jitter (loopback answers in a millisecond; our own event loop varies).
LATENCY_GROWTH = 2.0
LATENCY_MARGIN = 0.05  # seconds
ANSWERS_FOR_LATENCY = 3  # a report's quickest answer counts if it had this many (not one slow URL)

# Why a server is given up: what its remaining rows become.
SERVER_KEPT_FAILING = Failure(ErrorCode.SERVER_UNAVAILABLE,
                              "server kept failing; gave up on it for this run")
SERVER_OPTED_OUT = Failure(ErrorCode.OPTED_OUT_SERVER,
                           "every answer of the server opted out (X-Robots-Tag); not asked again")


@dataclass(frozen=True)
class RatePolicy:
    """The named settings of rate control (defaults and meanings: config.py)."""

    increase_interval: float
    growth_factor: float
    decrease_factor: float
    throttle_memory: float
    throttle_memory_max: float
    overload_failure_share: float
    overload_min_failures: int
    breaker_failures: int
    breaker_max_pause: float
    server_down_after: float
    first_contact_rate: float = 1.0
    opt_out_server_after: int = 10
    warm_up_steps: int = 3
    overload_window: float = 20.0
    # The user set max_rate_limit: the rates below it are vouched for (steps of
    # rate_growth_factor above the default, and a rate that held restarts as it is).
    max_rate_set_by_user: bool = False

    @property
    def climb_step(self) -> float:
        """The largest step above the default rate."""
        return self.growth_factor if self.max_rate_set_by_user else CLIMB_STEP

    @classmethod
    def from_settings(cls, politeness: PolitenessSettings) -> RatePolicy:
        return cls(
            increase_interval=politeness.rate_increase_interval,
            growth_factor=politeness.rate_growth_factor,
            decrease_factor=politeness.rate_decrease_factor,
            throttle_memory=politeness.throttle_memory,
            throttle_memory_max=politeness.throttle_memory_max,
            overload_failure_share=politeness.overload_failure_share,
            overload_min_failures=politeness.overload_min_failures,
            breaker_failures=politeness.breaker_failures,
            breaker_max_pause=politeness.breaker_max_pause,
            server_down_after=politeness.server_down_after,
            first_contact_rate=politeness.first_contact_rate,
            warm_up_steps=politeness.warm_up_steps,
            overload_window=politeness.overload_window,
            opt_out_server_after=politeness.opt_out_server_after,
            max_rate_set_by_user=politeness.max_rate_limit is not None,
        )


# --- what an answer says about its server ---------------------------------------------------


class Signal(Enum):
    ANSWERED = "answered"  # the server works (an image, a 404, an HTML page ...)
    THROTTLED = "throttled"  # slow down: 429, or 503 with Retry-After
    FAILED = "failed"  # this URL failed for now: 5xx without Retry-After, timeout, reset
    NONE = "none"  # nothing about the server (refused before sending, given up)


# Outcomes that say nothing of the server: it was not asked, or not where it counts.
NOT_ASKED = frozenset({ErrorCode.SERVER_UNAVAILABLE, ErrorCode.BLOCKED_ADDRESS})


def signal_of(code: ErrorCode | None, retry_after: float | None) -> Signal:
    """Classify one answer: `code` None for a body, else its error code."""
    if code is None:
        return Signal.ANSWERED
    if code == ErrorCode.HTTP_429 or (code == ErrorCode.HTTP_503 and retry_after is not None):
        return Signal.THROTTLED
    if code in SERVER_FAILURES:
        return Signal.FAILED
    if code in NOT_ASKED:
        return Signal.NONE
    return Signal.ANSWERED


# --- advertised limits (IETF httpapi-ratelimit-headers draft) -------------------------------

_PARAM = re.compile(r";\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(\"[^\"]*\"|[^;,\s]+)")
_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def _items(value: str) -> list[dict[str, str]]:
    """A structured-field list, read loosely: each item's parameters. A bare number leading an
    item is its quota `q` (the draft's older form `10;w=1`)."""
    items = []
    for item in value.split(","):
        head, _, rest = item.partition(";")
        params = {key.lower(): raw.strip('"') for key, raw in _PARAM.findall(";" + rest)}
        if "q" not in params and _NUMBER.fullmatch(head):
            params["q"] = head.strip()
        items.append(params)
    return items


def advertised_rate(headers: Mapping[str, str] | None) -> float | None:
    """Requests/s a server advertises in `RateLimit-Policy`: the strictest of its policies
    counted in requests (`qu` absent or "requests"); `w` defaults to one second."""
    value = headers.get("RateLimit-Policy") if headers else None
    if not value:
        return None
    rates = []
    for params in _items(value):
        if params.get("qu", "requests") != "requests":
            continue  # a quota of bytes says nothing about requests/s
        try:
            quota, window = float(params["q"]), float(params.get("w", "1"))
        except (KeyError, ValueError):
            continue
        if quota >= 0 and window > 0:
            rates.append(quota / window)
    return min(rates) if rates else None


def quota_pause(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait when the server says no quota is left: `RateLimit: "p";r=0;t=5` (or
    the older `RateLimit-Remaining: 0` with `RateLimit-Reset: 5`)."""
    if not headers:
        return None
    pairs = [(params.get("r"), params.get("t")) for params in
             _items(headers.get("RateLimit") or "")]
    pairs.append((headers.get("RateLimit-Remaining"), headers.get("RateLimit-Reset")))
    waits = []
    for remaining, reset in pairs:
        try:
            if remaining is not None and float(remaining) <= 0:
                waits.append(max(0.0, float(reset or DEFAULT_THROTTLE_PAUSE)))
        except ValueError:
            continue
    return max(waits) if waits else None


# --- the rate controller --------------------------------------------------------------------


@dataclass
class LearnedRate:
    """What a server tolerated, kept in servers.csv for the next run."""

    held: float | None  # the highest rate answered well for a whole interval
    throttled: float | None  # the latest rate that drew a throttle
    throttled_at: float | None  # when (wall clock)
    wait: float | None = None  # quiet seconds before that rate is tried again


@dataclass
class RateController:
    """One server's rate: grows, searches the limit, rests below it, probes it again later.

    Invariant: `rate` never exceeds `max_rate` (the run's ceiling and every hard cap), and
    goes above `climb_from` only in steps earned by calm intervals.
    """

    policy: RatePolicy
    rate: float
    run_max: float  # max_rate_limit of the run
    started: float  # when the run started (a restart waits a quiet while before trying a rate)
    caps: dict[str, float] = field(default_factory=dict)  # advertised, manual, robots
    held: float | None = None
    throttled_rate: float | None = None
    throttled_at: float = -math.inf
    memory: float = 0.0  # current quiet time before a throttled rate is tried again
    probing: bool = False  # the rate is a try of the throttled rate
    interval_start: float = 0.0
    asked_in_interval: int = 0
    last_decrease: float = -math.inf
    accepted: deque[tuple[float, int]] = field(default_factory=deque)  # (time, answers)
    overloaded: bool = False  # the latest decrease came from failures, not from a throttle
    warm_up_to: float | None = None  # first contact: the rate its good answers lead up to
    warm_up_factor: float = 2.0  # the step of each report of good answers while warming up
    climb_from: float = 0.0  # the run's default rate: above it, steps need calm intervals
    # seconds: the slowest of the interval's reports' quickest answers (a report can straddle
    # two intervals: its successor's shows the new rate alone)
    quickest_in_interval: float = -math.inf
    quickest: float = math.inf  # seconds: the server's quickest answer of the run
    slowed_at: float = -math.inf  # when the climb above climb_from last stepped back
    slowed_by: str = ""  # why: "slower answers" or "failures"
    last_report: float = 0.0  # when the latest report came (each covers the time since the last)
    reported_from: float = 0.0  # the time the interval's reports cover begins

    def __post_init__(self) -> None:
        self.memory = self.memory or self.policy.throttle_memory
        self.interval_start = self.last_report = self.reported_from = self.started
        self.climb_from = self.climb_from or self.rate
        self.rate = self._within(self.rate)

    def _within(self, rate: float) -> float:
        """A rate no lower than MIN_RATE, and never above a cap (even one below MIN_RATE)."""
        return min(max(MIN_RATE, rate), self.max_rate)

    @property
    def max_rate(self) -> float:
        return min([self.run_max, *self.caps.values()])

    @property
    def ceiling(self) -> float | None:
        """Where the rate rests: just below the latest rate that drew a throttle."""
        if self.throttled_rate is None:
            return None
        return min(self.max_rate, CEILING_SHARE * self.throttled_rate)

    def remember(self, learned: LearnedRate, start_rate: float) -> None:
        """Start from what an earlier run learned: the rate that held, the one that drew a
        throttle (with its age: it is tried again after `throttle_memory`)."""
        self.held = learned.held
        if learned.throttled is not None and learned.throttled_at is not None:
            self.throttled_rate, self.throttled_at = learned.throttled, learned.throttled_at
            self.memory = min(self.policy.throttle_memory_max,
                              max(self.policy.throttle_memory, learned.wait or 0.0))
        self.rate = self._within(self.start_rate(start_rate))

    def first_contact(self) -> None:
        """A server nothing is known of starts as a probe would (`first_contact_rate`) and
        steps up with each report of good answers, reaching its starting rate in
        `warm_up_steps` reports: the probe's answers are results, and no time is spent on a
        separate profile."""
        if self.held is None and self.throttled_rate is None and \
                self.rate > self.policy.first_contact_rate:
            self.warm_up_to = self.rate
            self.rate = self._within(self.policy.first_contact_rate)
            steps = self.policy.warm_up_steps
            self.warm_up_factor = max(2.0, (self.warm_up_to / self.rate) ** (1 / steps))

    def warm_up(self, answered: int) -> bool:
        """A report of good answers (about one a second) during the first contact: step the
        rate up, as TCP's slow start does each round trip. True if the rate changed."""
        if self.warm_up_to is None or not answered:
            return False
        self.held = max(self.held or 0.0, self.rate)  # it was answered well at this rate
        self.rate = self._within(min(self.warm_up_to, self.rate * self.warm_up_factor))
        if self.rate >= self.warm_up_to:
            self.warm_up_to = None
        return True

    def start_rate(self, default: float) -> float:
        """Where a run starts (and where this one would rest): what held, else `default`, below
        the rate that drew a throttle. A rate the engine climbed to on its own above the default
        is earned again in each run: how the server was then says little of how it is now."""
        start = self.held or default
        if not self.policy.max_rate_set_by_user:
            start = min(start, self.climb_from)
        return min(start, self.ceiling) if self.ceiling is not None else start

    def learned(self) -> LearnedRate:
        if self.throttled_rate is None or self.overloaded:
            return LearnedRate(self.held, None, None)
        return LearnedRate(self.held, self.throttled_rate, self.throttled_at, self.memory)

    def set_cap(self, name: str, rate: float | None) -> bool:
        """A hard cap (an advertised limit, ...): the rate never exceeds it. True if the
        rate changed."""
        if rate is None or rate <= 0:
            return False
        if self.caps.get(name) == rate:
            return False
        self.caps[name] = rate
        if self.rate > self.max_rate:
            self.rate = self.max_rate
            return True
        return False

    def asked(self, now: float, requests: int, answered: int,
              quickest: float = math.inf) -> None:
        """Requests the server saw since the last report, how many it answered well, and its
        quickest answer (seconds)."""
        self.asked_in_interval += requests
        self.last_report = now
        if answered >= ANSWERS_FOR_LATENCY and math.isfinite(quickest):
            self.quickest_in_interval = max(self.quickest_in_interval, quickest)
        self.quickest = min(self.quickest, quickest)
        if answered:
            self.accepted.append((now, answered))
        while self.accepted and now - self.accepted[0][0] > ACCEPTED_WINDOW:
            self.accepted.popleft()

    def interval(self) -> float:
        return max(self.policy.increase_interval, REQUESTS_PER_INTERVAL / self.rate)

    def tick(self, now: float, failing: bool = False) -> bool:
        """At the end of a quiet interval in which the rate was used: it held, step up (above
        `climb_from` only after a calm interval, and not while `failing`: more than
        CLIMB_FAILURE_SHARE of the latest answers failed). Strain above it: step back."""
        elapsed = now - self.interval_start
        if elapsed < self.interval():
            return False
        used = self._used(elapsed, USED_SHARE)
        in_full, slower = self._used_in_full(), self.slower()
        # Above the default a rate held only if it was used in full (else our side set the pace).
        held = used and (self.rate <= self.climb_from or in_full)
        # Room shown above the default: used in full, answers as quick as ever, no burst of
        # failures, and no step back of late. (A throttle starts a new interval: never calm.)
        calm = in_full and not slower and not failing and now - self.slowed_at >= self.memory
        self.start_interval(now)
        if (slower or failing) and self.rate > self.climb_from:
            return self._step_back(now, "slower answers" if slower else "failures")
        if not used:
            return False
        if held:
            self.held = max(self.held or 0.0, self.rate)
        self.probing = False
        if held and self.throttled_rate is not None and self.rate >= self.throttled_rate:
            # A rate that drew a throttle is answered well now: the limit rose.
            self.throttled_rate, self.memory = None, self.policy.throttle_memory
        new, probe = self._next_rate(now)
        if not calm:  # up to the default as before; beyond it, only with room shown
            new = min(new, max(self.rate, self.climb_from))
        if new <= self.rate:
            return False
        self.rate, self.probing = new, probe
        return True

    def _used(self, elapsed: float, share: float) -> bool:
        """Whether the server was asked at `share` of the rate or more during `elapsed`."""
        return self.asked_in_interval >= share * self.rate * elapsed

    def _used_in_full(self) -> bool:
        """Whether the interval's reports show the server asked at nearly the whole rate (a rate
        the connections or our cores cannot carry says nothing of the server)."""
        covered = self.last_report - self.reported_from
        return covered > 0 and self.asked_in_interval >= CLIMB_USED_SHARE * self.rate * covered

    def slower(self) -> bool:
        """Whether the interval's quickest answers took clearly longer than the server's quickest
        of the run: the server queues our requests (a few slow URLs do not move the quickest)."""
        return math.isfinite(self.quickest_in_interval) and \
            self.quickest_in_interval > LATENCY_GROWTH * self.quickest + LATENCY_MARGIN

    def _step_back(self, now: float, why: str) -> bool:
        """Step back above the default (by rate_growth_factor: more than a climb step, so the
        server's queue drains): it answered slower (or failed more) at this rate, so the rate
        did not hold (nor is it kept as having held). No step up again for a quiet while
        (`throttle_memory`), as after a throttle: no seesaw on its queue."""
        self.slowed_at, self.slowed_by = now, why
        self.rate = self._within(max(self.climb_from, self.rate / self.policy.growth_factor))
        if self.held is not None:
            self.held = min(self.held, self.rate)
        return True

    def _next_rate(self, now: float) -> tuple[float, bool]:
        """The next step up, and whether it is a try of the rate that drew a throttle."""
        ceiling, probe = self.ceiling, False
        if ceiling is None:  # no limit known: grow (TCP's slow start), gently above the default
            new = self.rate * self.policy.growth_factor
            if new > self.climb_from:
                new = max(self.climb_from, min(new, self.rate * self.policy.climb_step))
        elif self.rate < ceiling:  # the limit lies between: bisect towards it
            new = min(ceiling, (self.rate + self.throttled_rate) / 2)  # type: ignore[operator]
        elif now - max(self.throttled_at, self.started) >= self.memory:
            # Quiet long enough (in this run too: a restart does not try it at once): try again.
            new, probe = self.throttled_rate, True  # type: ignore[assignment]
        else:
            return self.rate, False
        return min(new, self.max_rate), probe

    def throttled(self, now: float, overload: bool = False) -> bool:
        """A throttle (or, with `overload`, a burst of failures) at the current rate. True if
        the rate changed. An overload lowers the rate the same way but is not kept as what
        the server tolerates: it is evidence for this run only."""
        first_contact = self.last_decrease == -math.inf and self.held is None
        warming_up, self.warm_up_to = self.warm_up_to is not None, None  # a limit is found
        self.throttled_at = now
        self.overloaded = overload
        if now - self.last_decrease < DECREASE_COOLDOWN:
            return False  # the same burst, seen by another worker
        if self.probing:  # trying the throttled rate again failed: wait longer next time
            self.memory = min(self.policy.throttle_memory_max, self.memory * 2)
            self.probing = False
        rate = self.rate
        self.throttled_rate = rate
        accepted = sum(count for when, count in self.accepted if now - when <= 1.0)
        if warming_up:  # the last step crossed its limit: it lies above the rate before, at
            # what it took when it was asked far more than that (a big step)
            self.throttled_rate = min(rate, max(rate / self.warm_up_factor,
                                                accepted if accepted < rate else 0))
        if self.held is not None and rate > self.held:
            self.rate = self.held  # above what held: back to it, the limit is in between
            if warming_up:  # but not to the limit the throttle showed: a rate that held for
                # one report while warming up can be that limit itself
                self.rate = self._within(min(self.held, self.ceiling))  # type: ignore[type-var]
        else:  # nothing held, or the limit fell below it: lower, at most to what it accepted
            lowered = rate * self.policy.decrease_factor
            if first_contact and not warming_up and 0 < accepted < lowered:
                # It took far less than it was asked: its limit is that, not near `rate`.
                lowered = self.throttled_rate = accepted
            self.rate = self._within(min(lowered, self.ceiling))  # type: ignore[type-var]
            self.held = None
        self.last_decrease = now
        self.start_interval(now)
        return True

    def start_interval(self, now: float) -> None:
        """A new interval of judging begins (a change, a pause, a restart)."""
        self.interval_start, self.asked_in_interval = now, 0
        self.reported_from = self.last_report
        self.quickest_in_interval = -math.inf


# --- the breaker ----------------------------------------------------------------------------


@dataclass
class Breaker:
    """A server that fails every request is paused, then probed one request at a time."""

    policy: RatePolicy
    streaks: dict[int, int] = field(default_factory=dict)  # worker -> failures in a row
    failing_since: float | None = None
    opens: int = 0
    paused_until: float = 0.0

    @property
    def open(self) -> bool:
        return self.opens > 0

    def observe(self, worker: int, answered: int, streak: int, now: float) -> bool:
        """One worker's answers and failures in a row; True when the breaker changed."""
        self.streaks[worker] = streak
        if answered and streak == 0:
            changed = self.open or self.failing_since is not None
            self.failing_since, self.opens = None, 0
            self.streaks.clear()
            return changed
        if sum(self.streaks.values()) < self.policy.breaker_failures or now < self.paused_until:
            return False
        if self.failing_since is None:
            self.failing_since = now
        self.opens += 1
        pause = min(self.policy.breaker_max_pause, 2.0 ** (self.opens - 1))
        self.paused_until = max(self.paused_until, now + pause)
        return True

    def resume_failing(self, since: float) -> None:
        """An earlier run (Slurm period) left the server failing since `since`."""
        self.failing_since, self.opens = since, 1

    def down(self, now: float) -> bool:
        return self.failing_since is not None and \
            now - self.failing_since >= self.policy.server_down_after


# --- one server's policy ----------------------------------------------------------------------


@dataclass
class Outcomes:
    """Answers and failures of the last `overload_window` seconds."""

    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, now: float, answered: int, failed: int, window: float) -> None:
        if answered or failed:
            self.samples.append((now, answered, failed))
        while self.samples and now - self.samples[0][0] > window:
            self.samples.popleft()

    def overloaded(self, policy: RatePolicy) -> bool:
        answered, failed = self.counts()
        return failed >= policy.overload_min_failures and \
            failed >= policy.overload_failure_share * (answered + failed)

    def failing(self) -> bool:
        """Too many failures for the rate to climb above the default (CLIMB_FAILURE_SHARE)."""
        answered, failed = self.counts()
        return failed >= CLIMB_MIN_FAILURES and failed > CLIMB_FAILURE_SHARE * (answered + failed)

    def counts(self) -> tuple[int, int]:
        """Answers and failures (first attempts) in the window."""
        return sum(sample[1] for sample in self.samples), sum(s[2] for s in self.samples)


@dataclass
class ServerPolicy:
    """Everything the run decides about one server's pace, in one place."""

    control: RateController
    breaker: Breaker
    outcomes: Outcomes = field(default_factory=Outcomes)
    paused_until: float = 0.0  # Retry-After, or an exhausted RateLimit quota (wall clock)
    pause_reason: str = ""
    last_asked: float | None = None  # when it was last seen asked (a report with answers)
    opted_out: int = 0  # images whose X-Robots-Tag opted out
    opt_in: int = 0  # images without such a header

    @classmethod
    def start(cls, policy: RatePolicy, rate: float, run_max: float, now: float) -> ServerPolicy:
        return cls(RateController(policy, rate, run_max, now), Breaker(policy))

    @property
    def rate(self) -> float:
        return self.control.rate

    def pause_end(self) -> float:
        return max(self.paused_until, self.breaker.paused_until)

    @property
    def first_contact(self) -> bool:
        """The rate still steps up from a first contact (`RateController.warm_up`)."""
        return self.control.warm_up_to is not None

    def observe(self, worker: int, news: ServerNews, now: float) -> bool:
        """One worker's news of this server; True when the budget changed."""
        changed = False
        self.opted_out += news.opted_out
        self.opt_in += news.opt_in
        asked = news.answered + news.failed + news.throttled
        self.control.asked(now, asked, news.answered, news.latency_min)
        if asked:
            self.last_asked = now
        if news.advertised is not None:
            changed |= self.control.set_cap("advertised", news.advertised)
        if news.retry_after_until > self.paused_until:
            self.paused_until = news.retry_after_until
            self.pause_reason = "Retry-After" if news.throttled else "no RateLimit quota left"
            changed = True
        if news.throttled:
            changed |= self.control.throttled(now)
        else:
            changed |= self.control.warm_up(news.answered)
        self.outcomes.add(now, news.answered, news.failed_urls,
                          self.control.policy.overload_window)
        if self.outcomes.overloaded(self.control.policy):
            self.outcomes.samples.clear()  # the next decision needs fresh evidence
            changed |= self.control.throttled(now, overload=True)
        changed |= self.breaker.observe(worker, news.answered, news.failures, now)
        return changed

    def give_up(self, now: float) -> Failure | None:
        """Why the server is not asked again this run (what its rows become), or None."""
        if not self.opt_in and self.opted_out >= self.control.policy.opt_out_server_after:
            return SERVER_OPTED_OUT
        if self.breaker.down(now):
            return SERVER_KEPT_FAILING
        pause = self.pause_too_long(now)
        if pause is not None:
            return Failure(ErrorCode.HTTP_429, f"the server asked for a pause of {pause:.0f} s "
                           "(Retry-After); not asked again this run")
        return None

    def pause_too_long(self, now: float) -> float | None:
        """The seconds left of a pause the server asked for, when longer than a failing server
        is waited for: the server is then given up for this run (the next keeps the pause)."""
        left = self.paused_until - now
        return left if left > self.control.policy.server_down_after else None

    def tick(self, now: float) -> bool:
        """Time passing: the rate may step up (never while paused or failing)."""
        if now < self.pause_end() or self.breaker.open:
            self.control.start_interval(now)
            return False
        return self.control.tick(now, self.outcomes.failing())

    def waiting(self, now: float) -> tuple[str, float | None] | None:
        """Why this server is not being asked now, and for how many seconds more."""
        if self.breaker.open and self.breaker.failing_since is not None:
            left = self.breaker.failing_since + self.control.policy.server_down_after - now
            return f"failing since {now - self.breaker.failing_since:.0f} s, " \
                   f"probed one request at a time; given up in", max(0.0, left)
        if now < self.paused_until:
            return f"paused by {self.pause_reason or 'Retry-After'}", self.paused_until - now
        control = self.control
        if now - control.throttled_at < RECENT_THROTTLE:
            cause = "failures" if control.overloaded else "a throttle"
            return f"slowed to {self.rate:.3g}/s by {cause} " \
                   f"{now - control.throttled_at:.0f} s ago", None
        if now - control.slowed_at < RECENT_THROTTLE:
            return f"stepped back to {self.rate:.3g}/s by {control.slowed_by} " \
                   f"{now - control.slowed_at:.0f} s ago", None
        return None
