"""Per-function start rate (`startRatePerSecond`, ours: FC has no such field).

The scheduler pulling a function's queue is the only one dispatching it (functions are hashed
onto the partition leases), so a spacing kept here is exact for the function: dispatches (the
Processed appends) are at least 1 / rate apart, bursts smoothed out (a burst allowance of one).
A task whose turn is near waits in process (`reserve` books its turn at once, so concurrent
handlers queue up); one further out is handed back with a delay (nak) and books a turn when it
comes round again. Throttled tasks wait; they never fail.
"""

from __future__ import annotations

from typing import Final

# The longest a handler waits in process for its turn; past it the task is handed back (well
# inside the dequeue consumer's ack wait).
MAX_INLINE_WAIT_S: Final = 1.0


class StartRates:
    """The next free dispatch time per rate-limited function (monotonic seconds)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def reserve(self, function: str, rate: float | None, now: float) -> tuple[bool, float]:
        """(booked, wait_s): booked means the caller dispatches after `wait_s` (0: at once);
        not booked means it should come back after `wait_s`."""
        if rate is None or rate <= 0:
            self._next.pop(function, None)
            return True, 0.0
        turn = max(self._next.get(function, now), now)
        wait_s = turn - now
        if wait_s > MAX_INLINE_WAIT_S:
            return False, wait_s
        self._next[function] = turn + 1.0 / rate
        return True, wait_s
