"""What one worker saw of each server since its last report: counted here, judged by policy.py.

The worker decides nothing about a server. It counts answers, throttles and failures into one
`ServerNews` per server, hands them over at each report, and says when a report should go at
once (a throttle, a pause, a new advertised limit, a streak of failures long enough for the
breaker). The one thing done on the spot is a pause the server asked for (Retry-After, an
exhausted RateLimit quota): its own slot keeps it until the scheduler's word arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from distributed_downloader.errors import Failure
from distributed_downloader.fetch.client import Body
from distributed_downloader.fetch.frontier import Pending
from distributed_downloader.fetch.politeness import ServerSlot
from distributed_downloader.policy import (
    DEFAULT_THROTTLE_PAUSE,
    Signal,
    advertised_rate,
    quota_pause,
    signal_of,
)
from distributed_downloader.protocol import ServerNews


@dataclass
class Seen:
    """What one answer said: its signal, and whether the scheduler should hear of it now."""

    signal: Signal
    urgent: bool


class NewsBook:
    def __init__(self, breaker_failures: int) -> None:
        self.breaker_failures = breaker_failures
        self.news: dict[str, ServerNews] = {}
        # server -> the URLs that failed since its last good answer: how many different URLs
        # failed in a row (a few bad URLs retried over and over are not a server down)
        self.failing: dict[str, set[str]] = {}
        self.advertised: dict[str, float] = {}  # server -> its latest RateLimit-Policy rate
        self.answered: set[str] = set()  # servers that answered well at least once here
        self.bytes = 0

    def of(self, server: str) -> ServerNews:
        """The server's news since the last report (handed over at each: look it up again
        after an await)."""
        return self.news.setdefault(server, ServerNews())

    def hand_over(self) -> tuple[dict[str, ServerNews], int] | None:
        """Everything since the last report (news by server, bytes), or None when nothing."""
        for name, urls in self.failing.items():
            self.of(name).failures = len(urls)
        if not self.news and not self.bytes:
            return None
        taken = self.news, self.bytes
        self.news, self.bytes = {}, 0
        return taken

    def left(self, server: str) -> None:
        """This worker fetches the server no more: no stale streak stays behind."""
        self.failing.pop(server, None)

    def observe(self, slot: ServerSlot, outcome: Body | Failure, seconds: float,
                item: Pending) -> Seen:
        """Count what an answer says about the server; honour a pause it asked for at once."""
        if isinstance(outcome, Body):
            self.bytes += len(outcome.data)
            signal = signal_of(None, None)
        else:
            signal = signal_of(outcome.code, outcome.retry_after)
        news_of_limit = self._advertised(slot.name, outcome)
        paused = self._pause(slot, outcome, signal)
        failing = 0
        if signal is Signal.FAILED:
            failing = self._failed(slot.name, item)
        elif signal is Signal.ANSWERED:
            self._answered(slot.name, seconds)
        urgent = signal is Signal.THROTTLED or paused or news_of_limit or \
            failing >= self.breaker_failures
        return Seen(signal, urgent)

    def _advertised(self, server: str, outcome: Body | Failure) -> bool:
        """Note a RateLimit-Policy; True when it is news."""
        advertised = advertised_rate(outcome.headers)
        if advertised is None:
            return False
        is_news = self.advertised.get(server) != advertised
        self.of(server).advertised = self.advertised[server] = advertised
        return is_news

    def _pause(self, slot: ServerSlot, outcome: Body | Failure, signal: Signal) -> bool:
        """A pause the server asked for, kept by its slot at once; True when there is one."""
        news = self.of(slot.name)
        pause = quota_pause(outcome.headers)
        if signal is Signal.THROTTLED:
            news.throttled += 1
            retry_after = outcome.retry_after  # type: ignore[union-attr]
            pause = max(pause or 0.0, DEFAULT_THROTTLE_PAUSE if retry_after is None
                        else retry_after)
        if pause is None:
            return False
        news.retry_after_until = max(news.retry_after_until, slot.pause(pause))
        return True

    def _failed(self, server: str, item: Pending) -> int:
        """Count a failed URL; returns how many different URLs failed in a row."""
        news = self.of(server)
        news.failed += 1
        news.failed_urls += item.attempts == 1
        urls = self.failing.setdefault(server, set())
        urls.add(item.row["identifier"])
        return len(urls)

    def _answered(self, server: str, seconds: float) -> None:
        self.failing.pop(server, None)
        self.answered.add(server)
        news = self.of(server)
        news.answered += 1
        news.latency_sum += seconds
        news.latency_count += 1
        news.latency_min = min(news.latency_min, seconds)
