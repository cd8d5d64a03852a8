"""Keeping `make run`'s children alive: restarts with back-off, and knowing when to give up.

A child that dies is started again after 1 s, then 2 s, 4 s... A child that keeps dying soon
after it starts has a problem a restart will not fix (a bad setting, a port someone else took):
after a few tries the launcher gives up and shows the end of its log instead of restarting it
forever. Exit code 3 is a service asking to be restarted (its consumer was deleted, e.g. by a
read-model rebuild): that restart is immediate and not held against it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# A run shorter than this counts as a failed start.
STABLE_AFTER_S = 30.0
MAX_QUICK_FAILURES = 5
# Exit code 2 is how a service reports a configuration it cannot run with: no point in 5 tries.
CONFIG_ERROR_EXIT = 2
MAX_CONFIG_FAILURES = 2
RESTART_REQUESTED_EXIT = 3
MAX_BACKOFF_S = 16.0
LOG_TAIL_LINES = 15


def describe_exit(returncode: int) -> str:
    """'exited with 1' or 'was killed by SIGKILL', as a person would say it."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log (empty when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return text.rstrip("\n").splitlines()[-lines:]


class GaveUp(Exception):
    """A child kept failing; `lines` say which, how, and what its log ended with."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Supervised:
    """One child kept running: `start` (re)starts it and returns its process."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    start_error: str = ""  # why the last start failed before the process was even running
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None  # set while waiting out a back-off

    def launch(self) -> None:
        self.started_at = time.monotonic()
        self.restart_at = None
        try:
            self.process = self.start()
            self.start_error = ""
        except Exception as err:  # noqa: BLE001 - any failure to start is one more failed start
            self.process = None
            self.start_error = str(err).splitlines()[0] if str(err) else type(err).__name__

    @property
    def dead(self) -> bool:
        return self.process is None or self.process.poll() is not None

    @property
    def returncode(self) -> int:
        return 1 if self.process is None else int(self.process.returncode)


@dataclass
class Supervisor:
    """Polls its children; restarts the dead ones; raises `GaveUp` for one that keeps dying."""

    say: Callable[[str], None]
    children: list[Supervised] = field(default_factory=list)

    def add(self, child: Supervised) -> None:
        self.children.append(child)

    def check(self) -> None:
        """One round: notice deaths, schedule restarts, perform the due ones."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.say(f"starting {child.name} again")
                    child.launch()
                continue
            if not child.dead:
                continue
            if child.start_error:
                self.say(f"{child.name} failed to start: {child.start_error}")
            self._schedule_restart(child, child.returncode, now)

    def _schedule_restart(self, child: Supervised, returncode: int, now: float) -> None:
        if returncode == RESTART_REQUESTED_EXIT:
            self.say(f"{child.name} asked to be restarted; restarting")
            child.quick_failures = 0
            child.launch()
            return
        ran_s = now - child.started_at
        child.quick_failures = child.quick_failures + 1 if ran_s < STABLE_AFTER_S else 1
        limit = MAX_CONFIG_FAILURES if returncode == CONFIG_ERROR_EXIT else MAX_QUICK_FAILURES
        if child.quick_failures >= limit:
            raise GaveUp(
                [f"{child.name} {describe_exit(returncode)} {child.quick_failures} times in a row soon after "
                 f"starting; not restarting it. The end of {child.log_path}:"]
                + [f"  {line}" for line in log_tail(child.log_path)]
            )
        delay_s = min(MAX_BACKOFF_S, 2.0 ** (child.quick_failures - 1))
        self.say(f"{child.name} {describe_exit(returncode)}; restarting in {delay_s:g} s (log: {child.log_path})")
        child.restart_at = now + delay_s
