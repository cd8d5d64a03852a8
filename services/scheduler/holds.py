"""Tasks held Enqueued by flow control, and the ordered drain when the hold lifts.

A due task of a disabled function (DisableFunctionInvocation) or of one whose reservedConcurrency
is 0 is held: its Enqueued message is handed back (Nak) to be looked at again after a while,
longer the more are held, so a paused backlog costs a bounded redelivery rate.

When the hold lifts, the held messages come back in the order of their redelivery timers, not
of submission. So the first one back does not dispatch: it starts a drain plan that ranks every
task this scheduler held by stream sequence (the submission order) and gives each a slot
`spacing` apart, starting once all of them are surely back (`lead`: the longest hold handed
out). Each message is handed back until its slot, and past it while an earlier-ranked task is
still pending (redelivery timers are only exact to about 10 ms), for at most `PATIENCE_S`: a task
that never comes back (stopped elsewhere, its partition moved) holds up the rest no longer than
that. Tasks submitted meanwhile queue behind the plan. The order holds for what one scheduler held (its partitions); with several schedulers each
drains its own share in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

PAUSED: Final = "paused"
BLOCKED: Final = "blocked"
REASONS: Final = (PAUSED, BLOCKED)
# A held task is looked at again after HOLD_MIN_S, growing by HOLD_PER_TASK_S per task held (a
# paused backlog of 100,000 is redelivered at about 10,000 a second at most), up to HOLD_MAX_S.
HOLD_MIN_S: Final = 0.5
HOLD_PER_TASK_S: Final = 0.0001
HOLD_MAX_S: Final = 10.0
# Slack on top of the longest hold before a drain starts (redelivery timers are not exact).
LEAD_SLACK_S: Final = 0.3
# Slots of a drain: DRAIN_SPACING_S apart, or squeezed into DRAIN_WINDOW_S for a big backlog.
DRAIN_SPACING_S: Final = 0.002
DRAIN_WINDOW_S: Final = 10.0
# How long past its slot a task waits for an earlier-ranked one, and how often it looks again.
PATIENCE_S: Final = 1.0
TURN_RECHECK_S: Final = 0.005


def hold_delay(held: int) -> float:
    """How long a held task's message waits before it is looked at again."""
    return min(HOLD_MAX_S, HOLD_MIN_S + held * HOLD_PER_TASK_S)


@dataclass
class _Plan:
    start_s: float
    spacing_s: float
    ranks: dict[str, int]
    next_rank: int
    gone: set[int] = field(default_factory=set)  # ranks dispatched (or otherwise done)
    low: int = 0  # every rank below this is gone

    def finish(self, rank: int) -> None:
        self.gone.add(rank)
        while self.low in self.gone:
            self.gone.discard(self.low)
            self.low += 1

    def end_s(self) -> float:
        return self.start_s + self.next_rank * self.spacing_s


@dataclass
class Holds:
    """Held tasks per function (task id -> (stream sequence, reason)) and drains under way."""

    held: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    plans: dict[str, _Plan] = field(default_factory=dict)

    def hold(self, function: str, task_id: str, seq: int, reason: str) -> float:
        """Hold the task; the delay to hand its message back with."""
        self.plans.pop(function, None)  # held again mid-drain: the next drain ranks everything anew
        tasks = self.held.setdefault(function, {})
        tasks[task_id] = (seq, reason)
        return hold_delay(len(tasks))

    def count(self, function: str, reason: str) -> int:
        return sum(1 for _, why in self.held.get(function, {}).values() if why == reason)

    def wait_for_turn(self, function: str, task_id: str, seq: int, now_s: float) -> float:
        """0 when the task (of a function no longer held) may be dispatched now, else how long
        to hand it back for: its slot in the function's drain."""
        plan = self.plans.get(function)
        if plan is not None and now_s > plan.end_s() + HOLD_MAX_S + LEAD_SLACK_S:
            del self.plans[function]  # every slot passed long ago: what never came back went elsewhere
            plan = None
        if plan is None:
            tasks = self.held.pop(function, {})
            if not tasks:
                return 0.0
            order = sorted(tasks, key=lambda t: tasks[t][0])
            spacing = min(DRAIN_SPACING_S, DRAIN_WINDOW_S / len(order))
            plan = _Plan(start_s=now_s + hold_delay(len(order)) + LEAD_SLACK_S, spacing_s=spacing,
                         ranks={t: i for i, t in enumerate(order)}, next_rank=len(order))
            self.plans[function] = plan
        rank = plan.ranks.get(task_id)
        if rank is None:  # submitted (or due) during the drain: behind it
            rank = plan.ranks[task_id] = plan.next_rank
            plan.next_rank += 1
        slot_s = plan.start_s + rank * plan.spacing_s
        if now_s < slot_s:
            return slot_s - now_s
        if rank > plan.low and now_s < slot_s + PATIENCE_S:
            return TURN_RECHECK_S  # an earlier one is due first
        return 0.0

    def done(self, function: str, task_id: str) -> None:
        """The task left the scheduler (dispatched, expired, invalid or stopped)."""
        tasks = self.held.get(function)
        if tasks is not None:
            tasks.pop(task_id, None)
            if not tasks:
                del self.held[function]
        plan = self.plans.get(function)
        if plan is not None:
            rank = plan.ranks.pop(task_id, None)
            if rank is not None:
                plan.finish(rank)
            if not plan.ranks:
                del self.plans[function]
