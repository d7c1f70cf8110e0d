"""Exponential backoff with jitter between the attempts of a job, and between the passes of
the loops that retry a store that is away."""

from __future__ import annotations

import dataclasses
import random

from flexq._errors import InvalidArguments


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long a failed job waits before its next attempt.

    The wait after attempt ``n`` is ``min(maximum, base * factor ** (n - 1))``, then moved by a
    random fraction of up to ``jitter`` either way so that jobs that failed together do not
    retry together.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.base < 0 or self.maximum < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise InvalidArguments(
                "Backoff needs base >= 0, maximum >= 0, factor >= 1 and 0 <= jitter <= 1"
            )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(attempt - 1, 0)
        try:
            raw = self.base * self.factor**exponent
        except OverflowError:
            raw = self.maximum
        capped = min(self.maximum, raw)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, capped * (1.0 + spread))


MAX_RETRY_PAUSE = 2.0


def retry_pause(previous: float, first: float) -> float:
    """The pause after a failed pass of a loop that retries the store (the database is away):
    ``first`` after the first failure, doubling up to :data:`MAX_RETRY_PAUSE`."""
    return min(max(2 * previous, first, 0.01), MAX_RETRY_PAUSE)
