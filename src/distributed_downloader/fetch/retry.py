"""Which failed URLs are asked again within the run, and when: seconds first, then minutes."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

from distributed_downloader.config import PolitenessSettings
from distributed_downloader.errors import RETRYABLE, RETRYABLE_LATER, ErrorCode
from distributed_downloader.fetch.frontier import Pending

# Tries per URL on a server that has not answered once yet: it may be down altogether, and a
# server failing everything must not cost more than this per URL (the breaker stops the rest).
ATTEMPTS_ON_A_SILENT_SERVER = 3


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryPolicy:
    """Retries only what can succeed later, each wait longer than the last, with jitter."""

    def __init__(self, max_attempts: int, first_delay: float = 1.0, max_delay: float = 600.0,
                 rng: random.Random | None = None, growth: float = 3.0,
                 max_throttles: int = 10) -> None:
        self.max_attempts = max_attempts
        self.max_throttles = max_throttles
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.growth = growth
        self.rng = rng or random.Random()

    @classmethod
    def from_settings(cls, politeness: PolitenessSettings) -> RetryPolicy:
        return cls(politeness.max_retries, politeness.retry_delay, politeness.retry_delay_max,
                   growth=politeness.retry_delay_growth,
                   max_throttles=politeness.max_throttles)

    def should_retry(self, code: ErrorCode, failures: int, max_attempts: int | None = None,
                     ) -> bool:
        """After `failures` failed attempts of a URL, the last one with `code`."""
        limit = self.max_attempts if max_attempts is None else max_attempts
        return code in RETRYABLE and code not in RETRYABLE_LATER and failures < limit

    def delay(self, failures: int) -> float:
        backoff = min(self.max_delay, self.first_delay * self.growth ** (failures - 1))
        return backoff * self.rng.uniform(0.5, 1.0)

    def again(self, item: Pending, code: ErrorCode, throttled: bool, server_answered: bool,
              ) -> bool:
        """After a failed attempt at a row: True to ask again later, False when `code` is final.

        A throttle is the server's business: it is not a failure, but a URL throttled
        `max_throttles` times is given up. A server that has not answered once here
        (`server_answered`) gets fewer tries per URL: it may be down."""
        if throttled:
            item.throttles += 1
            return item.throttles < self.max_throttles
        item.throttles = 0
        item.failures += 1
        attempts = self.max_attempts if server_answered else \
            min(self.max_attempts, ATTEMPTS_ON_A_SILENT_SERVER)
        return code != ErrorCode.SERVER_UNAVAILABLE and \
            self.should_retry(code, item.failures, attempts)

    def wait_before(self, item: Pending) -> float:
        """Seconds before a row is asked again; a throttled one waits in its slot's pause."""
        return self.delay(item.failures) if item.failures and not item.throttles else 0.0
