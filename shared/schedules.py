"""Timer-trigger schedules: FC's six-field cron (seconds first) and `@every <duration>`.

Cron expressions are read by croniter (kept up by the pallets-eco organisation; cronsim, the
other maintained parser, has no seconds field), in UTC unless prefixed with `CRON_TZ=<zone>`,
as FC allows. `@every 1h30m` ticks at whole multiples of the interval since the Unix epoch, so
every instance computes the same tick times without sharing any state: a tick's time is what
makes its task id, and so what makes a second submission of it a duplicate.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass
from typing import Final

from croniter import croniter

from shared.errors import InvalidArgument

_EVERY: Final = re.compile(r"^@every\s+((?:\d+[hms])+)$")
_PART: Final = re.compile(r"(\d+)([hms])")
_UNIT_S: Final = {"h": 3600, "m": 60, "s": 1}
MIN_EVERY_S: Final = 1
MAX_EVERY_S: Final = 7 * 24 * 3600


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; `ticks_between` lists its tick times (epoch ms) in a window."""

    expression: str
    every_s: int = 0  # > 0 for `@every`
    cron: str = ""
    zone: str = "UTC"

    def ticks_between(self, after_ms: int, until_ms: int, *, limit: int = 1000) -> list[int]:
        """Tick times t with after_ms < t <= until_ms, oldest first, at most `limit`."""
        if self.every_s:
            step = self.every_s * 1000
            first = (after_ms // step + 1) * step
            return list(range(first, until_ms + 1, step))[:limit]
        start = dt.datetime.fromtimestamp(after_ms / 1000, tz=zoneinfo.ZoneInfo(self.zone))
        it = croniter(self.cron, start, second_at_beginning=True)
        ticks: list[int] = []
        while len(ticks) < limit:
            at = int(it.get_next(float) * 1000)
            if at > until_ms:
                break
            if at > after_ms:
                ticks.append(at)
        return ticks

    def next_after(self, after_ms: int) -> int:
        """The first tick after `after_ms`."""
        if self.every_s:
            step = self.every_s * 1000
            return (after_ms // step + 1) * step
        start = dt.datetime.fromtimestamp(after_ms / 1000, tz=zoneinfo.ZoneInfo(self.zone))
        return int(croniter(self.cron, start, second_at_beginning=True).get_next(float) * 1000)


def parse_schedule(expression: str) -> Schedule:
    """Parse a `cronExpression`; `InvalidArgument` saying what is wrong otherwise."""
    text = expression.strip()
    every = _EVERY.fullmatch(text)
    if every:
        seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _PART.findall(every.group(1)))
        if not MIN_EVERY_S <= seconds <= MAX_EVERY_S:
            raise InvalidArgument(f"cronExpression {expression[:60]!r}: @every must be between 1s and 168h")
        return Schedule(expression=expression, every_s=seconds)
    if text.startswith("@every"):
        raise InvalidArgument(f"cronExpression {expression[:60]!r}: use @every with a duration such as 30s, 5m or 1h30m")
    zone = "UTC"
    if text.startswith("CRON_TZ="):
        zone, _, text = text[len("CRON_TZ="):].partition(" ")
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
            raise InvalidArgument(f"cronExpression: unknown time zone {zone[:40]!r}") from err
        text = text.strip()
    if len(text.split()) != 6 or not croniter.is_valid(text, second_at_beginning=True):
        raise InvalidArgument(
            f"cronExpression {expression[:60]!r} is not valid: use six fields (seconds minutes hours "
            "day-of-month month day-of-week), e.g. '0 */5 * * * *', or '@every 5m'"
        )
    return Schedule(expression=expression, cron=text, zone=zone)
