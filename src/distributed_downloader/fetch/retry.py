"""When to ask again, and how long to wait first."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

from distributed_downloader.errors import RETRYABLE, RETRYABLE_LATER, ErrorCode

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0


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
    """Retries only what can succeed later, with exponential back-off and jitter."""

    def __init__(self, max_attempts: int, rng: random.Random | None = None) -> None:
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()

    def should_retry(self, code: ErrorCode, attempts: int) -> bool:
        return code in RETRYABLE and code not in RETRYABLE_LATER and attempts < self.max_attempts

    def delay(self, attempts: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        backoff = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempts - 1))
        return backoff * self.rng.uniform(0.5, 1.0)
