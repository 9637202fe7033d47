"""Redis's clock (``TIME``), which every server judges leases by, read without a round trip.

``now()`` must answer without a round trip, so :class:`RedisClock` samples
``TIME`` every CLOCK_EVERY seconds and keeps an offset to the monotonic
clock, from the sample with the shortest round trip of the last few.
"""

from __future__ import annotations

import time
from typing import Any

# TIME is sampled this often; the best of the last CLOCK_SAMPLES sets the offset.
CLOCK_EVERY = 1.0
CLOCK_SAMPLES = 5
# Two samples whose offsets differ by more than their round trips allow, plus
# this (the monotonic clock's drift between them), mean Redis's clock jumped.
CLOCK_SLACK = 0.005


class RedisClock:
    """Redis's clock (``TIME``) read without a round trip: an offset to ``time.monotonic``."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self._samples: list[tuple[float, float]] = []  # (round trip, offset)

    async def sample(self, client: Any) -> None:
        sent = time.monotonic()
        seconds, micros = await client.time()
        came = time.monotonic()
        rtt = came - sent
        offset = seconds + micros / 1e6 - (sent + came) / 2
        if self._samples:
            best_rtt, best = min(reversed(self._samples), key=lambda s: s[0])
            if abs(offset - best) > (rtt + best_rtt) / 2 + CLOCK_SLACK:
                # More apart than two honest samples can be: Redis's clock was
                # stepped (or this is another Redis, after a fail-over). Follow it.
                self._samples = []
        self._samples = [*self._samples[-(CLOCK_SAMPLES - 1) :], (rtt, offset)]
        # The sample with the shortest round trip is the most exact (its error is
        # at most half that round trip); a newer one wins ties.
        self.offset = min(reversed(self._samples), key=lambda s: s[0])[1]

    def now(self) -> float:
        if self.offset is None:  # only before start(), which samples first
            return time.time()
        return time.monotonic() + self.offset
